"""Fingerprints of weights: what the caches (statistics, v*) and edit patches key on, cheap enough for real models."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from .offload import state_items


def model_fingerprint(model: nn.Module, sample: int = 1024) -> str:
    """sha256 over every state-dict entry's name, shape, dtype, first and last `sample` elements and float64 sum
    (an entry offloaded by accelerate is read from its weights map).

    Cheap (one chunked reduction per tensor, no full copy to the CPU or to float64) and sensitive to any edit that
    changes a tensor's sum or its ends, e.g. an in-place update of one expert; an edit preserving a tensor's sum
    exactly goes unseen.
    """
    return tensors_fingerprint(state_items(model), sample)


def tensors_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], sample: int = 1024) -> str:
    """`model_fingerprint` of (name, tensor) pairs, in the order given (e.g. a state dict with some entries
    replaced)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in named_tensors:
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            flat = t.detach().reshape(-1)
            ends = torch.cat([flat[:sample], flat[-sample:]]).to("cpu", torch.float64)
            h.update(ends.numpy().tobytes())
            h.update(repr(_sum64(flat)).encode())
    return h.hexdigest()


FINGERPRINT_CHUNK = 1 << 22  # elements summed at a time: a float64 copy of 32 MiB, not of the whole tensor


def _sum64(flat: torch.Tensor) -> float:
    """float64 sum of a flat tensor, chunk by chunk (`flat.sum(dtype=float64)` converts all of it at once: 3 GiB for
    one bf16 gate_up_proj of Qwen3-30B-A3B)."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), FINGERPRINT_CHUNK):
        total += flat[start:start + FINGERPRINT_CHUNK].sum(dtype=torch.float64)
    return float(total)
