import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mote_plugin.mote.algebra.core_solve import core_features, key_maps_of, lowrank_update, solve_core, update_memory
from mote_plugin.mote.algebra.tucker import TuckerFactors
from reference import dense_update, direct_ridge, predicted_change, routed

torch.set_num_threads(1)
f64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _orthonormal(gen, n, r):
    return torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=f64))[0]  # [n, r]


def _problem(seed, E, d, h, T, K, ranks, projectors=True):
    """Random factors, routing, projectors and projected keys, all float64."""
    gen = torch.Generator().manual_seed(seed)
    factors = TuckerFactors(*(_orthonormal(gen, n, r) for n, r in zip((E, d, h), ranks)))
    expert_idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])  # [T, K] distinct
    gates = torch.softmax(torch.randn(T, K, generator=gen, dtype=f64), -1)  # [T, K]
    if projectors:  # random orthogonal projectors of rank >= h/2
        bases = [_orthonormal(gen, h, max(1, h - int(torch.randint(0, h // 2 + 1, (1,), generator=gen))))
                 for _ in range(E)]
        P = torch.stack([B @ B.T for B in bases])  # [E, h, h]
    else:
        P = torch.eye(h, dtype=f64).expand(E, h, h)
    keys = routed(torch.randn(T, K, h, generator=gen, dtype=f64), gates, expert_idx, E).projected(P).keys  # [T, K, h]
    residuals = torch.randn(T, d, generator=gen, dtype=f64)  # [T, d]
    return factors, expert_idx, gates, P, keys, residuals, gen


@st.composite
def problems(draw, projectors=True, max_T=12):
    E, d, h = draw(st.integers(2, 6)), draw(st.integers(4, 24)), draw(st.integers(4, 24))
    T, K = draw(st.integers(1, max_T)), draw(st.integers(1, 3))
    K = min(K, E)
    ranks = (draw(st.integers(1, E)), draw(st.integers(1, min(d, 8))), draw(st.integers(1, min(h, 8))))
    seed = draw(st.integers(0, 2**16))
    return (E, d, h, T, K, ranks), _problem(seed, E, d, h, T, K, ranks, projectors)


@settings(max_examples=25, deadline=None)
@given(problem=problems(), lam=st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
def test_woodbury_sides_agree_with_direct_ridge(problem, lam):
    (E, d, h, T, K, ranks), (factors, idx, gates, P, keys, R, _) = problem
    sol_T = solve_core(routed(keys, gates, idx), R, factors, lam, side="T")
    sol_F = solve_core(routed(keys, gates, idx), R, factors, lam, side="feature")
    ref = direct_ridge(keys, gates, idx, R, factors, lam)
    assert sol_T.side == "T" and sol_F.side == "feature" and sol_T.A is not None and sol_F.A is None
    assert sol_T.G_flat.shape == (ranks[1], ranks[0] * ranks[2]) and sol_T.G_flat.dtype == f64
    assert _rel(sol_T.G_flat, ref) < 1e-6 and _rel(sol_F.G_flat, ref) < 1e-6
    auto = solve_core(routed(keys, gates, idx), R, factors, lam)
    assert auto.side == ("T" if T <= ranks[0] * ranks[2] else "feature")


@settings(max_examples=25, deadline=None)
@given(problem=problems(), scale=st.sampled_from([1.0, 0.5, 1 / 3]))
def test_lowrank_and_dense_writeback(problem, scale):
    (E, d, h, T, K, ranks), (factors, idx, gates, P, keys, R, _) = problem
    U_e, U_out, U_in = factors
    r_e, r_out, r_in = ranks
    for side in ("T", "feature"):
        sol = solve_core(routed(keys, gates, idx), R, factors, 0.1, side=side)
        dW = dense_update(sol, factors, P, scale=scale)  # [E, d, h]
        left, right = lowrank_update(sol, factors, P, scale=scale, key_maps=key_maps_of(factors, P, f64))
        assert left.shape[1] == (T if side == "T" and T <= r_out else r_out) == right.shape[1]
        G = sol.G_flat.reshape(r_out, r_e, r_in)
        for j in range(E):
            torch.testing.assert_close(left @ right[j], dW[j], atol=1e-10, rtol=1e-8)
            G_j = torch.einsum("a,oai->oi", U_e[j], G)  # [r_out, r_in]
            torch.testing.assert_close(scale * U_out @ G_j @ U_in.T @ P[j], dW[j], atol=1e-10, rtol=1e-8)


@settings(max_examples=25, deadline=None)
@given(problem=problems())
def test_applied_update_changes_outputs_as_predicted(problem):
    (E, d, h, T, K, ranks), (factors, idx, gates, P, keys, R, gen) = problem
    W = torch.randn(E, d, h, generator=gen, dtype=f64)
    sol = solve_core(routed(keys, gates, idx), R, factors, 0.1)

    def moe_out(W):  # sum_k g_tk W_{idx_tk} k~_tk: [T, d]
        return torch.einsum("tk,tkdh,tkh->td", gates, W[idx], keys)

    change = moe_out(W + dense_update(sol, factors, P)) - moe_out(W)
    predicted = predicted_change(sol, factors, keys, gates, idx)
    assert predicted.shape == (T, d)
    torch.testing.assert_close(change, predicted, atol=1e-9, rtol=1e-7)


@settings(max_examples=25, deadline=None)
@given(problem=problems(projectors=False, max_T=12))
def test_full_ranks_reproduce_residuals(problem):
    (E, d, h, T, K, ranks), (_, idx, gates, P, keys, R, gen) = problem
    assume(T <= E * h)
    factors = TuckerFactors(_orthonormal(gen, E, E), _orthonormal(gen, d, d), _orthonormal(gen, h, h))
    sv = torch.linalg.svdvals(core_features(routed(keys, gates, idx), factors))
    assume(sv.numel() == T and sv[-1] > 1e-2 * sv[0])  # Phi of full row rank (routing can make it deficient)
    sol = solve_core(routed(keys, gates, idx), R, factors, 1e-8)
    assert _rel(predicted_change(sol, factors, keys, gates, idx), R) < 1e-4


def test_zero_residual_gives_zero_update():
    factors, idx, gates, P, keys, R, _ = _problem(0, 4, 10, 8, 5, 2, (3, 4, 5))
    for side in ("T", "feature"):
        sol = solve_core(routed(keys, gates, idx), torch.zeros_like(R), factors, 0.1, side=side)
        assert sol.G_flat.abs().max() == 0 and dense_update(sol, factors, P).abs().max() == 0


def test_rank_deficient_and_overdetermined_are_finite():
    factors, idx, gates, P, keys, R, _ = _problem(1, 4, 10, 8, 6, 2, (3, 4, 5))
    same = keys[:1].expand_as(keys).contiguous()  # identical keys, routing and gates: rank-1 Phi
    idx1, gates1 = idx[:1].expand_as(idx), gates[:1].expand_as(gates)
    for side in ("T", "feature"):
        sol = solve_core(routed(same, gates1, idx1), R, factors, 1e-6, side=side)
        assert torch.isfinite(sol.G_flat).all() and torch.isfinite(dense_update(sol, factors, P)).all()
    # T = 12 > r_e * r_in = 2: the feature side is picked and matches the reference
    factors, idx, gates, P, keys, R, _ = _problem(2, 4, 10, 8, 12, 2, (1, 4, 2))
    sol = solve_core(routed(keys, gates, idx), R, factors, 0.1)
    assert sol.side == "feature" and torch.isfinite(dense_update(sol, factors, P)).all()
    assert _rel(sol.G_flat, direct_ridge(keys, gates, idx, R, factors, 0.1)) < 1e-8


def test_memory_equals_solving_with_past_edits_at_zero_residual():
    factors, idx, gates, P, keys, R, _ = _problem(3, 5, 12, 10, 10, 2, (3, 6, 4))
    past, new = slice(0, 6), slice(6, 10)
    M = update_memory(None, core_features(routed(keys[past], gates[past], idx[past]), factors))
    torch.testing.assert_close(
        update_memory(M, core_features(routed(keys[new], gates[new], idx[new]), factors)),
        core_features(routed(keys, gates, idx), factors).T @ core_features(routed(keys, gates, idx), factors),
    )
    sol = solve_core(routed(keys[new], gates[new], idx[new]), R[new], factors, 0.1, memory=M)
    assert sol.side == "feature"
    R_joint = torch.cat([torch.zeros_like(R[past]), R[new]])
    joint = solve_core(routed(keys, gates, idx), R_joint, factors, 0.1, side="T")
    assert _rel(sol.G_flat, joint.G_flat) < 1e-8
    assert _rel(sol.G_flat, direct_ridge(keys[new], gates[new], idx[new], R[new], factors, 0.1, memory=M)) < 1e-8
    # the memory keeps past outputs closer to unchanged than a memoryless solve
    plain = solve_core(routed(keys[new], gates[new], idx[new]), R[new], factors, 0.1)
    drift = lambda s: predicted_change(s, factors, keys[past], gates[past], idx[past]).norm()
    assert drift(sol) < drift(plain)


def test_projected_keys_match_gather():
    factors, idx, gates, P, _, _, gen = _problem(4, 5, 6, 7, 9, 3, (2, 2, 2))
    raw = torch.randn(9, 3, 7, generator=gen, dtype=f64)
    projected = routed(raw, gates, idx, 5).projected(P)
    torch.testing.assert_close(projected.keys, torch.einsum("tkhj,tkj->tkh", P[idx], raw))
    assert projected.expert_idx is idx and projected.gates is gates


def test_float32_in_float32_out_and_bad_arguments():
    factors, idx, gates, P, keys, R, _ = _problem(5, 3, 8, 6, 4, 2, (2, 3, 3))
    factors32 = TuckerFactors(*(U.float() for U in factors))
    sol = solve_core(routed(keys.float(), gates.float(), idx), R.float(), factors32, 0.1)
    assert sol.G_flat.dtype == torch.float32
    left, right = lowrank_update(sol, factors32, P.float())
    assert left.dtype == right.dtype == torch.float32
    assert predicted_change(sol, factors32, keys.float(), gates.float(), idx).dtype == torch.float32
    with pytest.raises(ValueError, match="lam"):
        solve_core(routed(keys, gates, idx), R, factors, 0.0)
    with pytest.raises(ValueError, match="memory"):
        solve_core(routed(keys, gates, idx), R, factors, 0.1, memory=torch.eye(6, dtype=f64), side="T")
