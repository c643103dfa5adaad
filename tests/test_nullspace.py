import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mote_plugin.mote.nullspace import nullspace_projectors, preserved_energy


torch.set_num_threads(1)


def _moments(keys):
    """keys [E, n, h] -> uncentred second moments [E, h, h]."""
    return torch.einsum("enh,enk->ehk", keys, keys) / keys.shape[1]


def _low_rank_keys(gen, E, n, h, r, noise, basis=None):
    """Keys of each expert in its own random r-dim subspace plus isotropic noise: [E, n, h]."""
    if basis is None:
        basis = torch.linalg.qr(torch.randn(E, h, r, generator=gen, dtype=torch.float64))[0]  # [E, h, r]
    coeffs = torch.randn(E, n, r, generator=gen, dtype=torch.float64)  # [E, n, r]
    keys = torch.einsum("enr,ehr->enh", coeffs, basis) + noise * torch.randn(E, n, h, generator=gen, dtype=torch.float64)
    return keys.float()


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
    Q = torch.linalg.qr(torch.randn(E, h, h, generator=gen, dtype=torch.float64))[0]
    moments = torch.einsum("eij,ej,ekj->eik", Q, spectrum, Q).float()  # [E, h, h]
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
    torch.testing.assert_close(torch.diagonal(P, dim1=1, dim2=2).sum(-1), torch.full((E,), float(h - r)), atol=1e-4, rtol=0)
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
