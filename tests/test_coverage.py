"""Coverage and the basis of a batch: the shares a basis holds of an edit, `auto` ranks, the edit-aware basis (and
what it equals), the coverage every edit reports, and the warning when an update reproduces too little."""

import logging

import pytest
import torch

from mote_plugin import last_coverage
from mote_plugin.adapters import get_adapter
from mote_plugin.cli import format_coverage
from mote_plugin.mote.algebra.batch_basis import BasisRule, batch_factors, extend, leading_rank
from mote_plugin.mote.algebra.coverage import kept_shares, measure_coverage, prefix_shares, reproduced_shares
from mote_plugin.mote.algebra.routed_keys import RoutedKeys
from mote_plugin.mote.algebra.tucker import TuckerFactors, tucker_factors
from mote_plugin.mote.editor import MoTEEditor, request_key
from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote.model.capture import capture, layer_outputs
from mote_plugin.mote.model.requests import normalise_requests
from mote_plugin.mote.mote_main import apply_mote_to_model
from reference import routed
from test_mote_main import REQUESTS, hparams, tiny_model, tok  # noqa: F401  (tok: a fixture)
from tiny import spread_routing


def orthonormal(n, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]


# ---------------------------------------------------------------------------------------------------------------------
# the algebra
# ---------------------------------------------------------------------------------------------------------------------


def test_prefix_shares_are_energy_shares_per_edit():
    U = orthonormal(6, 6)
    X = torch.zeros(2, 2, 6, dtype=torch.float64)
    X[0, 0] = 2 * U[:, 0]  # edit 0: energy 4 in column 0, 1 in column 2
    X[0, 1] = U[:, 2]
    X[1, 0] = U[:, 5]  # edit 1: all in the last column; its second vector is zero
    shares = prefix_shares(X, U)  # [2, 6]
    torch.testing.assert_close(shares[0], torch.tensor([0.8, 0.8, 1, 1, 1, 1], dtype=torch.float64))
    torch.testing.assert_close(shares[1], torch.tensor([0, 0, 0, 0, 0, 1], dtype=torch.float64))
    assert torch.equal(prefix_shares(torch.zeros(1, 1, 6), U), torch.ones(1, 6, dtype=torch.float64))  # nothing to hold


def test_leading_rank_is_the_fewest_columns_reaching_the_target():
    shares = torch.tensor([[0.1, 0.5, 0.9, 1.0], [0.3, 0.7, 0.8, 1.0]], dtype=torch.float64)  # mean .2 .6 .85 1
    assert leading_rank(shares, 0.6) == 2
    assert leading_rank(shares, 0.61) == 3
    assert leading_rank(shares, 1.0) == 4
    assert leading_rank(shares[:, :3], 0.9) == 3  # never reached: every column


def test_extend_spans_both_and_keeps_the_first_columns():
    U = orthonormal(10, 3).float()
    X = torch.randn(4, 10)
    X[3] = X[0] + 2 * U[:, 1]  # a row already inside span(U) + span(X[0])
    V = extend(U, X)  # [10, 3 + 3]
    assert V.shape == (10, 6)
    assert torch.equal(V[:, :3], U)
    torch.testing.assert_close(V.T @ V, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(V @ (V.T @ X.T), X.T, atol=1e-4, rtol=0)  # every row is in the span
    assert extend(U, U.T).shape == (10, 3)  # nothing new
    assert extend(orthonormal(4, 3).float(), torch.randn(5, 4)).shape == (4, 4)  # at most the space


def test_measure_full_basis_holds_everything_and_reproduced_is_the_projection():
    T, K, E, d, h = 5, 2, 4, 6, 7
    keys, gates = torch.randn(T, K, h), torch.rand(T, K)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    R = torch.randn(T, d)
    full = TuckerFactors(torch.eye(E), torch.eye(d), torch.eye(h))
    cov = measure_coverage(3, full, routed(keys, gates, idx, E), R, change=0.5 * R)
    assert cov.layer == 3 and cov.edits == T and cov.ranks == (E, d, h)
    for share in (cov.residual_in_U_out, cov.keys_in_U_in, cov.gates_in_U_e):
        assert share.mean == pytest.approx(1) and share.min == pytest.approx(1)
    assert cov.reproduced.mean == pytest.approx(0.5) and cov.reproduced.min == pytest.approx(0.5)
    no_basis = measure_coverage(3, None, routed(keys, gates, idx, E), R, R)
    assert no_basis.residual_in_U_out is None  # no basis: reproduced only
    g = routed(keys, gates, idx, E).dense_gates()
    assert torch.allclose(g.sum(1), gates.sum(1).double()) and (g > 0).sum(1).eq(K).all()
    assert torch.allclose(reproduced_shares(-R, R), -torch.ones(T, dtype=torch.float64))
    R[0] = 1e-3 * R[1] / R[1].norm() * R[1:].norm(dim=1).max()  # almost nothing left to write: left out
    shares = reproduced_shares(R + 1, R)
    assert shares[0].isnan() and not shares[1:].isnan().any()
    cov = measure_coverage(3, None, routed(keys, gates, idx, E), R, R + 1)
    assert cov.reproduced.mean == pytest.approx(float(shares[1:].mean()))


def test_auto_prefix_of_full_factors_is_the_rank_r_hosvd():
    """`auto` truncates the full HOSVD factors: a prefix is the factor computed at that rank (whitened too)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, 8, generator=gen)
    A = torch.randn(8, 8, generator=gen)
    cov_in = A @ A.T / 8
    for whitening in ("none", "in"):
        full = tucker_factors(W, (1.0, 1.0, 1.0), whitening=whitening, cov_in=cov_in)
        small = tucker_factors(W, (3, 4, 5), whitening=whitening, cov_in=cov_in)
        for U, V in zip(full.truncated((3, 4, 5)), small):
            torch.testing.assert_close(U, V, atol=1e-5, rtol=0)


def test_batch_factors_auto_and_edit_aware():
    T, K, E, d, h = 6, 2, 5, 12, 9
    gen = torch.Generator().manual_seed(1)
    keys, gates = torch.randn(T, K, h, generator=gen), torch.rand(T, K, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    R = torch.randn(T, d, generator=gen)
    full = TuckerFactors(*(orthonormal(n, n, seed=n).float() for n in (E, d, h)))
    auto = batch_factors(full, BasisRule(auto=(True, True, False), min_coverage=0.7), routed(keys, gates, idx, E),
                         R)
    assert auto.ranks[2] == h  # a fixed mode keeps the layer's factor
    for mode, (U, X) in enumerate(zip(auto[:2], (routed(keys, gates, idx, E).dense_gates()[:, None], R[:, None]))):
        r = U.shape[1]
        assert prefix_shares(X, U)[:, -1].mean() >= 0.7  # reaches the target...
        assert r == 1 or prefix_shares(X, full[mode][:, : r - 1])[:, -1].mean() < 0.7  # ...with the fewest columns
    small = full.truncated((2, 3, 3))
    edit = batch_factors(small, BasisRule(basis="weights+edit"), routed(keys, gates, idx, E), R)
    assert torch.equal(edit.U_e, small.U_e) and edit.ranks[1] == 3 + T and edit.ranks[2] == h
    cov = measure_coverage(0, edit, routed(keys, gates, idx, E), R, R)
    assert cov.residual_in_U_out.min == pytest.approx(1) and cov.keys_in_U_in.min == pytest.approx(1)
    assert cov.gates_in_U_e.min < 0.99  # the weights' U_e, not the batch's gates
    gated = batch_factors(small, BasisRule(basis="weights+edit+gates"), routed(keys, gates, idx, E), R)
    assert torch.equal(gated.U_out, edit.U_out) and torch.equal(gated.U_e[:, :2], small.U_e) and gated.ranks[0] == E
    assert measure_coverage(0, gated, routed(keys, gates, idx, E), R, R).gates_in_U_e.min == pytest.approx(1)


# ---------------------------------------------------------------------------------------------------------------------
# in an edit
# ---------------------------------------------------------------------------------------------------------------------


def down_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "down_proj" in n}


def edited(tok, tmp_path, **kw):  # noqa: F811
    model = tiny_model(tok)
    result = MoTEEditor(model, tok, hparams(tmp_path, **kw)).edit(REQUESTS, progress=False)
    return model, result


def max_difference(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_edit_aware_basis_is_the_expert_mode_alone(tok, tmp_path):  # noqa: F811
    """weights+edit at r_e < E edits exactly as r_out = d, r_in = h at the same r_e; at r_e = E it is the Global
    ridge (same lambda, projectors and spread)."""
    common = dict(spread="residual", nullspace_threshold=0.5, mote_lambda=1e-2)
    edit, _ = edited(tok, tmp_path, r_e=2, r_out=3, r_in=3, basis="weights+edit", **common)
    only_e, _ = edited(tok, tmp_path, r_e=2, r_out="full", r_in="full", **common)
    paper, _ = edited(tok, tmp_path, r_e=2, r_out=3, r_in=3, **common)
    edit_all, _ = edited(tok, tmp_path, r_e="full", r_out=3, r_in=3, basis="weights+edit", **common)
    ridge, _ = edited(tok, tmp_path, solver="global", **common)
    W = {name: down_weights(m) for name, m in
         {"edit": edit, "only_e": only_e, "paper": paper, "edit_all": edit_all, "ridge": ridge}.items()}
    scale = max(v.abs().max().item() for v in W["ridge"].values())
    assert max_difference(W["paper"], W["edit"]) > 1e-4 * scale  # the basis matters...
    assert max_difference(W["edit"], W["only_e"]) < 1e-6 * scale  # ...and the edit-aware one is the expert mode alone
    assert max_difference(W["edit_all"], W["ridge"]) < 1e-6 * scale


def test_every_edit_reports_its_coverage(tok, tmp_path):  # noqa: F811
    """One Coverage per solve, in the result and from last_coverage; `reproduced` is the share of each residual the
    model's own forward pass shows at the solve layer."""
    model = tiny_model(tok)
    hp = hparams(tmp_path, layers=[1], r_e=2, r_out=4, r_in=4, nullspace=False, whitening="none")
    reqs = normalise_requests(REQUESTS)
    adapter = get_adapter(model)
    editor = MoTEEditor(model, tok, hp)
    z, _ = editor.targets(reqs, progress=False)  # [T, d]
    h = layer_outputs(model, tok, reqs, "model.layers.1", hp.fact_token, hp.max_length)  # [T, d]
    block = adapter.moe_block(model, 1)
    before = capture(model, tok, adapter, reqs, [1], hp.fact_token)[1]
    out_before = adapter.experts_output(block, before)  # [T, d]
    result = editor.edit(reqs, precomputed_targets={request_key(r): zi for r, zi in zip(reqs, z)}, progress=False)
    after = capture(model, tok, adapter, reqs, [1], hp.fact_token)[1]
    assert torch.equal(after.expert_idx, before.expert_idx)
    (cov,) = result.coverage
    assert cov.layer == 1 and cov.edits == len(reqs) and cov.ranks == (2, 4, 4)
    change = adapter.experts_output(block, after) - out_before  # [T, d]
    shares = reproduced_shares(change, z - h)  # [T]
    shares = shares[~shares.isnan()]
    assert cov.reproduced.mean == pytest.approx(float(shares.mean()), abs=1e-4)
    assert cov.reproduced.min == pytest.approx(float(shares.min()), abs=1e-4)
    assert last_coverage(model) == [cov.to_dict()]
    assert 0.0 <= cov.residual_in_U_out.min <= cov.residual_in_U_out.mean <= 1.0


def test_residual_spread_reports_each_layer_and_auto_ranks(tok, tmp_path):  # noqa: F811
    _, result = edited(tok, tmp_path, spread="residual", r_e="auto", r_out="auto", r_in=4, min_coverage=0.8)
    assert [c.layer for c in result.coverage] == [0, 1]
    for cov in result.coverage:
        assert cov.ranks[2] == 4
        assert cov.gates_in_U_e.mean >= 0.8 - 1e-9 and cov.residual_in_U_out.mean >= 0.8 - 1e-9


def test_low_reproduced_share_warns_naming_what_to_change(tok, tmp_path, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING, logger="mote_plugin.mote.editor"):
        edited(tok, tmp_path, layers=[1], r_e=1, r_out=1, r_in=1, nullspace=False, min_reproduced=0.9)
    warning = [r.getMessage() for r in caplog.records if "min_reproduced" in r.getMessage()]
    assert warning and "basis: weights+edit" in warning[0] and "auto" in warning[0], warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mote_plugin.mote.editor"):
        edited(tok, tmp_path, layers=[1], r_e=1, r_out=1, r_in=1, nullspace=False, min_reproduced=0.0)
    assert not [r for r in caplog.records if "min_reproduced" in r.getMessage()]


@pytest.mark.parametrize("change,match", [
    ({"basis": "weights+edit", "spread": "core"}, "spread 'residual' or 'layerwise'"),
    ({"basis": "weights+edit", "spread": "residual", "sequential_memory": True}, "sequential_memory: false"),
    ({"r_out": "auto", "sequential_memory": True}, "sequential_memory: false"),
    ({"r_out": "auto", "hooi_sweeps": 1}, "hooi_sweeps: 0"),
    ({"basis": "edit"}, "basis must be one of"),
    ({"r_in": "most"}, "'full' or 'auto'"),
    ({"min_coverage": 0}, "min_coverage"),
    ({"min_reproduced": 1.5}, "min_reproduced"),
])
def test_bad_basis_settings_are_refused(change, match):
    base = dict(alg_name="MoTE", model_name="m", layers=[0], device="cpu")
    with pytest.raises(ValueError, match=match):
        MoTEHyperParams(**base, **change)


def test_edit_aware_edit_is_all_or_nothing(tok, tmp_path):  # noqa: F811
    model = tiny_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = hparams(tmp_path, spread="residual", basis="weights+edit", r_e=2, r_out=3, r_in=3)
    model, originals = apply_mote_to_model(model, tok, REQUESTS, hp, return_orig_weights=True)
    with torch.no_grad():
        for name, value in originals.items():
            model.get_parameter(name).copy_(value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# the null space in the coverage
# ---------------------------------------------------------------------------------------------------------------------


def test_kept_shares_are_the_energy_past_each_projector():
    """Per edit and per expert: the gated keys' energy that passes P_j over the energy before it."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 6, generator=gen)  # [T, K, h]
    idx = torch.tensor([[0, 1], [1, 2], [0, 2]])
    gates = torch.rand(3, 2, generator=gen)
    captured = RoutedKeys(idx, gates, keys, 4)
    P = torch.stack([torch.eye(6), torch.zeros(6, 6), torch.diag(torch.tensor([1.0, 1, 1, 0, 0, 0])), torch.eye(6)])
    per_edit, per_expert = kept_shares(captured, captured.projected(P))
    g = gates[..., None] * keys  # [T, K, h]
    energy = (g**2).sum(-1)  # [T, K]
    assert per_expert[0] == pytest.approx(1.0) and per_expert[1] == 0.0
    assert per_expert[2] == pytest.approx(float(((g[1, 1, :3] ** 2).sum() + (g[2, 1, :3] ** 2).sum())
                                                / (energy[1, 1] + energy[2, 1])))
    assert per_edit[0] == pytest.approx(float(energy[0, 0] / energy[0].sum()))
    assert per_edit[1] == pytest.approx(float((g[1, 1, :3] ** 2).sum() / energy[1].sum()))
    assert set(per_expert) == {0, 1, 2}


def test_absolute_threshold_that_empties_the_null_space_is_named(tok, tmp_path, caplog):  # noqa: F811
    """AlphaEdit's absolute 2e-2 (the real YAMLs' setting) on a tiny model whose keys are all larger: no expert keeps a
    null-space direction, the edit writes exactly zero, the coverage says no key passed and which experts have an
    empty null space (not that U_in holds the keys), and the warning names the null space and its settings first."""
    model, _ = spread_routing(tiny_model(tok))  # expert weights of std 0.5: every key direction above 2e-2
    before = down_weights(model)
    hp = hparams(tmp_path, layers=[1], nullspace_rule="absolute", nullspace_threshold=2e-2, r_e="auto", r_out="auto",
                 r_in="auto", spread="residual", min_reproduced=0.5)
    with caplog.at_level(logging.WARNING, logger="mote_plugin.mote.editor"):
        result = MoTEEditor(model, tok, hp).edit(REQUESTS, progress=False)
    assert max_difference(down_weights(model), before) == 0.0  # nothing passed the projectors
    (cov,) = result.coverage
    assert cov.keys_kept.mean == 0.0 and cov.keys_kept.min == 0.0
    assert cov.empty_nullspace == (0, 1, 2, 3) and cov.kept_by_expert and set(cov.kept_by_expert.values()) == {0.0}
    assert cov.keys_in_U_in is None  # no key left to be held
    assert cov.reproduced.mean == 0.0
    (warning,) = [r.getMessage() for r in caplog.records if "min_reproduced" in r.getMessage()]
    advice = warning.split("may not take: ", 1)[1]
    assert advice.startswith("the null space removes most of the edit"), advice
    for setting in ("nullspace_rule 'absolute'", "nullspace_threshold 0.02", "preservation_tokens 3000",
                    "nullspace_min_tokens"):
        assert setting in advice
    assert advice.index("null space") < advice.index("mote_lambda")
    line = format_coverage(1, cov.to_dict())
    assert "keys past the null space 0.00 (min 0.00)" in line and "experts with an empty null space 4" in line
    assert "keys in U_in" not in line


def test_relative_rule_keeps_part_of_the_keys_and_says_so(tok, tmp_path):  # noqa: F811
    _, result = edited(tok, tmp_path, layers=[1])  # the default: relative, 1e-2
    (cov,) = result.coverage
    assert 0.0 < cov.keys_kept.mean < 1.0 and 0.0 <= cov.keys_kept.min <= cov.keys_kept.mean
    assert all(0.0 <= share < 1.0 for share in cov.kept_by_expert.values())
    assert all(cov.kept_by_expert.get(j, 0.0) == 0.0 for j in cov.empty_nullspace)  # an empty null space passes nothing
    assert cov.to_dict()["keys_kept"] == {"mean": cov.keys_kept.mean, "min": cov.keys_kept.min}
