"""MoEEdit's block-coordinate descent as published (Gu et al. 2026): the reference `bcd_solve` is tested against
(tests/test_baselines.py) and the form solver_speed.py times. Not part of the library: the plugin's `bcd_solve`
computes the same iterates in the push-through form."""

import torch

from mote_plugin.mote.algebra.baselines import sweep_order


def bcd_published(keys: torch.Tensor, gates: torch.Tensor, expert_idx: torch.Tensor, residuals: torch.Tensor,
                  lam: float, num_experts: int, passes: int = 4, seed: int = 42, dtype: torch.dtype = torch.float64,
                  max_blocks: int | None = None) -> torch.Tensor:
    """MoEEdit's BCD in the form it was published (reference for tests and speed comparisons only).

    Dense [T, E, h] gated keys, and per block: the other experts' contributions recomputed over all T edits
    (O(E T d h) per block), an h x h system inverted (MoEEdit computes in float32). `max_blocks` stops after that
    many block solves (to time a sample of blocks at shapes where all of them take too long). Returns the dense
    Delta `[E, d, h]` in `dtype`.
    """
    T, K, h = keys.shape
    d = residuals.shape[1]
    R = residuals.to(dtype)  # [T, d]
    dense_gates = torch.zeros(T, num_experts, dtype=dtype).scatter_(1, expert_idx, gates.to(dtype))  # [T, E]
    values = torch.zeros(T, num_experts, h, dtype=dtype)  # [T, E, h]
    values[torch.arange(T)[:, None], expert_idx] = keys.to(dtype)
    deltas = torch.zeros(num_experts, d, h, dtype=dtype)  # [E, d, h]
    eye = torch.eye(h, dtype=dtype)
    solved = 0
    for j in sweep_order(num_experts, passes, seed):
        active = dense_gates[:, j] > 0  # [T]
        if not active.any():
            continue
        if max_blocks is not None and solved == max_blocks:
            break
        solved += 1
        S = R.clone()  # [T, d] what expert j must still explain
        for other in range(num_experts):
            if other != j:
                S -= dense_gates[:, other : other + 1] * (values[:, other] @ deltas[other].T)
        g, v = dense_gates[active, j], values[active, j]  # [n_j], [n_j, h]
        B = S[active].T @ (g[:, None] * v)  # [d, h]
        M = v.T @ ((g**2)[:, None] * v) + lam * eye  # [h, h]
        deltas[j] = B @ torch.linalg.inv(M)
    return deltas
