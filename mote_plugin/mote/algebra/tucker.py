"""Tucker basis of the stacked expert down-projections (docs/method.md, "Tucker basis").

The down-projections of one MoE layer form a tensor W in R^{E x d x h} (canonical layout: expert,
out = d_model, in = expert hidden). MoTE writes its update in a fixed Tucker basis,

    Delta W = G x_e U_e x_out U_out x_in U_in,   Delta W_j = U_out (sum_a U_e[j, a] G_a) U_in^T,

and only solves for the small core G in R^{r_e x r_out x r_in}. The factors come from a HOSVD of W
(optionally refined by HOOI sweeps), optionally computed on a whitened W (TD-MoE style).

All factors returned here have ORTHONORMAL columns. Pure tensor functions: Grams and eigen-decompositions
run in float64, factors come back as float32 on the device of W. The eigen-decompositions run single-threaded, the
three modes' side by side (`eig.run_side_by_side`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .eig import run_side_by_side

MODES = ("e", "out", "in")
WHITENINGS = ("none", "in", "out", "both")


class TuckerFactors(NamedTuple):
    """Orthonormal Tucker factors of an [E, d, h] tensor."""

    U_e: torch.Tensor  # [E, r_e]
    U_out: torch.Tensor  # [d, r_out]
    U_in: torch.Tensor  # [h, r_in]

    @property
    def ranks(self) -> tuple[int, int, int]:
        return self.U_e.shape[1], self.U_out.shape[1], self.U_in.shape[1]

    def truncated(self, ranks: Sequence[int]) -> "TuckerFactors":
        """The leading `ranks` columns of each factor (HOSVD factors are ordered: a prefix is the lower-rank basis)."""
        return TuckerFactors(*(U[:, :r] for U, r in zip(self, ranks)))


def resolve_ranks(ranks: Sequence[int | float], shape: Sequence[int]) -> tuple[int, int, int]:
    """Turn (r_e, r_out, r_in) into ints for a tensor of shape (E, d, h).

    An int is taken as is; a float in (0, 1] is a fraction of the mode size, rounded up (at least 1).
    Raises ValueError for a rank outside [1, mode size] or a fraction outside (0, 1].
    """
    if len(ranks) != 3 or len(shape) != 3:
        raise ValueError(f"need 3 ranks for 3 modes {MODES}, got ranks={tuple(ranks)} shape={tuple(shape)}")
    resolved = []
    for mode, rank, size in zip(MODES, ranks, shape):
        if isinstance(rank, bool):
            raise ValueError(f"rank for mode {mode!r} must be an int or a float, got {rank!r}")
        if isinstance(rank, float):
            if not 0.0 < rank <= 1.0:
                raise ValueError(f"fractional rank for mode {mode!r} must be in (0, 1], got {rank}")
            rank = max(1, math.ceil(round(rank * size, 9)))
        rank = int(rank)
        if not 1 <= rank <= size:
            raise ValueError(f"rank {rank} for mode {mode!r} is outside [1, {size}] (mode size {size})")
        resolved.append(rank)
    return tuple(resolved)


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` eigenvectors of a symmetric PSD Gram, largest eigenvalue first, deterministic sign.

    gram: `[n, n]` -> `[n, rank]` (float64).
    """
    gram = gram.to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.T))  # [n], [n, n] ascending
    U = evecs[:, -rank:].flip(-1)  # [n, rank]
    return _fix_signs(U)


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive. U: `[n, r]` -> `[n, r]`."""
    pivot = U.gather(0, U.abs().argmax(0, keepdim=True))  # [1, r]
    return U * torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)


def _orthonormalize(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span of A (QR, column order kept). A: `[n, r]` -> `[n, r]`."""
    Q, R = torch.linalg.qr(A.to(torch.float64))  # [n, r], [r, r]
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)  # [r]
    return Q * signs  # [n, r]


class _Whitener(NamedTuple):
    """S = (cov + eps I)^{1/2} = V diag(root) V^T, the symmetric PSD square root, and what S^{-1} needs."""

    S: torch.Tensor  # [n, n]
    evecs: torch.Tensor  # [n, n] V
    root: torch.Tensor  # [n]

    def inv_apply(self, U: torch.Tensor) -> torch.Tensor:
        """S^{-1} U = V diag(1/root) V^T U, without forming S^{-1}. U: `[n, r]` -> `[n, r]`."""
        return self.evecs @ ((self.evecs.T @ U) / self.root[:, None])


def _whitener(cov: torch.Tensor, eps: float) -> _Whitener:
    """The square root of cov + eps I (float64). cov: `[n, n]`."""
    cov = cov.to(torch.float64)
    evals, evecs = run_side_by_side([lambda: torch.linalg.eigh(0.5 * (cov + cov.T))], cov.device)[0]  # [n], [n, n]
    root = (evals.clamp_min(0.0) + eps).sqrt()  # [n]
    if not bool((root > 0).all()):
        raise ValueError("cov + eps I is singular; use eps > 0 for whitening")
    return _Whitener(S=(evecs * root) @ evecs.T, evecs=evecs, root=root)


GRAM_BLOCK = 256  # rows per block of a symmetric Gram product (see `_gram_upper`)
CHUNK_BYTES = 64 * 2**20  # working-copy rows whitened, or permuted for the mode-e Gram, at a time


def _blocks(n: int) -> list[tuple[int, int]]:
    """[start, stop) of the row blocks of an n-row matrix, about GRAM_BLOCK rows each."""
    edges = torch.linspace(0, n, max(1, round(n / GRAM_BLOCK)) + 1).round().long().tolist()
    return list(zip(edges, edges[1:]))


def _gram_upper(X: torch.Tensor, out: torch.Tensor) -> None:
    """Add X X^T to the blocks on and above the diagonal of `out` (X `[n, k]`, out `[n, n]`).

    A symmetric rank-k update without BLAS syrk: with B row blocks of X only the B (B + 1) / 2 block products
    X_a X_b^T, a <= b, are computed, (B + 1) / (2 B) of the flops of X @ X.T (0.55-0.75 at the real shapes); `_mirror`
    fills the rest once the sum is complete.
    """
    blocks = _blocks(X.shape[0])
    for a, (a0, a1) in enumerate(blocks):
        for b0, b1 in blocks[a:]:
            out[a0:a1, b0:b1].addmm_(X[a0:a1], X[b0:b1].T)


def _mirror(G: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose blocks on and above the diagonal (`_gram_upper`'s) are G's. G: `[n, n]`."""
    blocks = _blocks(G.shape[0])
    for a, (a0, a1) in enumerate(blocks):
        for b0, b1 in blocks[a + 1:]:
            G[b0:b1, a0:a1] = G[a0:a1, b0:b1].T
        G[a0:a1, a0:a1] = 0.5 * (G[a0:a1, a0:a1] + G[a0:a1, a0:a1].T)  # exact symmetry within the diagonal block
    return G


def _mode_grams(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three mode Grams of W from its out-major copy X[o, j, i] = W[j, o, i] (`[d, E, h]`, contiguous), each a
    few large symmetric block products (`_gram_upper`):

        G_e[i, j] = <W_i, W_j>_F     # [E, E]   = sum over row chunks c of X[c] (permuted to [E, |c| h]) Grams
        G_out     = sum_j W_j W_j^T  # [d, d]   = X_(out) X_(out)^T,  X_(out) = X.view(d, E h)
        G_in      = sum_j W_j^T W_j  # [h, h]   = X_(in)^T X_(in),    X_(in) = X.view(d E, h)
    """
    d, E, h = X.shape
    G_e, G_out, G_in = (torch.zeros(n, n, dtype=X.dtype, device=X.device) for n in (E, d, h))
    _gram_upper(X.reshape(d, E * h), G_out)
    _gram_upper(X.reshape(d * E, h).T, G_in)
    rows = max(1, CHUNK_BYTES // (X.element_size() * E * h))
    for start in range(0, d, rows):
        _gram_upper(X[start:start + rows].transpose(0, 1).reshape(E, -1), G_e)  # [E, |c| h] a permuted copy
    return _mirror(G_e), _mirror(G_out), _mirror(G_in)


def _whiten_(X: torch.Tensor, S_in: torch.Tensor | None, S_out: torch.Tensor | None) -> None:
    """W_j <- S_out W_j S_in for every expert, in place on the out-major copy X `[d, E, h]`, a chunk at a time.

    S_in `[h, h]` multiplies the rows of X.view(d E, h) from the right, S_out `[d, d]` the columns of X.view(d, E h)
    from the left (either may be None).
    """
    d, E, h = X.shape
    if S_in is not None:
        rows_in = X.view(d * E, h)  # [d*E, h]
        step = max(1, CHUNK_BYTES // (X.element_size() * h))
        buffer = X.new_empty(min(step, d * E), h)
        for start in range(0, d * E, step):
            part = rows_in[start:start + step]
            part.copy_(torch.matmul(part, S_in, out=buffer[: part.shape[0]]))
    if S_out is not None:
        cols_out = X.view(d, E * h)  # [d, E*h]
        step = max(1, CHUNK_BYTES // (X.element_size() * d))
        buffer = X.new_empty(d * min(step, E * h))
        for start in range(0, E * h, step):
            part = cols_out[:, start:start + step]  # [d, m]
            part.copy_(torch.matmul(S_out, part, out=buffer[: part.numel()].view(part.shape)))


def _project(
    W: torch.Tensor,
    U_e: torch.Tensor | None = None,
    U_out: torch.Tensor | None = None,
    U_in: torch.Tensor | None = None,
) -> torch.Tensor:
    """W x_e U_e^T x_out U_out^T x_in U_in^T, skipping the modes given as None.

    W: `[E, d, h]` -> `[r_e or E, r_out or d, r_in or h]`.
    """
    if U_out is not None:
        W = torch.einsum("do,jdh->joh", U_out, W)  # [E, r_out, h]
    if U_in is not None:
        W = W @ U_in  # [E, ., r_in]
    if U_e is not None:
        W = torch.einsum("ja,jxy->axy", U_e, W)  # [r_e, ., .]
    return W


def _hooi_sweep(W: torch.Tensor, factors: list[torch.Tensor], ranks: tuple[int, int, int]) -> None:
    """One HOOI sweep, in place on `factors` = [U_e, U_out, U_in]: each factor becomes the top
    eigenvectors of the Gram of W projected on the other two (current) factors."""
    r_e, r_out, r_in = ranks
    Y = _project(W, None, factors[1], factors[2])  # [E, r_out, r_in]
    Y = Y.reshape(Y.shape[0], -1)  # [E, r_out*r_in]
    factors[0] = _top_eigenvectors(Y @ Y.T, r_e)  # [E, r_e]

    Y = _project(W, factors[0], None, factors[2])  # [r_e, d, r_in]
    Y = Y.transpose(0, 1).reshape(Y.shape[1], -1)  # [d, r_e*r_in]
    factors[1] = _top_eigenvectors(Y @ Y.T, r_out)  # [d, r_out]

    Y = _project(W, factors[0], factors[1], None)  # [r_e, r_out, h]
    Y = Y.reshape(-1, Y.shape[-1])  # [r_e*r_out, h]
    factors[2] = _top_eigenvectors(Y.T @ Y, r_in)  # [h, r_in]


def tucker_factors(
    W: torch.Tensor,
    ranks: Sequence[int | float],
    whitening: str = "none",
    cov_in: torch.Tensor | None = None,
    cov_out: torch.Tensor | None = None,
    eps: float = 1e-5,
    hooi_sweeps: int = 0,
    compute_dtype: torch.dtype = torch.float64,
) -> TuckerFactors:
    """Orthonormal Tucker factors of the stacked down-projections, by HOSVD (+ optional HOOI).

    HOSVD by the Gram trick, U_n = top-r_n eigenvectors of the mode-n Gram W_(n) W_(n)^T:

        G_e[i, j] = <W_i, W_j>_F  [E, E],   G_out = sum_j W_j W_j^T  [d, d],   G_in = sum_j W_j^T W_j  [h, h]

    HOOI (`hooi_sweeps` >= 1): U_e <- top-r_e eigvecs of the mode-e Gram of W x_out U_out^T x_in U_in^T,
    then the same for U_out and U_in with the latest factors. Each step can only increase the captured
    energy ||W x U^T||_F, so the reconstruction error never grows.

    Whitening (TD-MoE style), S = (cov + eps I)^{1/2} (symmetric PSD square root):
        "in":   W~_j = W_j S_in,        U_in  = orth(S_in^{-1} U~_in)
        "out":  W~_j = S_out W_j,       U_out = orth(S_out^{-1} U~_out)
        "both": W~_j = S_out W_j S_in,  both of the above.
    The factors U~ are the HOSVD/HOOI factors of W~; U_e is taken from W~ directly. Re-colouring maps
    the whitened subspace back to the original coordinates (W ~= W S U~ U~^T S^{-1}, whose row space is
    span(S^{-1} U~)); the re-coloured columns are not orthonormal, so they are orthonormalised by QR.
    Orthonormal factors keep the solve consistent: the ridge penalty on the core ||G||_F then equals
    ||Delta W||_F, and the projections c = U_in^T k, r~ = U_out^T r in the solve are orthogonal
    projections in the same basis the update is written in (no pseudo-inverse needed).

    Args:
        W: `[E, d, h]` stacked expert down-projections.
        ranks: (r_e, r_out, r_in), ints or fractions in (0, 1] of the mode sizes (see `resolve_ranks`).
        whitening: "none" | "in" | "out" | "both".
        cov_in: `[h, h]` covariance (second moment) of the expert keys, needed for "in" / "both".
        cov_out: `[d, d]` covariance of the layer outputs, needed for "out" / "both".
        eps: ridge added to the covariances before the square root.
        hooi_sweeps: number of HOOI sweeps after the HOSVD initialisation.
        compute_dtype: dtype of the working copy of W and of the Grams (float64 default; float32 halves
            the memory of the one working copy of W). Eigen-decompositions always run in float64.

    Returns:
        TuckerFactors(U_e `[E, r_e]`, U_out `[d, r_out]`, U_in `[h, r_in]`), float32, orthonormal columns.
    """
    if W.ndim != 3:
        raise ValueError(f"W must be [E, d, h], got {tuple(W.shape)}")
    if whitening not in WHITENINGS:
        raise ValueError(f"whitening must be one of {WHITENINGS}, got {whitening!r}")
    E, d, h = W.shape
    ranks = resolve_ranks(ranks, (E, d, h))
    whiten_in = whitening in ("in", "both")
    whiten_out = whitening in ("out", "both")
    if whiten_in and cov_in is None:
        raise ValueError(f"whitening={whitening!r} needs cov_in [h, h] = [{h}, {h}]")
    if whiten_out and cov_out is None:
        raise ValueError(f"whitening={whitening!r} needs cov_out [d, d] = [{d}, {d}]")

    if whiten_in:
        if cov_in.shape != (h, h):
            raise ValueError(f"cov_in must be [h, h] = [{h}, {h}], got {tuple(cov_in.shape)}")
        white_in = _whitener(cov_in.to(W.device), eps)  # S_in [h, h]
    if whiten_out:
        if cov_out.shape != (d, d):
            raise ValueError(f"cov_out must be [d, d] = [{d}, {d}], got {tuple(cov_out.shape)}")
        white_out = _whitener(cov_out.to(W.device), eps)  # S_out [d, d]

    # [d, E, h] the one working copy, out-major (contiguous: the mode-out unfolding [d, E*h] and the rows [d*E, h] are
    # views, so the Grams are a few large products, not one per expert), whitened in place a chunk at a time
    X = W.transpose(0, 1).to(compute_dtype, copy=True, memory_format=torch.contiguous_format)
    _whiten_(X, white_in.S.to(compute_dtype) if whiten_in else None,
             white_out.S.to(compute_dtype) if whiten_out else None)
    W_work = X.transpose(0, 1)  # [E, d, h] view (HOOI)

    G_e, G_out, G_in = _mode_grams(X)  # [E, E], [d, d], [h, h]
    factors = run_side_by_side([lambda G=G, r=r: _top_eigenvectors(G, r) for G, r in zip((G_e, G_out, G_in), ranks)],
                               W.device)
    factors = [U.to(compute_dtype) for U in factors]
    for _ in range(hooi_sweeps):
        _hooi_sweep(W_work, factors, ranks)
        factors = [U.to(compute_dtype) for U in factors]

    U_e, U_out, U_in = (U.to(torch.float64) for U in factors)
    if whiten_in:
        U_in = _orthonormalize(white_in.inv_apply(U_in))  # [h, r_in] orth(S_in^{-1} U~_in)
    if whiten_out:
        U_out = _orthonormalize(white_out.inv_apply(U_out))  # [d, r_out] orth(S_out^{-1} U~_out)
    return TuckerFactors(U_e.to(torch.float32), U_out.to(torch.float32), U_in.to(torch.float32))
