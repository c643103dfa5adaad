"""Reference implementations the tests check the library against (written out directly, slow, for small inputs):
`direct_ridge` (the core solve), and `bcd_published` (MoEEdit's BCD as published, benchmarks/moeedit_bcd.py: the speed
benchmark times it too)."""

import sys
from pathlib import Path

import torch

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
