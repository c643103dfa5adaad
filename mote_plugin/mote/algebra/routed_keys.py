"""Keys routed to experts: the one form in which keys pass from the model to the projections, statistics and solvers.

A MoE block sends each of N tokens (the T edits' lookup tokens, or a corpus's tokens) to K of its E experts, weighted
by gates; what expert j's down-projection reads for token n is its key k = act(W_gate_j x_n) * (W_up_j x_n). The
adapters compute them (`MoEAdapter.route_keys`), once per token; everything downstream groups them by expert with
`expert_groups`. Pure tensor code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


def expert_groups(expert_idx: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For every expert present in expert_idx `[N, K]`, in increasing order: (expert, rows [M], slots [M]), the
    (token, top-k slot) pairs routed to it, row-major."""
    for expert in expert_idx.unique().tolist():
        rows, slots = torch.where(expert_idx == expert)
        yield expert, rows, slots


@dataclass
class RoutedKeys:
    """The experts N tokens were routed to, their gates, and the keys those experts read."""

    expert_idx: torch.Tensor  # [N, K] long, the selected experts
    gates: torch.Tensor  # [N, K] float32, their routing weights g
    keys: torch.Tensor  # [N, K, h] the selected experts' keys (float32, or float64 after a float64 projection)
    num_experts: int  # E

    def groups(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(expert, rows [M], slots [M]) for every expert some token was routed to (`expert_groups`)."""
        return expert_groups(self.expert_idx.to(self.keys.device))

    def projected(self, P: torch.Tensor) -> RoutedKeys:
        """The same routing with each key null-space-projected by its expert's projector: k~ = P_j k.

        P: `[E, h, h]`. Keys in the promoted dtype of keys and P (at least float32). Expert by expert: never a
        gathered [N, K, h, h] stack of projectors.
        """
        dtype = torch.promote_types(torch.promote_types(torch.float32, self.keys.dtype), P.dtype)
        keys = self.keys.to(dtype)
        out = torch.empty_like(keys)  # [N, K, h]
        for j, rows, slots in self.groups():
            out[rows, slots] = keys[rows, slots] @ P[j].to(device=keys.device, dtype=dtype).T  # [M, h]
        return RoutedKeys(self.expert_idx, self.gates, out, self.num_experts)

    def gated(self) -> torch.Tensor:
        """g k per (token, slot): `[N, K, h]` float64."""
        return self.gates.to(torch.float64).unsqueeze(-1) * self.keys.to(torch.float64)

    def gated_by_expert(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """[(j, rows [n_j] long, V_j [n_j, h] float64)], V_j[i] = g k of token rows[i] at expert j; experts in
        increasing order."""
        gated = self.gated()  # [N, K, h]
        return [(j, rows, gated[rows, slots]) for j, rows, slots in self.groups()]

    def dense_gates(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The gate vectors g_n `[N, E]` in `dtype` (zero for experts outside the top-k)."""
        out = torch.zeros(self.gates.shape[0], self.num_experts, dtype=dtype, device=self.gates.device)  # [N, E]
        return out.scatter_add_(1, self.expert_idx.to(self.gates.device), self.gates.to(dtype))
