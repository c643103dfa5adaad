"""The baseline solvers (global ridge, MoEEdit's BCD) against their definitions, and through the editor."""

import pytest
import torch

from mote_plugin.mote.algebra.baselines import bcd_solve, global_solve
from mote_plugin.mote.algebra.update import ExpertUpdate
from mote_plugin.mote.hparams import MoTEHyperParams
from reference import bcd_published, routed


def problem(T=7, E=5, K=2, d=6, h=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(T, K, h, generator=gen, dtype=torch.float64)
    scores = torch.rand(T, E, generator=gen)
    idx = scores.topk(K, dim=1).indices  # [T, K], distinct experts per edit
    gates = torch.softmax(torch.randn(T, K, generator=gen, dtype=torch.float64), dim=1)
    R = torch.randn(T, d, generator=gen, dtype=torch.float64)
    return keys, gates, idx, R, E


def dense_psi(keys, gates, idx, E):
    """Psi [T, E*h]: psi_t = [g_t1 k_t1; ...; g_tE k_tE] (zero blocks outside the top-k)."""
    T, K, h = keys.shape
    psi = torch.zeros(T, E, h, dtype=torch.float64)
    psi[torch.arange(T)[:, None], idx] = gates[..., None] * keys
    return psi.reshape(T, E * h)


def objective(delta, keys, gates, idx, R, lam):
    """sum_t ||r_t - sum_j g_tj Delta_j k_tj||^2 + lam ||Delta||^2, delta [E, d, h]."""
    pred = torch.einsum("tk,tkdh,tkh->td", gates, delta[idx], keys)
    return float(((R - pred) ** 2).sum() + lam * (delta**2).sum())


def test_global_solve_is_the_primal_ridge_minimiser():
    keys, gates, idx, R, E = problem()
    lam = 0.3
    psi = dense_psi(keys, gates, idx, E)  # [T, E*h]
    # [d, E*h]
    primal = torch.linalg.solve(psi.T @ psi + lam * torch.eye(psi.shape[1], dtype=torch.float64), psi.T @ R).T
    expected = primal.reshape(R.shape[1], E, -1).permute(1, 0, 2)  # [E, d, h]
    update = global_solve(routed(keys, gates, idx), R, lam)
    torch.testing.assert_close(update.dense(E).double(), expected, rtol=1e-5, atol=1e-6)
    # only routed experts are touched
    assert set(update.experts.tolist()) == set(idx.unique().tolist())


def test_bcd_iterates_are_moeedits():
    keys, gates, idx, R, E = problem(T=9, E=6)
    for passes in (1, 2, 3):
        ours = bcd_solve(routed(keys, gates, idx, E), R, 0.2, passes=passes, seed=42).dense(E).double()
        published = bcd_published(keys, gates, idx, R, 0.2, E, passes=passes, seed=42)
        torch.testing.assert_close(ours, published, rtol=1e-5, atol=1e-6)


def test_bcd_descends_to_the_global_optimum():
    keys, gates, idx, R, E = problem()
    lam = 0.5
    optimum = global_solve(routed(keys, gates, idx), R, lam).dense(E).double()
    values = [objective(bcd_solve(routed(keys, gates, idx, E), R, lam, passes=p).dense(E).double(), keys, gates, idx, R,
                        lam)
              for p in (1, 2, 4, 8, 200)]
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:])), values  # exact block minimisation never ascends
    assert values[-1] == pytest.approx(objective(optimum, keys, gates, idx, R, lam), rel=1e-6)


def test_gated_groups_cover_every_selection_once():
    keys, gates, idx, _, _ = problem()
    groups = routed(keys, gates, idx).gated_by_expert()
    assert sum(len(rows) for _, rows, _ in groups) == idx.numel()
    for j, rows, V in groups:
        slot = (idx[rows] == j).nonzero()[:, 1]
        torch.testing.assert_close(V, gates[rows, slot, None] * keys[rows, slot])


def test_expert_update_projection_and_padding():
    gen = torch.Generator().manual_seed(1)
    d, h, E = 5, 4, 3
    groups = [(0, torch.randn(d, 1, generator=gen), torch.randn(1, h, generator=gen)),
              (2, torch.randn(d, 3, generator=gen), torch.randn(3, h, generator=gen))]
    update = ExpertUpdate.from_groups(groups)
    dense = update.dense(E)
    torch.testing.assert_close(dense[0], groups[0][1] @ groups[0][2])
    torch.testing.assert_close(dense[2], groups[1][1] @ groups[1][2])
    assert torch.equal(dense[1], torch.zeros(d, h))
    q = torch.linalg.qr(torch.randn(h, 2, generator=gen)).Q
    P = (q @ q.T).expand(E, h, h)
    torch.testing.assert_close(update.projected(P).dense(E), dense @ P[0])
    with pytest.raises(ValueError, match="at least one expert"):
        ExpertUpdate.from_groups([])


def test_bad_solver_settings_are_refused():
    base = dict(alg_name="MoTE", model_name="m", layers=[1], device="cpu")
    with pytest.raises(ValueError, match="solver must be one of"):
        MoTEHyperParams(**base, solver="adam")
    with pytest.raises(ValueError, match="sequential_memory needs solver 'mote'"):
        MoTEHyperParams(**base, solver="bcd", sequential_memory=True)
    with pytest.raises(ValueError, match="nullspace_rule 'covariance' .* is defined for solver 'global'"):
        MoTEHyperParams(**base, nullspace_rule="covariance", nullspace_threshold=1e-3)
    with pytest.raises(ValueError, match="bcd_passes"):
        MoTEHyperParams(**base, solver="bcd", bcd_passes=0)
    with pytest.raises(ValueError, match="lambda_growth"):
        MoTEHyperParams(**base, lambda_growth=-1)
    with pytest.raises(ValueError, match="lam must be > 0"):
        keys, gates, idx, R, _ = problem()
        global_solve(routed(keys, gates, idx), R, 0.0)


def test_global_solve_with_the_covariance_rule_is_memit_on_the_routed_experts():
    """nullspace_rule "covariance": P_j = (C_j + eps_j I)^{-1/2}. The Global ridge solved on the keys P_j k and written
    as Delta_j P_j minimises MEMIT's objective with each expert's key covariance as its preservation term,

        sum_t ||r_t - sum_j g_tj Delta_j k_tj||^2 + lam sum_j tr(Delta_j (C_j + eps_j I) Delta_j^T),

    whose minimiser solves the normal equations (Psi^T Psi + lam blockdiag(C_j + eps_j I)) vec(Delta) = Psi^T R."""
    from mote_plugin.mote.algebra.nullspace import nullspace_projectors
    from mote_plugin.mote.algebra.solvers import LayerBasis, LayerSolution

    keys, gates, idx, R, E = problem()
    h, lam, eps = keys.shape[2], 0.7, 1e-2
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(E, 3 * h, h, generator=gen, dtype=torch.float64)
    C = A.transpose(1, 2) @ A / (3 * h)  # [E, h, h] uncentred key moments of the preservation text
    P = nullspace_projectors(C, torch.full((E,), 100), rule="covariance", threshold=eps)  # [E, h, h]
    ridge = torch.stack([C[j] + eps * torch.trace(C[j]) / h * torch.eye(h, dtype=torch.float64) for j in range(E)])
    torch.testing.assert_close(P.double() @ ridge @ P.double(), torch.eye(h, dtype=torch.float64).expand(E, h, h),
                               rtol=1e-4, atol=1e-4)
    basis = LayerBasis(P=P.double(), factors=None, key_maps=None)
    rk = routed(keys, gates, idx).projected(basis.P)
    solution = LayerSolution(routed=rk, expert_update=global_solve(rk, R, lam), layer=0)
    written = solution.update(basis, 0, 1.0).dense(E).double()  # [E, d, h]

    psi = dense_psi(keys, gates, idx, E)  # [T, E*h]
    blocks = torch.block_diag(*ridge)  # [E*h, E*h]
    expected = torch.linalg.solve(psi.T @ psi + lam * blocks, psi.T @ R).T.reshape(R.shape[1], E, h).permute(1, 0, 2)
    torch.testing.assert_close(written, expected, rtol=1e-4, atol=1e-5)
