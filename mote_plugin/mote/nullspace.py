"""Per-expert null-space projectors (AlphaEdit, applied expert by expert; method.md section 3).

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

Pure tensor functions: the eigen-decomposition runs in float64, the projectors come back as float32 on
the device of the inputs.
"""

from __future__ import annotations

import torch


RULES = ("relative", "absolute")
FALLBACKS = ("freeze", "identity")
DEFAULT_THRESHOLD = {"relative": 1e-2, "absolute": 2e-2}
CHUNK_EXPERTS = 8  # experts whose eigen-decompositions run together (float64 work ~5 x 8 x h^2 x 8 bytes)


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
        min_tokens: experts with `counts < min_tokens` have no usable statistics and get the fallback.
        fallback: what an expert without statistics gets:
            * "freeze" (default): P_j = 0, the expert is never edited, because nothing is known about
              what it must preserve;
            * "identity": P_j = I, the expert is edited without any protection.

    An expert with enough tokens but an all-zero moment (its keys were all zero) has nothing to protect
    and gets P_j = I under both rules.

    Returns:
        `[E, h, h]` float32 symmetric idempotent projectors on the device of `moments`.
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

    has_stats = counts.to(moments.device) >= min_tokens  # [E]
    P = torch.empty(num_experts, hidden, hidden, dtype=torch.float32, device=moments.device)  # [E, h, h]
    for start in range(0, num_experts, CHUNK_EXPERTS):  # float64 work for a few experts at a time, not [E, h, h]
        part = slice(start, start + CHUNK_EXPERTS)
        P[part] = _projectors(moments[part], has_stats[part], rule, threshold, fallback)
    return P


def _projectors(moments: torch.Tensor, has_stats: torch.Tensor, rule: str, threshold: float, fallback: str) -> torch.Tensor:
    """`nullspace_projectors` of a chunk of n experts: moments `[n, h, h]`, has_stats `[n]` -> `[n, h, h]` float32."""
    hidden = moments.shape[1]
    C = moments.to(torch.float64)  # [n, h, h]
    C = torch.where(has_stats[:, None, None], C, torch.zeros_like(C))  # experts w/o stats: drop NaNs
    C = 0.5 * (C + C.transpose(1, 2))  # [n, h, h] exact symmetry for eigh
    evals, evecs = torch.linalg.eigh(C)  # [n, h] ascending, [n, h, h]
    evals = evals.clamp_min(0.0)  # [n, h]

    if rule == "absolute":
        keep = evals < threshold  # [n, h]
    else:
        # Walk the eigenvalues from the largest down; direction i is removed while the energy of the
        # directions strictly before it is below (1 - threshold) * trace.
        desc = evals.flip(-1)  # [n, h] descending
        energy_before = desc.cumsum(-1) - desc  # [n, h]
        trace = desc.sum(-1, keepdim=True)  # [n, 1]
        removed_desc = energy_before < (1.0 - threshold) * trace  # [n, h]
        removed_desc &= trace > 0  # all-zero moment: nothing to protect
        keep = ~removed_desc.flip(-1)  # [n, h] back to ascending order

    P = torch.einsum("eik,ek,ejk->eij", evecs, keep.to(evecs.dtype), evecs)  # [n, h, h]
    fallback_P = torch.eye(hidden, dtype=P.dtype, device=P.device) if fallback == "identity" else 0.0
    P = torch.where(has_stats[:, None, None], P, fallback_P)  # [n, h, h]
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
