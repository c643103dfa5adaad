"""The model's MoE blocks as the editing steps reach them: the blocks of the edited layers (checked), the device the
model's inputs go to, and a forward pass that hands each block's input to a function and stops after the last one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .offload import device_of


class _StopForward(Exception):
    """Raised by the last hook: nothing above the last requested layer needs computing."""


def moe_blocks(model: nn.Module, adapter, layers: Sequence[int]) -> dict[int, nn.Module]:
    """{layer: MoE block}; ValueError for a layer out of range, with a dense MLP, or with a MoE block MoTE cannot edit
    (`MoEAdapter.unsupported`, e.g. quantized experts)."""
    if not layers:
        raise ValueError("no layers requested")
    n = adapter.num_layers(model)
    blocks = {}
    for layer in layers:
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} is out of range: the model has {n} decoder layers")
        block = adapter.moe_block(model, layer)
        mlp = getattr(adapter.decoder_layers(model)[layer], adapter.mlp_attr, None)
        if block is None and (reason := adapter.unsupported(mlp)) is not None:
            raise ValueError(f"layer {layer}: {reason}")
        if block is None:
            raise ValueError(
                f"layer {layer} has no MoE block (dense MLP); MoE layers of this model: {adapter.moe_layers(model)}"
            )
        blocks[layer] = block
    return blocks


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (their execution device when offloaded)."""
    return device_of(model.get_input_embeddings())


def forward_block_inputs(
    model: nn.Module,
    blocks: dict[int, nn.Module],
    batch: dict[str, torch.Tensor],
    fn: Callable[[int, nn.Module, torch.Tensor], None],
) -> None:
    """Run `model` on `batch` (no grad); `fn(layer, block, x [B, S, d])` receives every block's input.

    The forward is cut short right after the last block's input is seen (its block and everything above it are
    skipped). The model's train/eval mode is not changed here.
    """
    last = max(blocks)
    B, S = batch["input_ids"].shape

    def make_hook(layer: int, block: nn.Module):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            fn(layer, block, x.reshape(B, S, x.shape[-1]))  # [B, S, d]
            if layer == last:
                raise _StopForward

        return hook

    handles = [b.register_forward_pre_hook(make_hook(l, b), with_kwargs=True) for l, b in blocks.items()]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
