import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mote_plugin.mote.algebra.tucker import TuckerFactors, resolve_ranks, tucker_factors
from reference import reconstruction_error, tucker_core

torch.set_num_threads(1)


def _assert_orthonormal(U, atol=1e-5):
    eye = torch.eye(U.shape[1], dtype=U.dtype)
    torch.testing.assert_close(U.T @ U, eye, atol=atol, rtol=0)


def _random_cov(gen, n):
    """[n, n] PSD and exactly symmetric: a float32 A @ A.T is not always (off by 1 ulp for some n), and tucker_factors
    symmetrises its covariances while the reference's eigh reads one triangle, a 1e-7 difference in S that a small
    eigen-gap turns into 1e-6 in the subspaces."""
    A = torch.randn(n, n, generator=gen)
    C = A @ A.T / n
    return 0.5 * (C + C.T)


shapes = dict(E=st.integers(2, 6), d=st.integers(4, 16), h=st.integers(4, 16), seed=st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(**shapes, whitening=st.sampled_from(["none", "in", "out", "both"]), hooi=st.integers(0, 2), data=st.data())
def test_factors_are_orthonormal(E, d, h, seed, whitening, hooi, data):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(E, d, h, generator=gen)
    ranks = (data.draw(st.integers(1, E)), data.draw(st.integers(1, d)), data.draw(st.integers(1, h)))
    f = tucker_factors(W, ranks, whitening=whitening, cov_in=_random_cov(gen, h), cov_out=_random_cov(gen, d),
                       hooi_sweeps=hooi)
    assert isinstance(f, TuckerFactors) and f.ranks == ranks
    assert f.U_e.shape == (E, ranks[0]) and f.U_out.shape == (d, ranks[1]) and f.U_in.shape == (h, ranks[2])
    for U in f:
        assert U.dtype == torch.float32
        _assert_orthonormal(U)
    assert 0.0 <= reconstruction_error(W, f) <= 1.0 + 1e-9


@settings(max_examples=25, deadline=None)
@given(**shapes, whitening=st.sampled_from(["none", "in", "both"]))
def test_full_ranks_reconstruct_exactly(E, d, h, seed, whitening):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(E, d, h, generator=gen)
    f = tucker_factors(W, (E, d, h), whitening=whitening, cov_in=_random_cov(gen, h), cov_out=_random_cov(gen, d))
    assert reconstruction_error(W, f) < 1e-5
    assert reconstruction_error(W, tucker_factors(W, (1.0, 1.0, 1.0))) < 1e-5


@settings(max_examples=25, deadline=None)
@given(**shapes, data=st.data())
def test_hooi_does_not_increase_error(E, d, h, seed, data):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(E, d, h, generator=gen)
    ranks = (data.draw(st.integers(1, E)), data.draw(st.integers(1, d)), data.draw(st.integers(1, h)))
    errors = [reconstruction_error(W, tucker_factors(W, ranks, hooi_sweeps=s)) for s in (0, 1, 3)]
    assert errors[1] <= errors[0] + 1e-6 and errors[2] <= errors[1] + 1e-6, errors


def test_truncated_hosvd_error_matches_low_multilinear_rank():
    gen = torch.Generator().manual_seed(3)
    core = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    Q = [torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
         for n, r in ((5, 2), (12, 3), (10, 4))]
    W = torch.einsum("aoi,ja,do,hi->jdh", core, *Q)  # multilinear rank (2, 3, 4)
    f = tucker_factors(W, (2, 3, 4))
    assert reconstruction_error(W, f) < 1e-6
    assert tucker_core(W, f).shape == (2, 3, 4)
    assert reconstruction_error(W, tucker_factors(W, (2, 2, 4))) > 1e-3


def test_whitening_recolours_to_original_coordinates():
    """W_j = A M_j B^T: whatever the covariances, the re-coloured factors span A and B exactly
    (without re-colouring they would span S_out A and S_in B)."""
    gen = torch.Generator().manual_seed(4)
    E, d, h, r_out, r_in = 4, 10, 16, 2, 3
    A = torch.randn(d, r_out, generator=gen, dtype=torch.float64)
    B = torch.randn(h, r_in, generator=gen, dtype=torch.float64)
    W = torch.einsum("do,joi,hi->jdh", A, torch.randn(E, r_out, r_in, generator=gen, dtype=torch.float64), B)
    for whitening in ("in", "out", "both"):
        f = tucker_factors(W, (E, r_out, r_in), whitening=whitening,
                           cov_in=_random_cov(gen, h), cov_out=_random_cov(gen, d), eps=1e-5)
        for U, span in ((f.U_out, A), (f.U_in, B)):
            Q = torch.linalg.qr(span)[0].float()
            torch.testing.assert_close(U @ U.T, Q @ Q.T, atol=1e-4, rtol=0)
        assert reconstruction_error(W, f) < 1e-5


def test_in_whitening_formula():
    """U_in = orth(S^-1 U~) with U~ the top eigenvectors of S (sum_j W_j^T W_j) S, S = (C + eps I)^(1/2)."""
    gen = torch.Generator().manual_seed(6)
    E, d, h, r = 3, 8, 12, 4
    W = torch.randn(E, d, h, generator=gen, dtype=torch.float64)
    C = _random_cov(gen, h).double()
    eps = 1e-2
    evals, evecs = torch.linalg.eigh(C + eps * torch.eye(h, dtype=torch.float64))
    S = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    Wt = W @ S  # [E, d, h]
    U_tilde = torch.linalg.eigh(torch.einsum("jdh,jdk->hk", Wt, Wt))[1][:, -r:]
    expected = torch.linalg.qr(torch.linalg.solve(S, U_tilde))[0]
    U_e_tilde = torch.linalg.eigh(torch.einsum("jdh,idh->ji", Wt, Wt))[1][:, -2:]
    f = tucker_factors(W, (2, d, r), whitening="in", cov_in=C, eps=eps)
    torch.testing.assert_close(f.U_in.double() @ f.U_in.double().T, expected @ expected.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(f.U_e.double() @ f.U_e.double().T, U_e_tilde @ U_e_tilde.T, atol=1e-5, rtol=0)


def test_identity_covariance_whitening_is_a_no_op():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(3, 8, 6, generator=gen)
    plain = tucker_factors(W, (2, 3, 4))
    white = tucker_factors(W, (2, 3, 4), whitening="both", cov_in=torch.eye(6), cov_out=torch.eye(8))
    for A, B in zip(plain, white):
        torch.testing.assert_close(A @ A.T, B @ B.T, atol=1e-5, rtol=0)


def test_resolve_ranks():
    assert resolve_ranks((0.5, 0.25, 1.0), (6, 8, 10)) == (3, 2, 10)
    assert resolve_ranks((0.01, 0.3, 7), (6, 10, 10)) == (1, 3, 7)  # 0.3 * 10 is 3, not 4
    assert resolve_ranks((1, 1, 1.0), (1, 1, 1)) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"mode 'out'.*8"):
        resolve_ranks((2, 9, 3), (6, 8, 10))
    with pytest.raises(ValueError, match="mode 'e'"):
        resolve_ranks((0, 2, 3), (6, 8, 10))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        resolve_ranks((1.5, 2, 3), (6, 8, 10))
    with pytest.raises(ValueError, match="mode 'in'"):
        tucker_factors(torch.randn(2, 3, 4), (1, 1, 5))


def test_missing_covariance_raises():
    W = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="cov_in"):
        tucker_factors(W, (1, 1, 1), whitening="in")
    with pytest.raises(ValueError, match="cov_out"):
        tucker_factors(W, (1, 1, 1), whitening="out")
    with pytest.raises(ValueError, match="cov_out"):
        tucker_factors(W, (1, 1, 1), whitening="both", cov_in=torch.eye(4))
    with pytest.raises(ValueError, match="whitening"):
        tucker_factors(W, (1, 1, 1), whitening="sideways")


def reference_factors(W, ranks, whitening="none", cov_in=None, cov_out=None, eps=1e-5):
    """HOSVD by the definition, full float64 eigen-decompositions (torch.linalg.eigh) of the explicit unfoldings'
    Grams of the whitened W, re-coloured with S^{-1} and orthonormalised; and each Gram's relative gap at its rank."""
    W = W.double()
    E, d, h = W.shape

    def sqrtm(C):
        evals, evecs = torch.linalg.eigh(C.double())
        return (evecs * (evals.clamp_min(0) + eps).sqrt()) @ evecs.T

    S_in = sqrtm(cov_in) if whitening in ("in", "both") else torch.eye(h, dtype=torch.float64)
    S_out = sqrtm(cov_out) if whitening in ("out", "both") else torch.eye(d, dtype=torch.float64)
    Wt = torch.einsum("od,jdh,hk->jok", S_out, W, S_in)
    unfoldings = (Wt.reshape(E, -1), Wt.permute(1, 0, 2).reshape(d, -1), Wt.permute(2, 0, 1).reshape(h, -1))
    factors, gaps = [], []
    for A, r in zip(unfoldings, ranks):
        evals, evecs = torch.linalg.eigh(A @ A.T)  # ascending
        factors.append(evecs[:, -r:])
        gaps.append(float((evals[-r] - evals[-r - 1]) / evals[-1]) if r < len(evals) else math.inf)
    factors[1] = torch.linalg.qr(torch.linalg.solve(S_out, factors[1]))[0]
    factors[2] = torch.linalg.qr(torch.linalg.solve(S_in, factors[2]))[0]
    return factors, gaps


def _decaying_tensor(gen, E, d, h, decay):
    """W with a decaying spectrum in every mode (real weights are not white noise): [E, d, h] float32."""
    core = torch.randn(E, d, h, generator=gen, dtype=torch.float64)
    for mode, n in enumerate((E, d, h)):
        Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
        scale = torch.arange(1, n + 1, dtype=torch.float64) ** -decay
        core = torch.tensordot(core, Q * scale, dims=([0], [1]))  # modes cycle: (d, h, E) -> (h, E, d) -> (E, d, h)
    return core.float()


@settings(max_examples=25, deadline=None)
@given(E=st.integers(2, 8), d=st.integers(4, 24), h=st.integers(4, 24), seed=st.integers(0, 2**16),
       whitening=st.sampled_from(["none", "in", "out", "both"]), decay=st.floats(0.0, 2.0), data=st.data())
def test_factors_span_the_full_decomposition(E, d, h, seed, whitening, decay, data):
    """The top-r eigenvectors from the partial eigen-solves span the reference's subspaces, to 1e-6 in
    ||U U^T - U_ref U_ref^T||_2, wherever the Gram's eigenvalues at the rank are apart by more than 1e-8 (relative)."""
    gen = torch.Generator().manual_seed(seed)
    W = _decaying_tensor(gen, E, d, h, decay)
    ranks = (data.draw(st.integers(1, E)), data.draw(st.integers(1, d)), data.draw(st.integers(1, h)))
    cov_in, cov_out = _random_cov(gen, h), _random_cov(gen, d)
    f = tucker_factors(W, ranks, whitening=whitening, cov_in=cov_in, cov_out=cov_out, eps=1e-3)
    ref, gaps = reference_factors(W, ranks, whitening, cov_in, cov_out, eps=1e-3)
    for U, U_ref, gap in zip(f, ref, gaps):
        if gap > 1e-8:
            U = U.double()
            assert float(torch.linalg.matrix_norm(U @ U.T - U_ref @ U_ref.T, ord=2)) < 1e-6


@pytest.mark.parametrize("n, block", [(1, 256), (7, 2), (10, 3), (33, 8), (40, 64)])
def test_symmetric_block_gram_is_the_gram(monkeypatch, n, block):
    """The block-upper-triangle Gram (then mirrored) equals X X^T, also accumulated over several X."""
    from mote_plugin.mote.algebra import tucker

    monkeypatch.setattr(tucker, "GRAM_BLOCK", block)
    gen = torch.Generator().manual_seed(n)
    Xs = [torch.randn(n, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    G = torch.zeros(n, n, dtype=torch.float64)
    for X in Xs:
        tucker._gram_upper(X, G)
    G = tucker._mirror(G)
    torch.testing.assert_close(G, sum(X @ X.T for X in Xs), rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("whitening", ["none", "in", "out", "both"])
def test_chunked_whitening_and_grams_equal_the_reference(monkeypatch, whitening):
    """Whitening and the mode-e Gram a few rows/columns at a time, Grams in small blocks: the reference's factors."""
    from mote_plugin.mote.algebra import tucker

    monkeypatch.setattr(tucker, "CHUNK_BYTES", 8 * 40)  # 40 float64 per chunk: many chunks, a ragged last one
    monkeypatch.setattr(tucker, "GRAM_BLOCK", 3)
    gen = torch.Generator().manual_seed(11)
    E, d, h, ranks = 5, 13, 11, (3, 4, 5)
    W = _decaying_tensor(gen, E, d, h, 1.0)
    cov_in, cov_out = _random_cov(gen, h), _random_cov(gen, d)
    f = tucker_factors(W, ranks, whitening=whitening, cov_in=cov_in, cov_out=cov_out, eps=1e-3)
    ref, gaps = reference_factors(W, ranks, whitening, cov_in, cov_out, eps=1e-3)
    assert min(gaps) > 1e-6
    for U, U_ref in zip(f, ref):
        U = U.double()
        assert float(torch.linalg.matrix_norm(U @ U.T - U_ref @ U_ref.T, ord=2)) < 1e-6
    G_e, G_out, G_in = tucker._mode_grams(W.double().transpose(0, 1).contiguous())
    W64 = W.double()
    torch.testing.assert_close(G_e, torch.einsum("jdh,kdh->jk", W64, W64))
    torch.testing.assert_close(G_out, torch.einsum("jdh,jeh->de", W64, W64))
    torch.testing.assert_close(G_in, torch.einsum("jdh,jdk->hk", W64, W64))
