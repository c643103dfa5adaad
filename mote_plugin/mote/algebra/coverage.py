"""How much of one batch's edit a Tucker basis can carry: energy shares per edit (method.md, "Coverage").

MoTE writes Delta W_j = U_out (sum_a U_e[j, a] G_a) U_in^T P_j, so it can only move the layer's output inside
span(U_out), read the keys inside span(U_in) and spread the update over experts inside span(U_e). For a batch of T
edits at one layer, with residuals R [T, d], null-space-projected keys k~ [T, K, h] and gates g [T, K] of the routed
experts idx [T, K], the shares are per edit t:

    residual in U_out   ||U_out^T r_t||^2 / ||r_t||^2
    keys in U_in        sum_k ||U_in^T g_tk k~_tk||^2 / sum_k ||g_tk k~_tk||^2
    gates in U_e        ||U_e^T g_t||^2 / ||g_t||^2,   g_t [E] the dense gate vector (zero off the top-k)
    reproduced          <c_t, r_t> / ||r_t||^2,   c_t = sum_k g_tk Delta_{idx_tk} k_tk the output change the written
                        update predicts at the layer (1: the layer's output moves exactly by r_t)

An edit with nothing to cover (a zero residual, or keys the null space removed entirely) counts as covered (share 1):
whether anything could be written then shows in `reproduced`. `reproduced` leaves out the edits whose residual is
under 1% of the batch's largest in norm (in the residual spread an edit the layers below already moved to its target
has almost nothing left, and a share of almost nothing is noise). Pure tensor functions, float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routed_keys import RoutedKeys
from .tucker import TuckerFactors

SHARES = ("residual_in_U_out", "keys_in_U_in", "gates_in_U_e", "reproduced")  # what a Coverage measures, in order


def prefix_shares(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Share of each edit's energy in the span of U's first r columns, for every r.

    X: `[T, M, n]` M vectors per edit (residuals and gate vectors: M = 1, keys: M = K), U: `[n, R]` orthonormal
    columns -> `[T, R]` (column r - 1: the share in span(U[:, :r]); non-decreasing along a row).
    """
    X = X.to(torch.float64)
    inside = ((X @ U.to(device=X.device, dtype=torch.float64)) ** 2).sum(1).cumsum(1)  # [T, R]
    total = (X**2).sum((1, 2))  # [T]
    return torch.where(total[:, None] > 0, inside / total.clamp_min(1e-300)[:, None], torch.ones_like(inside))


def mode_vectors(routed: RoutedKeys, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each factor must hold, per edit, as `prefix_shares` reads it: (gate vectors `[T, 1, E]`, residuals
    `[T, 1, d]`, gated projected keys `[T, K, h]`), in the modes' order (e, out, in). routed: the batch's projected
    keys."""
    return routed.dense_gates().unsqueeze(1), residuals.to(torch.float64).unsqueeze(1), routed.gated()


def reproduced_shares(change: torch.Tensor, residuals: torch.Tensor, negligible: float = 1e-2) -> torch.Tensor:
    """<c_t, r_t> / ||r_t||^2 per edit, NaN where ||r_t|| is under `negligible` times the batch's largest (1 when
    every residual is zero). change, residuals: `[T, d]` -> `[T]`."""
    change, residuals = change.to(torch.float64), residuals.to(torch.float64)
    total = (residuals**2).sum(1)  # [T]
    if not bool((total > 0).any()):
        return torch.ones_like(total)
    shares = (change * residuals).sum(1) / total.clamp_min(1e-300)  # [T]
    return torch.where(total >= negligible**2 * total.max(), shares, torch.full_like(shares, float("nan")))


@dataclass(frozen=True)
class Share:
    """A share over the edits of a batch: its mean and its smallest value."""

    mean: float
    min: float

    @classmethod
    def of(cls, shares: torch.Tensor) -> "Share":
        """Over the edits with a share (NaN: left out)."""
        shares = shares[~shares.isnan()]
        return cls(float(shares.mean()), float(shares.min()))


@dataclass(frozen=True)
class Coverage:
    """What one solve's basis held of its batch, and how much of each residual the written update reproduces."""

    layer: int  # the solve layer (keys captured and residuals measured there)
    edits: int  # T
    ranks: tuple[int, int, int] | None  # (r_e, r_out, r_in) solved in; None: an unstructured solver (no basis)
    residual_in_U_out: Share | None
    keys_in_U_in: Share | None
    gates_in_U_e: Share | None
    reproduced: Share

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "edits": self.edits, "ranks": list(self.ranks) if self.ranks else None}
        for name in SHARES:
            share = getattr(self, name)
            out[name] = None if share is None else {"mean": share.mean, "min": share.min}
        return out


def summarise(solves: list[dict]) -> dict:
    """Several solves' coverage (`Coverage.to_dict`, e.g. every batch of a run) in one: per share the mean of the
    solves' means and the smallest edit's share (left out where no solve measured it); `ranks` the (r_e, r_out, r_in)
    solved in, the smallest and the largest (left out for the unstructured solvers)."""
    out = {}
    for key in SHARES:
        shares = [c[key] for c in solves if c[key] is not None]
        if shares:
            out[key] = {"mean": sum(s["mean"] for s in shares) / len(shares), "min": min(s["min"] for s in shares)}
    ranks = sorted({tuple(c["ranks"]) for c in solves if c["ranks"]})
    if ranks:
        out["ranks"] = [list(ranks[0]), list(ranks[-1])]
    return out


def measure_coverage(layer: int, factors: TuckerFactors | None, routed: RoutedKeys, residuals: torch.Tensor,
                     change: torch.Tensor) -> Coverage:
    """The coverage of one solve.

    factors: the basis solved in (None for the unstructured solvers), routed: the batch's null-space-projected keys
    `[T, K, h]`, residuals: `[T, d]` what the solve aimed at, change: `[T, d]` the output change the written update
    predicts (`ExpertUpdate.output_change`).
    """
    shares = [None, None, None]
    if factors is not None:
        vectors = mode_vectors(routed, residuals)
        shares = [Share.of(prefix_shares(X, U)[:, -1]) for X, U in zip(vectors, factors)]
    return Coverage(layer=layer, edits=residuals.shape[0], ranks=factors.ranks if factors is not None else None,
                    residual_in_U_out=shares[1], keys_in_U_in=shares[2], gates_in_U_e=shares[0],
                    reproduced=Share.of(reproduced_shares(change, residuals)))
