import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mote_plugin.mote.algebra.nullspace import kept_directions, nullspace_projectors, preserved_energy

torch.set_num_threads(1)


def _moments(keys):
    """keys [E, n, h] -> uncentred second moments [E, h, h]."""
    return torch.einsum("enh,enk->ehk", keys, keys) / keys.shape[1]


def _low_rank_keys(gen, E, n, h, r, noise, basis=None):
    """Keys of each expert in its own random r-dim subspace plus isotropic noise: [E, n, h]."""
    if basis is None:
        basis = torch.linalg.qr(torch.randn(E, h, r, generator=gen, dtype=torch.float64))[0]  # [E, h, r]
    coeffs = torch.randn(E, n, r, generator=gen, dtype=torch.float64)  # [E, n, r]
    keys = torch.einsum("enr,ehr->enh", coeffs, basis)
    keys = keys + noise * torch.randn(E, n, h, generator=gen, dtype=torch.float64)
    return keys.float()


def _spectral_moments(gen, spectra):
    """C_j = Q_j diag(spectra[j]) Q_j^T with random rotations: [E, h, h] float32 (and exactly symmetric)."""
    E, h = spectra.shape
    Q = torch.linalg.qr(torch.randn(E, h, h, generator=gen, dtype=torch.float64))[0]
    C = torch.einsum("eij,ej,ekj->eik", Q, spectra, Q).float()
    return 0.5 * (C + C.transpose(1, 2))


@settings(max_examples=25, deadline=None)
@given(
    E=st.integers(1, 5),
    h=st.integers(2, 20),
    rule=st.sampled_from(["relative", "absolute"]),
    threshold=st.floats(1e-4, 0.5),
    seed=st.integers(0, 2**16),
)
def test_projectors_symmetric_idempotent(E, h, rule, threshold, seed):
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.rand(E, h, generator=gen, dtype=torch.float64) ** 4  # spread eigenvalues
    moments = _spectral_moments(gen, spectrum)  # [E, h, h]
    P = nullspace_projectors(moments, torch.full((E,), 100), rule=rule, threshold=threshold)
    assert P.shape == (E, h, h) and P.dtype == torch.float32
    torch.testing.assert_close(P, P.transpose(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)
    rank = torch.diagonal(P, dim1=1, dim2=2).sum(-1)  # [E] trace = rank
    torch.testing.assert_close(rank, rank.round(), atol=1e-4, rtol=0)
    if rule == "relative":
        # the removed directions carry at least (1 - threshold) of the energy
        assert (preserved_energy(P, moments) <= threshold + 1e-5).all()
    else:
        kept = (spectrum < threshold).sum(-1).float()
        torch.testing.assert_close(rank, kept, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rule", ["relative", "absolute"])
def test_low_rank_keys_are_protected(rule):
    gen = torch.Generator().manual_seed(0)
    E, n, h, r, d = 3, 300, 16, 4, 12
    basis = torch.linalg.qr(torch.randn(E, h, r, generator=gen, dtype=torch.float64))[0]  # [E, h, r]
    keys = _low_rank_keys(gen, E, n, h, r, noise=1e-3, basis=basis)  # [E, n, h]
    moments = _moments(keys)
    P = nullspace_projectors(moments, torch.full((E,), n), rule=rule)
    # exactly the r signal directions are removed
    torch.testing.assert_close(torch.diagonal(P, dim1=1, dim2=2).sum(-1), torch.full((E,), float(h - r)), atol=1e-4,
                               rtol=0)
    W = torch.randn(E, d, h, generator=gen)
    fresh = _low_rank_keys(gen, E, n, h, r, noise=1e-3, basis=basis)  # held-out keys, same subspaces
    for ks in (keys, fresh):
        before = torch.einsum("edh,enh->end", W, ks).norm()
        after = torch.einsum("edh,ehk,enk->end", W, P, ks).norm()
        assert after / before < 1e-2, float(after / before)
    # a generic (non-preserved) direction mostly survives
    probe = torch.randn(E, 64, h, generator=gen)
    passed = torch.einsum("ehk,enk->enh", P, probe).norm() / probe.norm()
    assert passed > 0.5 * math.sqrt((h - r) / h)
    assert (preserved_energy(P, moments) < 1e-4).all()


def test_relative_rule_is_scale_invariant_absolute_is_not():
    gen = torch.Generator().manual_seed(1)
    E, n, h, r = 2, 200, 12, 3
    keys = _low_rank_keys(gen, E, n, h, r, noise=1e-3)
    counts = torch.full((E,), n)
    small = _moments(0.05 * keys)  # signal eigenvalues ~2.5e-3, below AlphaEdit's 2e-2
    P_rel = nullspace_projectors(_moments(keys), counts, rule="relative")
    torch.testing.assert_close(nullspace_projectors(small, counts, rule="relative"), P_rel, atol=1e-5, rtol=0)
    P_abs = nullspace_projectors(_moments(keys), counts, rule="absolute", threshold=2e-2)
    torch.testing.assert_close(P_abs, P_rel, atol=1e-5, rtol=0)
    P_abs_small = nullspace_projectors(small, counts, rule="absolute", threshold=2e-2)
    torch.testing.assert_close(P_abs_small, torch.eye(h).expand(E, h, h), atol=1e-5, rtol=0)  # no protection left


@pytest.mark.parametrize("fallback, expected", [("freeze", 0.0), ("identity", 1.0)])
def test_min_tokens_fallback(fallback, expected):
    gen = torch.Generator().manual_seed(2)
    E, h = 4, 8
    keys = _low_rank_keys(gen, E, 50, h, 2, noise=1e-4)
    moments = _moments(keys)
    moments[3] = torch.nan  # 0 tokens: 0/0
    counts = torch.tensor([50, 5, 50, 0])
    P = nullspace_projectors(moments, counts, min_tokens=10, fallback=fallback)
    assert torch.isfinite(P).all()
    for j in (1, 3):
        torch.testing.assert_close(P[j], expected * torch.eye(h))
    for j in (0, 2):
        assert abs(float(torch.trace(P[j])) - (h - 2)) < 1e-4
    energy = preserved_energy(P, moments.nan_to_num(0.0))
    assert math.isnan(float(energy[3]))  # no energy at all
    assert float(energy[1]) == pytest.approx(expected, abs=1e-6)


def test_zero_moment_with_tokens_is_unprotected():
    P = nullspace_projectors(torch.zeros(2, 5, 5), torch.tensor([10, 10]), rule="relative")
    torch.testing.assert_close(P, torch.eye(5).expand(2, 5, 5))


def test_bad_arguments():
    moments, counts = torch.eye(3).expand(2, 3, 3), torch.tensor([5, 5])
    with pytest.raises(ValueError, match="rule"):
        nullspace_projectors(moments, counts, rule="nope")
    with pytest.raises(ValueError, match="fallback"):
        nullspace_projectors(moments, counts, fallback="nope")
    with pytest.raises(ValueError, match="threshold"):
        nullspace_projectors(moments, counts, rule="relative", threshold=0.0)
    with pytest.raises(ValueError, match="counts"):
        nullspace_projectors(moments, torch.tensor([5]))


# --------------------------------------------------------------------------------------------------------------------
# The projectors against the reference: a full float64 eigen-decomposition, P = V diag(m) V^T (the definition, and the
# implementation before the partial eigen-solves)
# --------------------------------------------------------------------------------------------------------------------


def reference_projectors(moments, counts, rule="relative", threshold=None, min_tokens=1, fallback="freeze"):
    """[E, h, h] float64 projectors from a full torch.linalg.eigh of every moment, and the eigenvalues [E, h]."""
    threshold = {"relative": 1e-2, "absolute": 2e-2}[rule] if threshold is None else threshold
    has_stats = counts >= min_tokens
    C = torch.where(has_stats[:, None, None], moments.double(), torch.zeros((), dtype=torch.float64))
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.transpose(1, 2)))  # [E, h] ascending, [E, h, h]
    evals = evals.clamp_min(0.0)
    if rule == "absolute":
        keep = evals < threshold
    else:
        desc = evals.flip(-1)
        trace = desc.sum(-1, keepdim=True)
        removed = ((desc.cumsum(-1) - desc) < (1.0 - threshold) * trace) & (trace > 0)
        keep = ~removed.flip(-1)
    P = torch.einsum("eik,ek,ejk->eij", evecs, keep.double(), evecs)
    if fallback == "identity":
        fallback_P = torch.eye(moments.shape[1], dtype=torch.float64)
    else:
        fallback_P = torch.zeros((), dtype=torch.float64)
    return torch.where(has_stats[:, None, None], P, fallback_P), evals, evecs


def _cut_gap(evals, rule, threshold):
    """Relative gap between the largest kept and the smallest removed eigenvalue (inf without a cut)."""
    k = kept_directions(evals, rule, threshold)
    if k in (0, evals.numel()):
        return math.inf
    return float((evals[k] - evals[k - 1]) / evals[-1].clamp_min(1e-300))


@settings(max_examples=40, deadline=None)
@given(
    E=st.integers(1, 4),
    h=st.integers(2, 40),
    rule=st.sampled_from(["relative", "absolute"]),
    threshold=st.floats(1e-3, 0.5),
    decay=st.floats(0.0, 8.0),
    seed=st.integers(0, 2**16),
)
def test_projectors_equal_the_full_decomposition(E, h, rule, threshold, decay, seed):
    """Where the cut has a gap above float64 rounding, the projectors are the reference's to 1e-6 in operator norm
    (float32 output); the rank is the reference's whenever the eigenvalues at the cut are distinct."""
    gen = torch.Generator().manual_seed(seed)
    spectra = torch.rand(E, h, generator=gen, dtype=torch.float64) ** decay  # flat (0) to strongly decaying (8)
    moments = _spectral_moments(gen, spectra)
    counts = torch.full((E,), 100)
    P = nullspace_projectors(moments, counts, rule=rule, threshold=threshold).double()
    P_ref, evals, _ = reference_projectors(moments, counts, rule=rule, threshold=threshold)
    for j in range(E):
        if _cut_gap(evals[j], rule, threshold) > 1e-8:
            assert float(torch.linalg.matrix_norm(P[j] - P_ref[j], ord=2)) < 1e-6


def test_near_threshold_eigenvalues_are_classified_as_the_reference():
    """Eigenvalues a relative 1e-6 on either side of the absolute threshold, and a relative-rule cut between two
    eigenvalues 1e-6 apart: the same directions are kept, the projectors agree to 1e-6."""
    gen = torch.Generator().manual_seed(7)
    h, tau = 24, 2e-2
    spectra = torch.logspace(-4, 0, h, dtype=torch.float64)[None].repeat(2, 1)  # ascending
    spectra[0, 10], spectra[0, 11] = tau * (1 + 1e-6), tau * (1 - 1e-6)
    moments = _spectral_moments(gen, spectra)
    counts = torch.full((2,), 50)
    P = nullspace_projectors(moments, counts, rule="absolute", threshold=tau).double()
    P_ref, evals, _ = reference_projectors(moments, counts, rule="absolute", threshold=tau)
    assert kept_directions(evals[0], "absolute", tau) == h - 11
    torch.testing.assert_close(P, P_ref, atol=1e-6, rtol=0)
    # relative rule: put the cut of expert 1 between two eigenvalues 1e-6 apart
    m = 5  # remove the 5 largest; the 6th largest is 1e-6 below the 5th
    spectra[1, h - m - 1] = spectra[1, h - m] * (1 - 1e-6)
    desc = spectra[1].flip(0)
    threshold = float(1 - (desc[:m].sum() - 0.5 * desc[m - 1]) / desc.sum())  # the cut inside direction m - 1
    moments = _spectral_moments(gen, spectra)
    P = nullspace_projectors(moments, counts, rule="relative", threshold=threshold).double()
    P_ref, evals, _ = reference_projectors(moments, counts, rule="relative", threshold=threshold)
    assert kept_directions(evals[1], "relative", threshold) == h - m
    assert _cut_gap(evals[1], "relative", threshold) < 2e-6
    torch.testing.assert_close(torch.diagonal(P, dim1=1, dim2=2).sum(-1), torch.diagonal(P_ref, dim1=1, dim2=2).sum(-1))
    torch.testing.assert_close(P, P_ref, atol=1e-6, rtol=0)


def test_degenerate_cut_differs_only_inside_the_repeated_eigenvalue():
    """A repeated eigenvalue that the relative rule cuts through has no unique projector: any split of its eigenspace
    is right. Both give the same rank and passed energy, and differ only inside that eigenspace."""
    gen = torch.Generator().manual_seed(8)
    h = 16
    spectrum = torch.tensor([8.0, 4.0] + [1.0] * 6 + [1e-3] * 8, dtype=torch.float64)  # a 6-fold eigenvalue 1.0
    moments = _spectral_moments(gen, spectrum.flip(0)[None])
    counts = torch.tensor([100])
    threshold = float(1 - (12.0 + 3.0) / spectrum.sum())  # removes 8, 4 and three of the six 1.0s
    P = nullspace_projectors(moments, counts, rule="relative", threshold=threshold).double()[0]
    P_ref, evals, evecs = reference_projectors(moments, counts, rule="relative", threshold=threshold)
    P_ref, evecs = P_ref[0], evecs[0]
    assert abs(float(torch.trace(P)) - float(torch.trace(P_ref))) < 1e-6  # same rank
    torch.testing.assert_close(preserved_energy(P[None], moments), preserved_energy(P_ref[None], moments), atol=1e-6,
                               rtol=0)
    cluster = evecs[:, (evals[0] - 1.0).abs() < 1e-4]  # [h, 6] the repeated eigenvalue's eigenspace
    outside = torch.eye(h, dtype=torch.float64) - cluster @ cluster.T
    assert float(torch.linalg.matrix_norm(outside @ (P - P_ref) @ outside, ord=2)) < 1e-6
    assert float(torch.linalg.matrix_norm(outside @ (P - P_ref), ord=2)) < 1e-5  # no mixing across the cluster either


@pytest.mark.parametrize("rule", ["relative", "absolute"])
def test_rarely_routed_experts_equal_the_reference(rule):
    """Experts with fewer tokens than h (rank-deficient moments, an exact zero eigenvalue of high multiplicity), a
    single token, and experts below min_tokens (fallbacks): the reference's projectors."""
    gen = torch.Generator().manual_seed(9)
    E, h = 6, 32
    tokens = [400, 20, 3, 1, 2, 0]
    scale = torch.logspace(0, -2, h, dtype=torch.float64)
    moments = torch.zeros(E, h, h)
    for j, n in enumerate(tokens):
        keys = torch.randn(max(n, 1), h, generator=gen, dtype=torch.float64) * scale * 0.5
        moments[j] = (keys.T @ keys / max(n, 1)).float() if n else torch.nan
    counts = torch.tensor(tokens)
    for fallback in ("freeze", "identity"):
        P = nullspace_projectors(moments, counts, rule=rule, min_tokens=2, fallback=fallback).double()
        P_ref, _, _ = reference_projectors(moments, counts, rule=rule, min_tokens=2, fallback=fallback)
        torch.testing.assert_close(P, P_ref, atol=1e-6, rtol=0)
