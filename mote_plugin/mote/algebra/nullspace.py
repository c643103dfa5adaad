"""Per-expert null-space projectors (AlphaEdit, applied expert by expert; docs/method.md, "Null space").

For each expert j of an edited layer we know the uncentred second moment of the keys the expert saw on
preservation text,

    C_j = E[k k^T] = V_j diag(s_j) V_j^T        # [h, h], eigenvalues s_j >= 0

Updates are written as Delta_j P_j with P_j the orthogonal projector onto the *low-energy* eigen-directions
of C_j, so that a preserved key k (which lives, up to a small residue, in the high-energy directions)
sees Delta_j P_j k ~= 0. Two rules pick the kept directions:

* "absolute" (AlphaEdit): keep the eigenvectors with eigenvalue s < threshold (AlphaEdit: 2e-2).
  Depends on the scale of the keys.
* "relative": remove the leading eigen-directions that together carry a (1 - threshold) share of
  trace(C_j) (threshold 1e-2 => remove the directions holding 99% of the energy) and keep the rest.
  Invariant to the scale of the keys, hence robust across layers and rarely routed experts.

Both rules keep the k smallest eigen-directions, for a k read off the eigenvalues; the projector is formed from the
smaller side of that cut,

    P_j = V_kept V_kept^T   (k <= h - k)      or      P_j = I - V_removed V_removed^T   (otherwise).

A third rule is not a projection but MEMIT's preservation term on each routed expert:

* "covariance" (MEMIT): P_j = (C_j + eps_j I)^{-1/2}, eps_j = threshold * trace(C_j) / h. Solving the ridge
  (lambda ||Delta'||^2) on the keys P_j k and writing Delta' P_j is solving

      min_Delta  sum_t || r_t - sum_j g_tj Delta_j k_tj ||^2 + lambda sum_j tr(Delta_j (C_j + eps_j I) Delta_j^T)

  i.e. MEMIT's objective with mom2_update_weight = lambda, its key covariance per expert (over the preservation
  tokens routed to it, ungated), and a small ridge eps_j that keeps C_j invertible. Symmetric, not idempotent: every
  writer applies P_j once more to the update it solved (`ExpertUpdate.projected`, `lowrank_update`).

Pure tensor functions: the eigen-decompositions run in float64, one per expert, side by side over the CPU threads
(`eig.run_side_by_side`); the projectors come back as float32 on the device of the inputs.
"""

from __future__ import annotations

import torch

from .eig import run_side_by_side

RULES = ("relative", "absolute", "covariance")
FALLBACKS = ("freeze", "identity")
DEFAULT_THRESHOLD = {"relative": 1e-2, "absolute": 2e-2, "covariance": 1e-3}


def nullspace_projectors(
    moments: torch.Tensor,
    counts: torch.Tensor,
    rule: str = "relative",
    threshold: float | None = None,
    min_tokens: int = 1,
    fallback: str = "freeze",
) -> torch.Tensor:
    """Orthogonal projectors onto the null space of each expert's key moment.

        C_j = V_j diag(s_j) V_j^T,   P_j = V_j diag(m_j) V_j^T,   m_j[i] in {0, 1} (kept directions)

    Args:
        moments: `[E, h, h]` uncentred second moments E[k k^T] of the keys routed to each expert
            (already divided by the counts). Rows of experts below `min_tokens` are ignored (they may
            hold NaN from a 0/0 division).
        counts: `[E]` number of tokens behind each moment.
        rule: "relative" (default) or "absolute", see the module docstring.
        threshold: "relative": the share of the trace that may remain un-removed (default 1e-2, i.e.
            the directions carrying 99% of the energy are removed); must be in (0, 1].
            "absolute": eigenvalue cut-off, directions with s < threshold are kept (default 2e-2).
            "covariance": the ridge eps_j added to C_j, as a share of its mean eigenvalue (default 1e-3).
        min_tokens: experts with `counts < min_tokens` have no usable statistics and get the fallback.
        fallback: what an expert without statistics gets:
            * "freeze" (default): P_j = 0, the expert is never edited, because nothing is known about
              what it must preserve;
            * "identity": P_j = I, the expert is edited without any protection.

    An expert with enough tokens but an all-zero moment (its keys were all zero) has nothing to protect
    and gets P_j = I under both rules.

    Returns:
        `[E, h, h]` float32 symmetric matrices on the device of `moments`: idempotent projectors, or (rule
        "covariance") the inverse square roots (C_j + eps_j I)^{-1/2}.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if threshold is None:
        threshold = DEFAULT_THRESHOLD[rule]
    if rule == "relative" and not 0.0 < threshold <= 1.0:
        raise ValueError(f"relative threshold must be in (0, 1], got {threshold}")
    if moments.ndim != 3 or moments.shape[1] != moments.shape[2]:
        raise ValueError(f"moments must be [E, h, h], got {tuple(moments.shape)}")
    num_experts, hidden, _ = moments.shape
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must be [E] = [{num_experts}], got {tuple(counts.shape)}")

    has_stats = (counts >= min_tokens).tolist()  # [E]
    P = torch.empty(num_experts, hidden, hidden, dtype=torch.float32, device=moments.device)  # [E, h, h]
    for j in range(num_experts):
        if not has_stats[j]:  # no usable statistics (the moment may hold NaN from 0/0)
            P[j] = torch.eye(hidden) if fallback == "identity" else 0.0

    def expert(j: int) -> None:  # float64 work of one expert: a few [h, h]
        P[j] = _projector(moments[j], rule, threshold)

    run_side_by_side([lambda j=j: expert(j) for j in range(num_experts) if has_stats[j]], moments.device)
    return P


def kept_directions(evals: torch.Tensor, rule: str, threshold: float) -> int:
    """How many of the smallest eigen-directions the rule keeps. evals: `[h]` ascending, >= 0 (float64)."""
    if rule == "absolute":
        return int((evals < threshold).sum())
    # Walk the eigenvalues from the largest down; direction i is removed while the energy of the directions
    # strictly before it is below (1 - threshold) * trace.
    desc = evals.flip(-1)  # [h] descending
    energy_before = desc.cumsum(-1) - desc  # [h]
    trace = desc.sum()
    if not trace > 0:  # all-zero moment: nothing to protect
        return evals.numel()
    return evals.numel() - int((energy_before < (1.0 - threshold) * trace).sum())


def _projector(moment: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    """P_j of one expert with statistics: moment `[h, h]` -> `[h, h]` float32, on the moment's device."""
    hidden = moment.shape[0]
    C = moment.to(torch.float64)  # [h, h]
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))  # [h] ascending, [h, h]; exact symmetry for eigh
    if rule == "covariance":
        evals = evals.clamp_min(0.0)
        eps = threshold * evals.sum() / hidden
        if not eps > 0:  # all-zero moment: nothing to protect
            return torch.eye(hidden, dtype=torch.float32, device=moment.device)
        return ((evecs * (evals + eps).rsqrt()) @ evecs.T).to(torch.float32)  # [h, h] (C + eps I)^{-1/2}
    kept = kept_directions(evals.clamp_min(0.0), rule, threshold)
    if kept <= hidden - kept:
        V = evecs[:, :kept]  # [h, k] the kept (smallest) directions
        P = V @ V.T  # [h, h]
    else:
        V = evecs[:, kept:]  # [h, h - k] the removed (largest) directions
        P = torch.eye(hidden, dtype=V.dtype, device=V.device) - V @ V.T  # [h, h]
    return P.to(torch.float32)


def preserved_energy(P: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """Share of each expert's key energy that passes its projector (for reports).

        e_j = trace(P_j C_j P_j) / trace(C_j) = E||P_j k||^2 / E||k||^2

    Args:
        P: `[E, h, h]` projectors.
        moments: `[E, h, h]` the second moments C_j.

    Returns:
        `[E]` float32, in [0, 1] for projectors; NaN where trace(C_j) = 0 (no energy to speak of, e.g.
        an expert without tokens).
    """
    P64 = P.to(torch.float64)  # [E, h, h]
    C = moments.to(device=P.device, dtype=torch.float64)  # [E, h, h]
    passed = torch.einsum("eij,ejk,eik->e", P64, C, P64)  # [E] trace(P C P^T)
    total = torch.diagonal(C, dim1=1, dim2=2).sum(-1)  # [E]
    share = torch.where(total > 0, passed / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)
    return share.to(torch.float32)  # [E]
