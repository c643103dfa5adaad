"""The Tucker basis one batch is solved in (YAML `basis:` and `auto` ranks; method.md, "The basis of a batch").

The layer's factors come from its weights (tucker.py) and are fixed for the model. A batch may be solved in them as
they are (`basis: weights`, the paper's), or in factors taken for that batch:

    auto ranks      a mode whose rank is `auto` keeps the fewest leading factors whose span holds, on average over the
                    batch's edits, `min_coverage` of what that mode must carry (coverage.py): the residuals (U_out),
                    the gated projected keys (U_in), the gate vectors (U_e). The layer keeps that mode's full factor.
    weights+edit    U_out spans the weights' factors and the batch's residuals, U_in the weights' factors and the
                    batch's projected keys (orthonormalised, the weights' columns first); U_e stays the weights'.
    weights+edit+gates   the same, and U_e spans the weights' factors and the batch's gate vectors g_t [E].

With U_out holding every residual and U_in every key, the restricted ridge problem loses nothing in those two modes:
the solution is that of r_out = d, r_in = h, and only the expert mode (r_e of E) constrains it; at r_e = E it is the
unstructured (Global) ridge. Pure tensor functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .coverage import mode_vectors, prefix_shares
from .routed_keys import RoutedKeys
from .tucker import TuckerFactors

BASES = ("weights", "weights+edit", "weights+edit+gates")


@dataclass(frozen=True)
class BasisRule:
    """How a batch's factors are taken from its layer's."""

    basis: str = "weights"  # weights | weights+edit | weights+edit+gates
    auto: tuple[bool, bool, bool] = (False, False, False)  # (e, out, in): rank chosen per batch from coverage
    min_coverage: float = 0.9  # the share an `auto` mode must hold, mean over the batch's edits

    @property
    def fixed(self) -> bool:
        """Every batch is solved in the layer's own factors."""
        return self.basis == "weights" and not any(self.auto)


def leading_rank(shares: torch.Tensor, target: float) -> int:
    """The fewest leading factors whose mean share over the edits reaches `target` (all of them when none does).

    shares: `[T, R]` from `prefix_shares`."""
    reached = (shares.mean(0) >= target).nonzero()  # [n_reached, 1]
    return int(reached[0]) + 1 if len(reached) else shares.shape[1]


def extend(U: torch.Tensor, X: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis of span(U) + span of the rows of X, U's columns first.

    U: `[n, r]` orthonormal columns, X: `[m, n]` -> `[n, r + k]`, k <= min(m, n - r) the new directions (singular
    values of X's part outside span(U) above rtol times X's largest row norm). Float32, as the factors.
    """
    U64, X64 = U.to(torch.float64), X.to(device=U.device, dtype=torch.float64).T  # [n, r], [n, m]
    scale = float(X64.norm(dim=0).max()) if X64.numel() else 0.0
    for _ in range(2):  # twice: Gram-Schmidt against U loses orthogonality once
        X64 = X64 - U64 @ (U64.T @ X64)
    if scale == 0.0:
        return U
    Q, S, _ = torch.linalg.svd(X64, full_matrices=False)  # [n, min(n, m)], [min(n, m)]
    new = Q[:, S > rtol * scale][:, : U.shape[0] - U.shape[1]]  # [n, k]
    return torch.cat([U64, new], dim=1).to(U.dtype)


def batch_factors(layer_factors: TuckerFactors, rule: BasisRule, routed: RoutedKeys,
                  residuals: torch.Tensor) -> TuckerFactors:
    """The factors this batch is solved in.

    layer_factors: the layer's (full size in the `auto` modes), routed: the batch's null-space-projected keys
    `[T, K, h]`, residuals: `[T, d]`.
    """
    vectors = mode_vectors(routed, residuals)  # e, out, in
    factors = list(layer_factors)
    for mode, (U, X, auto) in enumerate(zip(layer_factors, vectors, rule.auto)):
        if auto:
            factors[mode] = U[:, : leading_rank(prefix_shares(X, U), rule.min_coverage)]
    if rule.basis != "weights":
        factors[1] = extend(factors[1], residuals)  # [d, r_out + k]
        factors[2] = extend(factors[2], routed.keys.reshape(-1, routed.keys.shape[-1]))  # [h, r_in + k]
    if rule.basis == "weights+edit+gates":
        factors[0] = extend(factors[0], vectors[0].reshape(-1, vectors[0].shape[-1]))  # [E, r_e + k]
    return TuckerFactors(*factors)
