"""Reference implementations the tests check the library against (written out directly, slow, for small inputs):
`direct_ridge` (the core solve), `predicted_change` and `dense_update` (what a solved core does to the outputs and
weights), `tucker_core` and `reconstruction_error` (what a basis keeps of W), and `bcd_published` (MoEEdit's BCD as
published, benchmarks/moeedit_bcd.py: the speed benchmark times it too); `routed` wraps test tensors as
`RoutedKeys`."""

import sys
from pathlib import Path

import torch

from mote_plugin.mote.algebra.core_solve import CoreSolution, core_features, lowrank_update
from mote_plugin.mote.algebra.routed_keys import RoutedKeys
from mote_plugin.mote.algebra.tucker import TuckerFactors

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from moeedit_bcd import bcd_published  # noqa: E402, F401


def direct_ridge(
    keys: torch.Tensor,
    gates: torch.Tensor,
    expert_idx: torch.Tensor,
    residuals: torch.Tensor,
    factors: TuckerFactors,
    lam: float,
    memory: torch.Tensor | None = None,
) -> torch.Tensor:
    """The core solve's feature-side normal equations written out directly (`solve_core`'s reference).

        G_flat = ((Phi^T Phi + M + lam I)^{-1} Phi^T R~)^T     -> `[r_out, r_e*r_in]` float64
    """
    U_e, U_out, U_in = (U.to(device=keys.device, dtype=torch.float64) for U in factors)
    r_e, r_in = U_e.shape[1], U_in.shape[1]
    T = keys.shape[0]
    Phi = torch.zeros(T, r_e, r_in, dtype=torch.float64, device=keys.device)  # [T, r_e, r_in]
    for t in range(T):
        for k in range(keys.shape[1]):
            j = int(expert_idx[t, k])
            Phi[t] += float(gates[t, k]) * torch.outer(U_e[j], U_in.T @ keys[t, k].to(torch.float64))
    Phi = Phi.reshape(T, r_e * r_in)  # [T, n]
    R_tilde = residuals.to(torch.float64) @ U_out  # [T, r_out]
    normal = Phi.T @ Phi + lam * torch.eye(r_e * r_in, dtype=torch.float64, device=keys.device)  # [n, n]
    if memory is not None:
        normal = normal + memory.to(device=keys.device, dtype=torch.float64)
    return torch.linalg.solve(normal, Phi.T @ R_tilde).T  # [r_out, n]


def routed(keys: torch.Tensor, gates: torch.Tensor, expert_idx: torch.Tensor, num_experts: int | None = None):
    """`RoutedKeys` of test tensors: keys `[T, K, h]`, gates / expert_idx `[T, K]` (num_experts: default one past the
    largest expert id)."""
    E = int(expert_idx.max()) + 1 if num_experts is None else num_experts
    return RoutedKeys(expert_idx, gates, keys, E)


def predicted_change(solution: CoreSolution, factors: TuckerFactors, keys: torch.Tensor, gates: torch.Tensor,
                     expert_idx: torch.Tensor) -> torch.Tensor:
    """The change of the MoE output a solved core predicts at each (projected) key: U_out G_flat phi_t -> `[T, d]`."""
    Phi = core_features(routed(keys, gates, expert_idx), factors).to(solution.G_flat.dtype)  # [T, n]
    U_out = factors.U_out.to(device=Phi.device, dtype=Phi.dtype)  # [d, r_out]
    return Phi @ solution.G_flat.T @ U_out.T  # [T, d]


def dense_update(solution: CoreSolution, factors: TuckerFactors, P: torch.Tensor | None, scale: float = 1.0,
                 key_maps: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit update Delta W `[E, d, h]` of a solved core: left @ right[j] of `lowrank_update`."""
    left, right = lowrank_update(solution, factors, P, scale=scale, key_maps=key_maps)  # [d, r], [E, r, h]
    return torch.einsum("dr,erh->edh", left, right)  # [E, d, h]


def tucker_core(W: torch.Tensor, factors: TuckerFactors) -> torch.Tensor:
    """Core of W in the given (orthonormal) basis, G = W x_e U_e^T x_out U_out^T x_in U_in^T.

    W: `[E, d, h]` -> `[r_e, r_out, r_in]` (float64).
    """
    U_e, U_out, U_in = (U.to(device=W.device, dtype=torch.float64) for U in factors)
    return torch.einsum("jdh,ja,do,hi->aoi", W.to(torch.float64), U_e, U_out, U_in)


def reconstruction_error(W: torch.Tensor, factors: TuckerFactors) -> float:
    """Relative Frobenius error of the Tucker projection of W onto the factors' spans.

        W_hat = G x_e U_e x_out U_out x_in U_in,  G = tucker_core(W, factors);   ||W - W_hat||_F / ||W||_F
    """
    U_e, U_out, U_in = (U.to(device=W.device, dtype=torch.float64) for U in factors)
    G = tucker_core(W, factors)  # [r_e, r_out, r_in]
    W64 = W.to(torch.float64)  # [E, d, h]
    W_hat = torch.einsum("ja,aoi,do,hi->jdh", U_e, G, U_out, U_in)  # [E, d, h]
    return float(torch.linalg.vector_norm(W64 - W_hat) / torch.linalg.vector_norm(W64).clamp_min(1e-300))
