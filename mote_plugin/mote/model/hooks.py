"""Reading activations: what a module receives or returns during a forward pass, recorded by a temporary hook.

    with recorded(model.get_submodule("model.layers.3")) as seen:
        model(**batch)
    h = seen[0]                      # [B, S, d] the layer's hidden states (the first element of a tuple output)

Every place that reads an activation (layer outputs at the lookup tokens, the v* replay, the fact model's causal
tracing, the comparison's key covariances) goes through `recorded`; hooks that change activations or stop the forward
are written where they are used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def hidden_states(output) -> torch.Tensor:
    """The hidden states in a module's output: decoder layers of some families return a tuple (hidden, ...)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def recorded(modules: nn.Module | Sequence[nn.Module], what: str = "output") -> Iterator[list]:
    """Record, for each of `modules` (one module, or a list or ModuleList of them), its hidden states
    (`what="output"`) or its first positional argument (`what="input"`), detached, on every forward inside the block;
    `seen[i]` holds module i's from the last forward (None before any). The hooks are removed on leaving the block,
    also on an exception."""
    if what not in ("output", "input"):
        raise ValueError(f"what must be 'output' or 'input', got {what!r}")
    single = isinstance(modules, nn.Module) and not isinstance(modules, nn.ModuleList)
    modules = [modules] if single else list(modules)
    seen: list = [None] * len(modules)

    def keep(i: int):
        if what == "output":
            return lambda module, args, output: seen.__setitem__(i, hidden_states(output).detach())
        return lambda module, args: seen.__setitem__(i, args[0].detach())

    register = "register_forward_hook" if what == "output" else "register_forward_pre_hook"
    handles = [getattr(m, register)(keep(i)) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
