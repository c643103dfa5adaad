"""Baseline solvers on the same (null-space-projected) keys as MoTE (docs/method.md, "Solvers").

The unstructured editing objective at one layer, with v_tj = g_tj k~_tj the gated projected key of edit t at
expert j and R [T, d] the residuals (target minus current output):

    min_{Delta_j}  sum_t || r_t - sum_j Delta_j v_tj ||^2 + lam sum_j ||Delta_j||_F^2

* `global_solve`: the exact minimiser by the push-through identity, with psi_t = [v_t1; ...; v_tE] in R^{E h}:
  Delta = R^T (Psi Psi^T + lam I_T)^{-1} Psi  -- a T x T solve. Expert j's block is alpha[S_j]^T V_j, with
  alpha = (Psi Psi^T + lam I)^{-1} R [T, d], S_j the edits routed to j and V_j [n_j, h] their v_tj: only the
  routed experts change, each by a rank-n_j update ("sparse global").
* `bcd_solve`: MoEEdit's randomized block-coordinate descent over experts (Gu et al. 2026): each block is the
  exact ridge solve for one expert with the others fixed, `passes` sweeps in a seeded random order. Computed in
  the push-through form, per-expert systems of size n_j (edits routed to j) instead of h; the iterates are
  MoEEdit's (tested against `bcd_published` in benchmarks/moeedit_bcd.py, the h x h form as published).

Pure tensor functions; solves in float64, updates returned as `ExpertUpdate` (float32).
"""

from __future__ import annotations

import torch

from .core_solve import spd_solve
from .routed_keys import RoutedKeys
from .update import ExpertUpdate


def _update(groups, coefficients: dict[int, torch.Tensor]) -> ExpertUpdate:
    """Delta_j = coefficients[j]^T V_j for each group -> ExpertUpdate with left_j = coefficients[j]^T U_j S_j [d, r_j]
    and right_j = W_j^T [r_j, h], V_j = U_j S_j W_j^T its thin SVD (float64, r_j its numerical rank).

    Orthonormal rows on the right keep the float32 product exact to float32 precision: edits whose keys in one expert
    coincide (the same subject behind the same prefix) make V_j rank-deficient and its coefficients large and opposite,
    and left_j = coefficients^T V_j's factors in float32 would lose the update to cancellation."""
    parts = []
    for j, _, V in groups:
        U, S, Wt = torch.linalg.svd(V, full_matrices=False)  # [n_j, k], [k], [k, h]
        r = max(1, int((S > S[0] * max(V.shape) * torch.finfo(S.dtype).eps).sum()))
        parts.append((j, (coefficients[j].T @ (U[:, :r] * S[:r])).float(), Wt[:r].float()))
    return ExpertUpdate.from_groups(parts)


def global_solve(routed: RoutedKeys, residuals: torch.Tensor, lam: float) -> ExpertUpdate:
    """The exact ridge minimiser over all experts (Woodbury, T x T). routed: the batch's projected keys `[T, K, h]`,
    residuals `[T, d]` -> ExpertUpdate."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    T, device = routed.keys.shape[0], routed.keys.device
    groups = routed.gated_by_expert()
    gram = torch.zeros(T, T, dtype=torch.float64, device=device)  # Psi Psi^T [T, T]
    for _, rows, V in groups:
        gram.index_put_((rows[:, None], rows[None, :]), V @ V.T, accumulate=True)
    gram += lam * torch.eye(T, dtype=torch.float64, device=device)
    alpha = spd_solve(gram, residuals.to(torch.float64))  # [T, d]
    return _update(groups, {j: alpha[rows] for j, rows, _ in groups})


def sweep_order(num_experts: int, passes: int, seed: int) -> list[int]:
    """MoEEdit's order: a fresh random permutation of all experts per pass, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [int(j) for _ in range(passes) for j in torch.randperm(num_experts, generator=gen)]


def bcd_solve(routed: RoutedKeys, residuals: torch.Tensor, lam: float, passes: int = 4,
              seed: int = 42) -> ExpertUpdate:
    """MoEEdit's block-coordinate descent, per-expert solves of size n_j. routed: the batch's projected keys
    `[T, K, h]`, residuals `[T, d]` -> ExpertUpdate.

    Block j, the others fixed:  A_j = (V_j V_j^T + lam I)^{-1} (R[S_j] - (Y[S_j] - Y_j)),  Delta_j = A_j^T V_j,
    where Y [T, d] is the current prediction sum_j Delta_j v_tj and Y_j = V_j V_j^T A_j expert j's share of it.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    R = residuals.to(torch.float64)  # [T, d]
    groups = {j: (rows, V) for j, rows, V in routed.gated_by_expert()}
    grams = {j: V @ V.T for j, (_, V) in groups.items()}  # [n_j, n_j]
    Y = torch.zeros_like(R)  # [T, d]
    share = {j: R.new_zeros(len(rows), R.shape[1]) for j, (rows, _) in groups.items()}  # Y_j [n_j, d]
    A = {j: R.new_zeros(len(rows), R.shape[1]) for j, (rows, _) in groups.items()}  # [n_j, d]
    for j in sweep_order(routed.num_experts, passes, seed):
        if j not in groups:
            continue
        rows, _ = groups[j]
        eye = torch.eye(len(rows), dtype=R.dtype, device=R.device)
        A[j] = spd_solve(grams[j] + lam * eye, R[rows] - (Y[rows] - share[j]))  # [n_j, d]
        new_share = grams[j] @ A[j]  # [n_j, d]
        Y.index_add_(0, rows, new_share - share[j])
        share[j] = new_share
    return _update([(j, rows, V) for j, (rows, V) in groups.items()], A)
