"""The per-layer solvers an edit can use (YAML `solver:`), behind one interface.

    mote    the Tucker core, Woodbury on the smaller side (core_solve.py; the default)
    global  the unstructured ridge over all experts, T x T Woodbury, routed experts only (baselines.py)
    bcd     MoEEdit's block-coordinate descent over experts (baselines.py)

`solve_batch` turns the keys captured at one layer into a `LayerSolution` (MoTE: in the factors `batch_basis.py` takes
for the batch); `LayerSolution.update(basis, layer, scale)`
gives the `ExpertUpdate` to write into a layer with that `LayerBasis`: the solve layer itself or, in the `core` spread,
another layer (MoTE writes its core G with that layer's Tucker factors and projectors; the unstructured solvers
write their expert-space update through that layer's projectors, Delta_j P_j).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .baselines import bcd_solve, global_solve
from .batch_basis import BasisRule, batch_factors
from .core_solve import CoreSolution, lowrank_update, solve_core, update_memory
from .coverage import Coverage, measure_coverage
from .routed_keys import RoutedKeys
from .tucker import TuckerFactors
from .update import ExpertUpdate

SOLVERS = ("mote", "global", "bcd")


@dataclass
class LayerBasis:
    """What the solve needs of one layer, fixed for a model: projectors, factors, U_in^T P_j."""

    P: torch.Tensor  # [E, h, h] null-space projectors (identity when the null space is off)
    # U_e [E, r_e], U_out [d, r_out], U_in [h, r_in], full size in `auto` modes (None: solver without factors)
    factors: TuckerFactors | None
    key_maps: torch.Tensor | None  # [E, r_in, h] U_in^T P_j (None with `auto` ranks: each batch's own is computed)


@dataclass
class LayerSolution:
    routed: RoutedKeys  # the batch's null-space-projected keys [T, K, h], solved on
    core: CoreSolution | None = None  # solver "mote"
    factors: TuckerFactors | None = None  # solver "mote": the factors the core was solved in (the batch's)
    key_maps: torch.Tensor | None = None  # [E, r_in, h] U_in^T P_j of those factors when the layer's (else computed)
    expert_update: ExpertUpdate | None = None  # solvers "global" / "bcd": the update at the solve layer
    layer: int | None = None  # the layer solved at
    nullspace_dims: torch.Tensor | None = None  # [E] long, the dimension of each expert's null space (rank of P_j)

    def update(self, basis: LayerBasis, layer: int, scale: float) -> ExpertUpdate:
        """The update for `layer` (whose LayerBasis is `basis`), multiplied by `scale`."""
        if self.core is not None:
            factors, key_maps = self.factors, self.key_maps
            if layer != self.layer:  # the core spread: the same core in that layer's factors, at these ranks
                factors = basis.factors.truncated(self.factors.ranks)
                key_maps = basis.key_maps if basis.factors.ranks == factors.ranks else None
            left, right = lowrank_update(self.core, factors, basis.P, scale=scale, key_maps=key_maps)
            return ExpertUpdate(left=left, right=right)
        # solved on the keys P_j k: written as Delta_j P_j (for a projector the same as the solved update)
        return self.expert_update.projected(basis.P).scaled(scale)

    def coverage(self, update: ExpertUpdate, routed: RoutedKeys, residuals: torch.Tensor) -> Coverage:
        """What this solve's basis held of its batch, and the share of each residual that `update` (this solution at
        its own layer, scale 1) reproduces there. routed: the batch's keys [T, K, h] as captured; residuals [T, d]."""
        return measure_coverage(self.layer, self.factors, self.routed, residuals, update.output_change(routed),
                                captured=routed, nullspace_dims=self.nullspace_dims)


def solve_batch(solver: str, layer: int, basis: LayerBasis, routed: RoutedKeys, residuals: torch.Tensor, lam: float,
                memory: torch.Tensor | None = None, keep_memory: bool = False, bcd_passes: int = 4,
                bcd_seed: int = 42, rule: BasisRule | None = None) -> tuple[LayerSolution, torch.Tensor | None]:
    """Solve one layer. routed: the batch's keys [T, K, h] as captured at the layer; residuals [T, d]; rule: how
    solver "mote" takes the batch's factors from the layer's (default: as they are).

    Returns the solution and, when `keep_memory`, the sequential memory with this batch added (solver "mote" only).
    """
    routed = routed.projected(basis.P)  # [T, K, h]
    dims = basis.P.diagonal(dim1=1, dim2=2).sum(-1).round().long()  # [E] trace of a projector = its rank
    if solver == "mote":
        factors, key_maps = basis.factors, basis.key_maps
        if rule is not None and not rule.fixed:
            factors = batch_factors(basis.factors, rule, routed, residuals)
            key_maps = None
        core = solve_core(routed, residuals, factors, lam, memory=memory)
        solution = LayerSolution(routed=routed, core=core, factors=factors, key_maps=key_maps, layer=layer,
                                 nullspace_dims=dims)
        return solution, update_memory(memory, core.Phi) if keep_memory else None
    if solver == "global":
        update = global_solve(routed, residuals, lam)
    elif solver == "bcd":
        update = bcd_solve(routed, residuals, lam, passes=bcd_passes, seed=bcd_seed)
    else:
        raise ValueError(f"unknown solver {solver!r}; one of {SOLVERS}")
    return LayerSolution(routed=routed, expert_update=update, layer=layer, nullspace_dims=dims), None
