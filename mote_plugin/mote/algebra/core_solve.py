"""The MoTE core solve (docs/method.md, "Core solve"): a ridge regression for the Tucker core, plus the writeback.

For edit t with selected experts idx_tk, gates g_tk and null-space-projected keys k~_tk = P_j k_tk:

    c_tk     = U_in^T k~_tk                              # [r_in]
    phi_t[a] = sum_k g_tk U_e[idx_tk, a] c_tk            # [r_e, r_in] -> phi_t in R^{r_e r_in}
    r~_t     = U_out^T r_t                               # [r_out]

so that U_out^T sum_k g_tk Delta W_{idx_tk} k~_tk = G_flat phi_t with G_flat = [G_1 | ... | G_re]
([r_out, r_e*r_in], G_a = G_flat[:, a*r_in:(a+1)*r_in]). The core solves

    min_G  sum_t ||r~_t - G_flat phi_t||^2 + lam ||G_flat||_F^2 (+ sum_past ||G_flat phi_past||^2)

    G_flat = R~^T Phi (Phi^T Phi + M + lam I)^{-1}      (feature side, [n, n], n = r_e*r_in)
           = R~^T (Phi Phi^T + lam I_T)^{-1} Phi        (T side, [T, T], only without memory M)

and the update of expert j is  Delta W_j = U_out (sum_a U_e[j, a] G_a) U_in^T P_j.

Pure tensor functions, device-agnostic. Linear solves run in float64 (Cholesky); results come back in
the promoted dtype of the inputs, at least float32 (float64 inputs give float64 results).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routed_keys import RoutedKeys
from .tucker import TuckerFactors


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X = A^{-1} B for a symmetric positive definite A (Cholesky; LU if Cholesky breaks down).

    A: `[n, n]`, B: `[n, m]` -> `[n, m]`, all float64.
    """
    A = 0.5 * (A + A.T)
    L, info = torch.linalg.cholesky_ex(A)  # [n, n]
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(A, B)


@dataclass
class CoreSolution:
    """The solved core and what the low-rank writeback needs.

    G_flat: `[r_out, r_e*r_in]` the core, G_a = G_flat[:, a*r_in:(a+1)*r_in]; on the T side formed on demand as
        R~^T A (the writeback at rank T never needs it, and at large ranks it is the largest tensor of the solve).
    R_tilde: `[T, r_out]` projected residuals R~ = R U_out.
    Phi: `[T, r_e*r_in]` the edit features (feed them to `update_memory` after the edit).
    A: `[T, r_e*r_in]` (Phi Phi^T + lam I)^{-1} Phi when the T side was solved (G_flat = R~^T A), else None.
    side: "T" or "feature", the side that was solved.
    """

    R_tilde: torch.Tensor  # [T, r_out]
    Phi: torch.Tensor  # [T, r_e*r_in]
    A: torch.Tensor | None  # [T, r_e*r_in] or None
    side: str
    G: torch.Tensor | None = None  # [r_out, r_e*r_in] the feature side's core (None on the T side)

    @property
    def G_flat(self) -> torch.Tensor:
        if self.G is not None:
            return self.G
        return (self.R_tilde.to(torch.float64).T @ self.A.to(torch.float64)).to(self.A.dtype)  # [r_out, r_e*r_in]


def core_features(routed: RoutedKeys, factors: TuckerFactors) -> torch.Tensor:
    """Edit features phi_t[a, :] = sum_k g_tk U_e[idx_tk, a] U_in^T k~_tk, flattened over (a, :).

    routed: the batch's T edits, keys `[T, K, h]` already projected -> Phi `[T, r_e*r_in]` (float64).
    """
    keys = routed.keys
    U_e, _, U_in = (U.to(device=keys.device, dtype=torch.float64) for U in factors)
    c = keys.to(torch.float64) @ U_in  # [T, K, r_in]
    u = U_e[routed.expert_idx.to(keys.device)]  # [T, K, r_e]
    gates = routed.gates.to(device=keys.device, dtype=torch.float64)  # [T, K]
    Phi = torch.einsum("tk,tka,tki->tai", gates, u, c)  # [T, r_e, r_in]
    return Phi.reshape(Phi.shape[0], -1)  # [T, r_e*r_in]


def solve_core(
    routed: RoutedKeys,
    residuals: torch.Tensor,
    factors: TuckerFactors,
    lam: float,
    memory: torch.Tensor | None = None,
    side: str = "auto",
) -> CoreSolution:
    """Ridge solve for the Tucker core, on the smaller side (Woodbury / push-through identity).

        T side       (T <= r_e*r_in, no memory):  A = (Phi Phi^T + lam I_T)^{-1} Phi,  G_flat = R~^T A
        feature side (otherwise):                  G_flat = R~^T Phi (Phi^T Phi + M + lam I)^{-1}

    Both sides give the same minimiser; with a memory M the feature side is the only exact one.

    Args:
        routed: the batch's routing and keys `[T, K, h]`, already projected (`RoutedKeys.projected`).
        residuals: `[T, d]` R, target output minus current output at each edit.
        factors: TuckerFactors U_e `[E, r_e]`, U_out `[d, r_out]`, U_in `[h, r_in]` (orthonormal).
        lam: ridge lambda, > 0.
        memory: optional PSD `[r_e*r_in, r_e*r_in]`, sum of phi phi^T over past edits whose outputs the
            solve must keep (zero target residual); see `update_memory`.
        side: "auto" (the smaller one), "T" or "feature" (forced; "T" is refused with a memory).

    Returns:
        CoreSolution with G_flat `[r_out, r_e*r_in]`.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if side not in ("auto", "T", "feature"):
        raise ValueError(f"side must be 'auto', 'T' or 'feature', got {side!r}")
    if side == "T" and memory is not None:
        raise ValueError("the T side cannot include a memory; use side='feature' or 'auto'")
    dtype = _result_dtype(routed.keys, residuals)
    _, U_out, _ = factors
    Phi = core_features(routed, factors)  # [T, n]
    T, n = Phi.shape
    R_tilde = residuals.to(torch.float64) @ U_out.to(device=Phi.device, dtype=torch.float64)  # [T, r_out]

    if side == "auto":
        side = "T" if memory is None and T <= n else "feature"
    A = G_flat = None
    if side == "T":
        gram_T = Phi @ Phi.T + lam * torch.eye(T, dtype=Phi.dtype, device=Phi.device)  # [T, T]
        A = spd_solve(gram_T, Phi)  # [T, n]; G_flat = R~^T A, formed only when asked for
    else:
        gram_n = Phi.T @ Phi + lam * torch.eye(n, dtype=Phi.dtype, device=Phi.device)  # [n, n]
        if memory is not None:
            gram_n = gram_n + memory.to(device=Phi.device, dtype=torch.float64)
        G_flat = spd_solve(gram_n, Phi.T @ R_tilde).T  # [r_out, n]

    return CoreSolution(
        R_tilde=R_tilde.to(dtype),
        Phi=Phi.to(dtype),
        A=None if A is None else A.to(dtype),
        side=side,
        G=None if G_flat is None else G_flat.to(dtype),
    )


def update_memory(memory: torch.Tensor | None, Phi: torch.Tensor) -> torch.Tensor:
    """Add a batch of edit features to the sequential-editing memory: M <- M + Phi^T Phi.

    memory: `[n, n]` or None (empty), Phi: `[T, n]` -> `[n, n]` (float64).
    """
    Phi = Phi.to(torch.float64)
    update = Phi.T @ Phi  # [n, n]
    return update if memory is None else memory.to(torch.float64) + update


def key_maps_of(factors: TuckerFactors, P: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The key maps U_in^T P_j of every expert, computed once per layer: `[E, r_in, h]` (P None: P_j = I). Expert j's
    map takes a raw key to the core's input coordinates (projection, then U_in).

    Computed in float64, returned in `dtype`. Pass the result as `key_maps` to `lowrank_update`.
    """
    U_in = factors.U_in.to(torch.float64)  # [h, r_in]
    if P is None:
        num_experts = factors.U_e.shape[0]
        return U_in.T.to(dtype).unsqueeze(0).expand(num_experts, -1, -1)  # [E, r_in, h]
    U_in = U_in.to(P.device)
    return torch.einsum("hi,ehk->eik", U_in, P.to(torch.float64)).to(dtype)  # [E, r_in, h]


def lowrank_update(
    solution: CoreSolution,
    factors: TuckerFactors,
    P: torch.Tensor | None,
    scale: float = 1.0,
    key_maps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The writeback in low-rank form: Delta W_j = left @ right[j].

        Delta W_j = scale * U_out (sum_a U_e[j, a] G_a) U_in^T P_j

    Two equivalent factorisations, the one with the smaller inner rank is used:
        * rank T (T side solved and T <= r_out): since G_flat = R~^T A,
              sum_a U_e[j, a] G_a = R~^T B_j,  B_j = sum_a U_e[j, a] A[:, a, :]  # [T, r_in]
              left = scale * U_out R~^T  # [d, T],   right_j = B_j (U_in^T P_j)  # [T, h]
        * rank r_out: left = scale * U_out  # [d, r_out],   right_j = G_(j) (U_in^T P_j)  # [r_out, h]
              with G_(j) = sum_a U_e[j, a] G_a  # [r_out, r_in]

    Args:
        solution: from `solve_core`.
        factors: the same TuckerFactors.
        P: `[E, h, h]` null-space projectors, or None for P_j = I.
        scale: multiplies the update (multi-layer spread: 1 / (L - l + 1)).
        key_maps: optional precomputed `[E, r_in, h]` U_in^T P_j (reused across batches; `key_maps_of`).

    Returns:
        left `[d, r]`, right `[E, r, h]`.
    """
    U_e, U_out, U_in = factors
    r_e = U_e.shape[1]
    r_in = U_in.shape[1]
    dtype, device = solution.R_tilde.dtype, solution.R_tilde.device
    U_e, U_out = U_e.to(device=device, dtype=dtype), U_out.to(device=device, dtype=dtype)

    T, r_out = solution.R_tilde.shape
    if solution.A is not None and T <= r_out:
        A = solution.A.reshape(T, r_e, r_in)  # [T, r_e, r_in]
        B = torch.einsum("ja,tai->jti", U_e, A)  # [E, T, r_in]
        left = scale * (U_out @ solution.R_tilde.T)  # [d, T]
    else:
        G = solution.G_flat.reshape(r_out, r_e, r_in)  # [r_out, r_e, r_in]
        B = torch.einsum("ja,oai->joi", U_e, G)  # [E, r_out, r_in]
        left = scale * U_out  # [d, r_out]
    if key_maps is not None:
        return left, B @ key_maps.to(device=device, dtype=dtype)  # [E, r, h]
    # no U_in^T P_j at hand (a basis taken for one batch): (B_j U_in^T) P_j, E r h (r_in + h) flops instead of the
    # E r_in h^2 of U_in^T P_j
    right = B @ U_in.to(device=device, dtype=dtype).T  # [E, r, h]
    return left, right if P is None else right @ P.to(device=device, dtype=dtype)
