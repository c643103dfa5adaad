"""What an editor writes into one MoE layer: a low-rank update per expert, Delta W_j = left_j @ right_j.

Every solver (MoTE's core, the global ridge, block-coordinate descent) ends in an `ExpertUpdate`, and every
weight change goes through `ExpertUpdate.write`, so the writeback, the record of what changed (edit patches) and
the all-or-nothing restore see one form:

    experts None:  Delta W_j = left @ right[j]        left [d, r] shared, right [E, r, h]   (MoTE: all experts)
    experts [M]:   Delta W_{experts[i]} = left[i] @ right[i]   left [M, d, r], right [M, r, h]   (routed experts only)

Canonical layout [E, d, h]; the adapter transposes to the parameter's own layout and casts once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routed_keys import RoutedKeys, expert_groups


@dataclass
class ExpertUpdate:
    left: torch.Tensor  # [d, r] (experts None) or [M, d, r]
    right: torch.Tensor  # [E, r, h] (experts None) or [M, r, h]
    experts: torch.Tensor | None = None  # [M] long, or None for all experts

    @classmethod
    def from_groups(cls, groups: list[tuple[int, torch.Tensor, torch.Tensor]]) -> "ExpertUpdate":
        """Per-expert factors of different ranks, zero-padded to one rank: groups of (expert, left [d, r_j],
        right [r_j, h])."""
        if not groups:
            raise ValueError("an update needs at least one expert")
        r = max(left.shape[1] for _, left, _ in groups)
        d, h = groups[0][1].shape[0], groups[0][2].shape[1]
        left = groups[0][1].new_zeros(len(groups), d, r)  # [M, d, r]
        right = groups[0][2].new_zeros(len(groups), r, h)  # [M, r, h]
        for i, (_, l_j, r_j) in enumerate(groups):
            left[i, :, : l_j.shape[1]] = l_j
            right[i, : r_j.shape[0]] = r_j
        return cls(left=left, right=right, experts=torch.tensor([j for j, _, _ in groups], dtype=torch.long))

    def scaled(self, scale: float) -> "ExpertUpdate":
        return ExpertUpdate(left=self.left * scale, right=self.right, experts=self.experts)

    def projected(self, P: torch.Tensor) -> "ExpertUpdate":
        """The same update seen through other projectors: right_j <- right_j P_j (P [E, h, h] symmetric)."""
        if self.experts is None:
            return ExpertUpdate(left=self.left, right=self.right @ P.to(self.right), experts=None)
        right = torch.empty_like(self.right)  # [M, r, h], expert by expert: no gathered copy of the projectors
        for i, j in enumerate(self.experts.tolist()):
            right[i] = self.right[i] @ P[j].to(self.right)
        return ExpertUpdate(left=self.left, right=right, experts=self.experts)

    def dense(self, num_experts: int) -> torch.Tensor:
        """The explicit update [E, d, h] (tests and small models only)."""
        if self.experts is None:
            return torch.einsum("dr,erh->edh", self.left, self.right)
        out = self.left.new_zeros(num_experts, self.left.shape[1], self.right.shape[2])  # [E, d, h]
        out.index_add_(0, self.experts.to(out.device), torch.einsum("edr,erh->edh", self.left, self.right))
        return out

    def output_change(self, routed: RoutedKeys) -> torch.Tensor:
        """The change of the routed output this update makes at each edit, sum_k g_tk Delta_{idx_tk} k_tk.

        routed: the keys `[T, K, h]` as captured (the update already holds the projectors) -> `[T, d]` in the
        update's dtype, on its device.
        """
        keys = routed.keys.to(device=self.right.device, dtype=self.right.dtype)
        gates = routed.gates.to(keys)
        shared = self.experts is None  # one left factor for every expert: sum the inner products first
        position = range(self.right.shape[0]) if shared else self.experts.tolist()
        position = {j: i for i, j in enumerate(position)}  # expert -> its row of right (and left)
        T, d, r = keys.shape[0], self.left.shape[-2], self.right.shape[1]
        out = keys.new_zeros(T, r if shared else d)  # [T, r] or [T, d]
        for j, t, k in expert_groups(routed.expert_idx.to(keys.device)):  # the edits routed to j, and which slot
            if j not in position:
                continue  # an expert this update leaves unchanged
            i = position[j]
            inner = gates[t, k, None] * (keys[t, k] @ self.right[i].T)  # [n_j, r]
            out.index_add_(0, t, inner if shared else inner @ self.left[i].T)
        return out @ self.left.T if shared else out  # [T, d]

    def write(self, adapter, block) -> None:
        """Add the update to the block's packed down-projection, in place (one batched op)."""
        adapter.add_lowrank(block, self.left, self.right, experts=self.experts)
