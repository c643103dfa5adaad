"""Models dispatched by accelerate with CPU or disk offload (docs/large-models.md).

accelerate keeps an offloaded module's parameters on the `meta` device; their values live in the weights map of the
module's `AlignDevicesHook` (CPU tensors, or files on disk) and are loaded onto the hook's execution device for each
forward pass, then dropped. MoTE reads the edited MoE blocks' weights outside forward passes (routing, keys, the
Tucker basis) and writes their down-projections in place, so for the length of one edit every edited block is
*resident*: its offloaded weights are loaded once onto their execution device and stay there across forward passes,
then are dropped again. Nothing else moves: the other layers keep loading and dropping their weights per forward.

`store` puts what MoTE wrote back into the weights map, as a new CPU tensor in its in-memory dict, which accelerate
reads before its files: the checkpoint and the offload folder are never written, and each edited down-projection of
an offloaded layer takes CPU memory (Qwen3-30B-A3B in bf16: 0.4 GB per edited layer). Without accelerate installed,
or for a model it did not dispatch, every function here is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager

import torch
from torch import nn


def offload_hook(module: nn.Module):
    """The accelerate `AlignDevicesHook` that offloads `module`'s own weights (also while MoTE holds it resident),
    or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook chains several
        if type(h).__name__ == "AlignDevicesHook" and h.weights_map is not None and (h.offload or _is_resident(h)):
            return h
    return None


def _is_resident(hook) -> bool:
    return getattr(hook, "mote_resident", False)


def _storage(weights_map, key: str) -> tuple[MutableMapping, str]:
    """(in-memory dict, key) where a value stored for `key` of this weights map is read first by accelerate."""
    while type(weights_map).__name__ == "PrefixedDataset":  # accelerate.utils.PrefixedDataset: dataset[prefix + key]
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    if type(weights_map).__name__ == "OffloadedWeightsLoader":  # its state_dict is read before its index of files
        return weights_map.state_dict, key
    if isinstance(weights_map, MutableMapping):
        return weights_map, key
    raise ValueError(f"unsupported accelerate weights map {type(weights_map).__name__}: MoTE cannot store edited "
                     "weights in it (supported: OffloadedWeightsLoader, PrefixedDataset, dict)")


def device_of(module: nn.Module) -> torch.device:
    """Where `module` computes: its first parameter's device, or its offload hook's execution device."""
    for m in module.modules():
        hook = offload_hook(m)
        if hook is not None and hook.execution_device is not None:
            return torch.device(hook.execution_device)
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    return torch.device("cpu")


@contextmanager
def resident(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within: every offloaded module under `modules` has its weights loaded on its execution device, kept there
    through forward passes. On exit they are dropped (back to `meta`); what was written to them is lost unless
    `store`d. Refuses, before loading anything, weights maps MoTE could not store into."""
    hooks = [(m, h) for module in modules for m in module.modules()
             if (h := offload_hook(m)) is not None and not _is_resident(h)]
    for _, h in hooks:
        _storage(h.weights_map, "")
    loaded = []
    try:
        for m, h in hooks:
            h.pre_forward(m)  # loads every tensor of m from its weights map onto h.execution_device
            loaded.append((m, h))
            h.offload, h.mote_resident = False, True  # forward passes now only move inputs, weights stay
        yield
    finally:
        for m, h in reversed(loaded):
            h.offload, h.mote_resident = True, False
            h.post_forward(m, None)  # back to meta


def store(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Put the values of `params` ({full parameter name: tensor}) into the weights maps of the offloaded modules
    that own them (others are skipped: their parameters are the values). Every CPU copy is made before the first one
    is stored, so a failure (e.g. out of memory) stores nothing."""
    staged = []
    for name, value in params.items():
        module_name, _, leaf = name.rpartition(".")
        hook = offload_hook(model.get_submodule(module_name))
        if hook is not None:
            staged.append((*_storage(hook.weights_map, leaf), value.detach().to("cpu", copy=True)))
    for mapping, key, value in staged:
        mapping[key] = value


def state_items(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state-dict entries (only `names` when given), an offloaded (meta) one replaced by its value in
    accelerate's weights map (read one at a time: a disk-offloaded tensor is in CPU memory only while it is used)."""
    wanted = None if names is None else set(names)
    owners = {}
    for module_name, m in model.named_modules():
        hook = offload_hook(m)
        if hook is not None:
            tensors = [*m.named_parameters(recurse=hook.place_submodules),
                       *m.named_buffers(recurse=hook.place_submodules)]
            owners |= {f"{module_name}.{leaf}" if module_name else leaf: (hook, leaf) for leaf, _ in tensors}
    for name, t in model.state_dict().items():
        if wanted is not None and name not in wanted:
            continue
        if t.device.type == "meta":
            if name not in owners:
                raise ValueError(f"{name} is on the meta device and no accelerate offload hook holds its value: "
                                 "load the model's weights (or dispatch it with accelerate) first")
            hook, leaf = owners[name]
            t = hook.weights_map[leaf]
        yield name, t


def values(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """{name: value} of some state-dict entries, read from accelerate's weights map where offloaded."""
    return dict(state_items(model, names))
