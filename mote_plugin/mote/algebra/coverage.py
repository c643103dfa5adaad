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
    keys kept           sum_k ||g_tk P_j k_tk||^2 / sum_k ||g_tk k_tk||^2   the share of the keys' energy that passes
                        the null-space projectors (0: nothing of the edit can be written, whatever the basis)

and per expert j of the batch the same kept share over the keys routed to it, with the experts whose projector is
zero (an empty null space: such an expert is never edited).

An edit with nothing to cover in a mode (a zero residual or zero gates) counts as covered there (share 1); an edit
whose keys the null space removed entirely has no share in U_in (left out of `keys_in_U_in`, which is None when no
edit has one): `keys_kept` says why. `reproduced` leaves out the edits whose residual is
under 1% of the batch's largest in norm (in the residual spread an edit the layers below already moved to its target
has almost nothing left, and a share of almost nothing is noise). Pure tensor functions, float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routed_keys import RoutedKeys
from .tucker import TuckerFactors

# what a Coverage measures, in order
SHARES = ("keys_kept", "residual_in_U_out", "keys_in_U_in", "gates_in_U_e", "reproduced")


def prefix_shares(X: torch.Tensor, U: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """Share of each edit's energy in the span of U's first r columns, for every r.

    X: `[T, M, n]` M vectors per edit (residuals and gate vectors: M = 1, keys: M = K), U: `[n, R]` orthonormal
    columns -> `[T, R]` (column r - 1: the share in span(U[:, :r]); non-decreasing along a row). An edit with no
    energy gets `empty` (1: nothing to hold is held; NaN: no share).
    """
    X = X.to(torch.float64)
    inside = ((X @ U.to(device=X.device, dtype=torch.float64)) ** 2).sum(1).cumsum(1)  # [T, R]
    total = (X**2).sum((1, 2))  # [T]
    return torch.where(total[:, None] > 0, inside / total.clamp_min(1e-300)[:, None], torch.full_like(inside, empty))


def kept_shares(captured: RoutedKeys, projected: RoutedKeys) -> tuple[torch.Tensor, dict[int, float]]:
    """The share of the gated keys' energy that passes the null-space projectors: per edit `[T]` (1 for an edit
    with zero keys) and per expert of the batch {j: share} (over the keys routed to j). captured: the keys as
    captured `[T, K, h]`; projected: the same routing with projected keys."""
    before = (captured.gated() ** 2).sum(-1)  # [T, K]
    after = (projected.gated() ** 2).to(before.device).sum(-1)  # [T, K]
    total = before.sum(1)  # [T]
    per_edit = torch.where(total > 0, after.sum(1) / total.clamp_min(1e-300), torch.ones_like(total))
    per_expert = {}
    for j, rows, slots in captured.groups():
        energy = float(before[rows, slots].sum())
        per_expert[j] = float(after[rows, slots].sum()) / energy if energy > 0 else 1.0
    return per_edit, per_expert


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
    def of(cls, shares: torch.Tensor) -> "Share | None":
        """Over the edits with a share (NaN: left out); None when no edit has one."""
        shares = shares[~shares.isnan()]
        return cls(float(shares.mean()), float(shares.min())) if shares.numel() else None


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
    keys_kept: Share  # the keys' energy past the null-space projectors
    kept_by_expert: dict[int, float]  # the same per expert of the batch
    empty_nullspace: tuple[int, ...]  # the layer's experts whose projector is zero (never edited)

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "edits": self.edits, "ranks": list(self.ranks) if self.ranks else None}
        for name in SHARES:
            share = getattr(self, name)
            out[name] = None if share is None else {"mean": share.mean, "min": share.min}
        out["kept_by_expert"] = {str(j): share for j, share in self.kept_by_expert.items()}  # JSON keys
        out["empty_nullspace"] = list(self.empty_nullspace)
        return out


def summarise(solves: list[dict]) -> dict:
    """Several solves' coverage (`Coverage.to_dict`, e.g. every batch of a run) in one: per share the mean of the
    solves' means and the smallest edit's share (left out where no solve measured it); `ranks` the (r_e, r_out, r_in)
    solved in, the smallest and the largest (left out for the unstructured solvers)."""
    out = {}
    for key in SHARES:
        shares = [c[key] for c in solves if c.get(key) is not None]
        if shares:
            out[key] = {"mean": sum(s["mean"] for s in shares) / len(shares), "min": min(s["min"] for s in shares)}
    ranks = sorted({tuple(c["ranks"]) for c in solves if c["ranks"]})
    if ranks:
        out["ranks"] = [list(ranks[0]), list(ranks[-1])]
    return out


def measure_coverage(layer: int, factors: TuckerFactors | None, routed: RoutedKeys, residuals: torch.Tensor,
                     change: torch.Tensor, captured: RoutedKeys | None = None,
                     nullspace_dims: torch.Tensor | None = None) -> Coverage:
    """The coverage of one solve.

    factors: the basis solved in (None for the unstructured solvers), routed: the batch's null-space-projected keys
    `[T, K, h]`, residuals: `[T, d]` what the solve aimed at, change: `[T, d]` the output change the written update
    predicts (`ExpertUpdate.output_change`), captured: the keys before the projection (default: `routed`, nothing
    removed), nullspace_dims: `[E]` the dimension of each expert's null space (default: none empty).
    """
    shares = [None, None, None]
    if factors is not None:
        vectors = mode_vectors(routed, residuals)
        empty = (1.0, 1.0, float("nan"))  # keys the projectors removed entirely have no share in U_in
        shares = [Share.of(prefix_shares(X, U, e)[:, -1]) for X, U, e in zip(vectors, factors, empty)]
    kept, by_expert = kept_shares(captured if captured is not None else routed, routed)
    empty_nullspace = () if nullspace_dims is None else tuple(torch.where(nullspace_dims == 0)[0].tolist())
    return Coverage(layer=layer, edits=residuals.shape[0], ranks=factors.ranks if factors is not None else None,
                    residual_in_U_out=shares[1], keys_in_U_in=shares[2], gates_in_U_e=shares[0],
                    reproduced=Share.of(reproduced_shares(change, residuals)), keys_kept=Share.of(kept),
                    kept_by_expert=by_expert, empty_nullspace=empty_nullspace)
