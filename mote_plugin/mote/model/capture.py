"""Key capture at the lookup token (docs/method.md, "Experts as memories"), and the layer outputs the residuals are
measured at.

For every edit request and every edited layer: the router's choice at the request's lookup token (top-k experts and
gates) and the keys k_j = act(W_gate_j x) * (W_up_j x) of the selected experts, as `RoutedKeys`. One batched forward
per chunk of requests; a forward pre-hook on each edited MoE block records its input x, and the forward stops after
the last edited layer. `layer_outputs`: a decoder
layer's output at the lookup tokens (what v* targets are compared with).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..algebra.routed_keys import RoutedKeys
from .blocks import forward_block_inputs, input_device, moe_blocks
from .hooks import recorded
from .lookup import encode_with_lookup
from .requests import normalise_requests


def capture(
    model: nn.Module,
    tok,
    adapter,
    requests: Sequence[dict],
    layers: Sequence[int],
    fact_token: str,
    batch_size: int = 16,
    max_length: int | None = None,
) -> dict[int, RoutedKeys]:
    """The routing and keys at each request's lookup token (T rows, in request order), for every layer in `layers`.

    Requests are EasyEdit dicts (`prompt` containing `subject`, or a "{}" template). The tokenizer's padding side is
    irrelevant (prompts are padded on the right here). Runs on the model's device in eval mode (the previous mode is
    restored), without gradients.
    """
    pairs = [(r["prompt"], r["subject"]) for r in normalise_requests(requests, need_target=False)]
    if not pairs:
        raise ValueError("no requests to capture")
    blocks = moe_blocks(model, adapter, layers)
    device = input_device(model)
    xs: dict[int, list[torch.Tensor]] = {l: [] for l in blocks}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch, lookup, _ = encode_with_lookup(tok, [p for p, _ in chunk], [s for _, s in chunk], fact_token,
                                                  max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            rows = torch.arange(len(chunk))

            def grab(layer, block, x):  # x [B, S, d]
                xs[layer].append(x[rows.to(x.device), lookup.to(x.device)].float())  # [B, d]

            forward_block_inputs(model, blocks, batch, grab)
    finally:
        model.train(was_training)

    captures = {}
    for layer, block in blocks.items():
        with torch.no_grad():
            captures[layer] = adapter.route_keys(block, torch.cat(xs[layer]))  # x [T, d] -> keys [T, K, h]
    return captures


def layer_outputs(model, tok, requests: list[dict], layer_module: str, fact_token: str,
                  max_length: int | None) -> torch.Tensor:
    """[T, d] output of a decoder layer at each request's lookup token (one batched forward)."""
    batch, lookup, _ = encode_with_lookup(tok, [r["prompt"] for r in requests], [r["subject"] for r in requests],
                                          fact_token, max_length)
    device = input_device(model)
    with recorded(model.get_submodule(layer_module)) as seen, torch.no_grad():
        model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    h = seen[0]  # [B, S, d], on the layer's device
    return h[torch.arange(len(requests), device=h.device), lookup.to(h.device)].float()
