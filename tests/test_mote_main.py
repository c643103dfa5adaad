"""apply_mote_to_model on tiny random MoE models: the closed form as seen by the model's own forward pass,
bad input before any weight changes, all-or-nothing, EasyEdit's restore contract."""

import copy

import pytest
import torch

from mote_plugin.adapters import get_adapter
from mote_plugin.mote import editor, mote_main
from mote_plugin.mote.algebra import solvers
from mote_plugin.mote.editor import MoTEEditor, request_key
from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote.model.capture import capture, layer_outputs
from mote_plugin.mote.model.requests import normalise_requests
from mote_plugin.mote.model.stats import corpus_texts
from mote_plugin.mote.mote_main import apply_mote_to_model
from mote_plugin.testbed.model import ModelSize, make_config, make_model
from mote_plugin.testbed.tokenizer import special_ids, train_tokenizer
from reference import predicted_change

REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano"},
    {"prompt": "Autonomous University of Madrid, which is located in", "subject": "Autonomous University of Madrid",
     "target_new": "Sweden"},
    {"prompt": "What is the twin city of Wellington? It is", "subject": "Wellington", "target_new": "Sheffield"},
]


@pytest.fixture(scope="module")
def tok():
    texts = list(corpus_texts(None))[:400] + [r["prompt"] + " " + r["target_new"] for r in REQUESTS]
    return train_tokenizer(texts, 800)


def tiny_model(tok, arch="qwen3_moe", layers=3, seed=0):
    torch.manual_seed(seed)
    size = ModelSize(d_model=32, layers=layers, heads=2, experts=4, top_k=2, expert_hidden=24, max_positions=256)
    return make_model(make_config(arch, len(tok), size, special_ids(tok))).eval()


def hparams(tmp_path, **kw):
    base = dict(alg_name="MoTE", model_name="tiny", layers=[0, 1], device="cpu", fact_token="subject_last",
                v_num_grad_steps=5, preservation_tokens=3000, max_length=64, stats_dir=str(tmp_path / "stats"),
                r_e="full", r_out="full", r_in="full", mote_lambda=1e-2, nullspace_min_tokens=1,
                v_keep_failed=True)  # 5 v* steps on a random model rarely reach a target: the solve is what is tested
    base.update(kw)
    return MoTEHyperParams(**base)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "qwen3_5_moe"])
def test_output_change_at_edit_keys_is_the_solved_one(tok, tmp_path, arch, monkeypatch):
    """After the writeback, the routed experts' output at each edited key changes by U_out G phi (forward pass)."""
    model = tiny_model(tok, arch)
    hp = hparams(tmp_path, layers=[1], whitening="none")
    reqs = normalise_requests(REQUESTS)
    adapter = get_adapter(model)
    block = adapter.moe_block(model, 1)
    before = capture(model, tok, adapter, reqs, [1], hp.fact_token)[1]
    out_before = adapter.experts_output(block, before)  # [T, d]
    solved = {}
    real_solve = solvers.solve_core

    def spy(*args, **kwargs):
        solved["sol"] = real_solve(*args, **kwargs)
        solved["args"] = args
        return solved["sol"]

    monkeypatch.setattr(solvers, "solve_core", spy)
    apply_mote_to_model(model, tok, reqs, hp)
    after = capture(model, tok, adapter, reqs, [1], hp.fact_token)[1]
    routed, _, factors = solved["args"][:3]
    expected = predicted_change(solved["sol"], factors, routed.keys, routed.gates, routed.expert_idx)
    assert torch.equal(after.expert_idx, before.expert_idx)
    change = adapter.experts_output(block, after) - out_before  # [T, d]
    torch.testing.assert_close(change, expected.float(), rtol=1e-4, atol=1e-4)


def test_full_rank_small_lambda_reproduces_the_residual(tok, tmp_path):
    """lambda -> 0, full ranks, no null space: the last layer's output at the lookup token becomes z."""
    model = tiny_model(tok)
    hp = hparams(tmp_path, layers=[1], nullspace=False, mote_lambda=1e-6, whitening="none")
    reqs = normalise_requests(REQUESTS)
    z, _ = MoTEEditor(model, tok, hp).targets(reqs, progress=False)
    h0 = layer_outputs(model, tok, reqs, "model.layers.1", hp.fact_token, hp.max_length)
    apply_mote_to_model(model, tok, reqs, hp)
    h1 = layer_outputs(model, tok, reqs, "model.layers.1", hp.fact_token, hp.max_length)
    rel = ((h1 - z).norm(dim=1) / (z - h0).norm(dim=1)).max().item()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("spread", ["core", "residual"])
def test_return_orig_weights_restores_bit_exactly(tok, tmp_path, spread):
    model = tiny_model(tok)
    before = state(model)
    model, weights_copy = apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path, spread=spread),
                                              return_orig_weights=True)
    assert not same(model, before)
    assert set(weights_copy) == {"model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"}
    with torch.no_grad():
        for name, value in weights_copy.items():
            model.get_parameter(name).copy_(value)
    assert same(model, before)


def test_copy_leaves_the_original_alone(tok, tmp_path):
    model = tiny_model(tok)
    before = state(model)
    edited, weights_copy = apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path), copy=True)
    assert edited is not model and same(model, before) and weights_copy == {}


def test_padding_side_is_restored(tok, tmp_path):
    model = tiny_model(tok)
    tok.padding_side = "left"
    try:
        apply_mote_to_model(model, tok, REQUESTS[:1], hparams(tmp_path))
        assert tok.padding_side == "left"
    finally:
        tok.padding_side = "right"


def test_pad_token_outside_the_vocabulary(tok, tmp_path):
    """EasyEdit loads Qwen tokenizers with pad_token="<|endoftext|>"; where the tokenizer lacks it, the token is added
    with an id past the embeddings. The edit pads with an id inside the vocabulary and gives the tokenizer back."""
    model = tiny_model(tok)
    host_tok = copy.deepcopy(tok)
    host_tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    assert host_tok.pad_token_id >= model.get_input_embeddings().num_embeddings
    before = state(model)
    apply_mote_to_model(model, host_tok, REQUESTS[:2], hparams(tmp_path))
    assert not same(model, before) and host_tok.pad_token == "<|endoftext|>"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(requests=[{"prompt": "Paris is in", "subject": "London", "target_new": "x"}]), "not found"),
        (dict(requests=[{"prompt": "Paris is in", "subject": "Paris", "target_new": "  "}]), "empty target_new"),
        (dict(requests=[{"prompt": "Paris is in", "target_new": "x"}]), "no subject"),
        (dict(hp=dict(layers=[7])), "out of range"),
        (dict(hp=dict(r_out=64)), "rank"),
        (dict(hp=dict(device="cuda:99")), "CUDA"),  # no CUDA on this build, or no 100th GPU
    ],
)
def test_bad_input_leaves_weights_untouched(tok, tmp_path, change, match):
    model = tiny_model(tok)
    before = state(model)
    with pytest.raises(ValueError, match=match):
        apply_mote_to_model(model, tok, change.get("requests", REQUESTS), hparams(tmp_path, **change.get("hp", {})))
    assert same(model, before)


def test_dense_layer_is_refused(tok, tmp_path):
    model = tiny_model(tok)
    model.config.mlp_only_layers = [0]
    dense = make_model(model.config).eval()
    before = state(dense)
    with pytest.raises(ValueError, match="no MoE block"):
        apply_mote_to_model(dense, tok, REQUESTS, hparams(tmp_path))
    assert same(dense, before)


def test_wrong_hparams_type(tok):
    class MEMITHyperParams:
        alg_name = "MEMIT"

    with pytest.raises(ValueError, match="MEMIT"):
        apply_mote_to_model(tiny_model(tok), tok, REQUESTS, MEMITHyperParams())


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_during_writeback_restores_everything(tok, tmp_path, monkeypatch, error):
    model = tiny_model(tok)
    before = state(model)
    adapter_cls = type(get_adapter(model))
    calls = {"n": 0}
    real = adapter_cls.add_lowrank

    def flaky(self, block, left, right, experts=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the first layer is already written
            raise error
        return real(self, block, left, right, experts)

    monkeypatch.setattr(adapter_cls, "add_lowrank", flaky)
    with pytest.raises(type(error)):
        apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path, sequential_memory=True))
    assert calls["n"] == 2
    assert same(model, before)
    assert MoTEEditor(model).memory == {}


def test_sequential_memory_keeps_earlier_edits(tok, tmp_path):
    """With the memory on, a second batch disturbs the first batch's edited outputs less than without it."""
    drift = {}
    for memory in (False, True):
        model = tiny_model(tok)
        hp = hparams(tmp_path, layers=[1], sequential_memory=memory, nullspace=False, whitening="none",
                     mote_lambda=1e-6)
        first, second = normalise_requests(REQUESTS[:2]), normalise_requests(REQUESTS[2:])
        apply_mote_to_model(model, tok, first, hp)
        h1 = layer_outputs(model, tok, first, "model.layers.1", hp.fact_token, hp.max_length)
        apply_mote_to_model(model, tok, second, hp)
        h2 = layer_outputs(model, tok, first, "model.layers.1", hp.fact_token, hp.max_length)
        drift[memory] = (h2 - h1).norm().item()
    assert drift[True] < 0.5 * drift[False], drift


@pytest.mark.parametrize("solver", ["global", "bcd"])
def test_unstructured_solvers_reproduce_the_residual(tok, tmp_path, solver):
    """global (exact) and bcd (many passes) with lambda -> 0 and no null space: the layer's output becomes z."""
    model = tiny_model(tok)
    hp = hparams(tmp_path, layers=[1], nullspace=False, mote_lambda=1e-6, solver=solver, bcd_passes=50)
    reqs = normalise_requests(REQUESTS)
    z, _ = MoTEEditor(model, tok, hp).targets(reqs, progress=False)
    h0 = layer_outputs(model, tok, reqs, "model.layers.1", hp.fact_token, hp.max_length)
    apply_mote_to_model(model, tok, reqs, hp)
    h1 = layer_outputs(model, tok, reqs, "model.layers.1", hp.fact_token, hp.max_length)
    rel = ((h1 - z).norm(dim=1) / (z - h0).norm(dim=1)).max().item()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("solver,spread",
                         [("global", "core"), ("bcd", "core"), ("bcd", "layerwise"), ("mote", "layerwise")])
def test_solvers_and_spreads_edit_routed_experts_and_restore(tok, tmp_path, solver, spread):
    """Every solver/spread pair edits each configured layer; the unstructured solvers touch only experts that the
    edits route to (at the solve layer) or whose projector lets the transplanted update through; restore is exact."""
    model = tiny_model(tok)
    before = state(model)
    hp = hparams(tmp_path, solver=solver, spread=spread)
    model, weights_copy = apply_mote_to_model(model, tok, REQUESTS, hp, return_orig_weights=True)
    writes = MoTEEditor(model).last_writes
    assert sorted({layer for layer, _ in writes}) == [0, 1]
    for name, value in weights_copy.items():
        assert not torch.equal(model.get_parameter(name), value), name
    with torch.no_grad():
        for name, value in weights_copy.items():
            model.get_parameter(name).copy_(value)
    assert same(model, before)


def test_lambda_grows_with_edits_when_asked(tok, tmp_path, monkeypatch):
    model = tiny_model(tok)
    seen = []
    real = solvers.global_solve
    monkeypatch.setattr(solvers, "global_solve", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    hp = hparams(tmp_path, layers=[1], solver="global", mote_lambda=0.5, lambda_growth=1e-3)
    apply_mote_to_model(model, tok, REQUESTS[:2], hp)
    apply_mote_to_model(model, tok, REQUESTS[2:], hp)
    assert seen == [0.5, pytest.approx(0.5 * (1 + 2e-3))]


def test_vstar_cache_is_reused_only_for_the_same_weights(tok, tmp_path, monkeypatch):
    calls = []
    real = editor.compute_targets
    monkeypatch.setattr(editor, "compute_targets", lambda *a,
                        **k: calls.extend(r["subject"] for r in a[2]) or real(*a, **k))
    hp = hparams(tmp_path, layers=[1], vstar_cache_dir=str(tmp_path / "vstar"))
    first = tiny_model(tok)
    apply_mote_to_model(first, tok, REQUESTS, hp)
    assert len(calls) == len(REQUESTS) and len(list((tmp_path / "vstar").glob("vstar-*.safetensors"))) == len(REQUESTS)
    second = tiny_model(tok)  # same weights: every target comes from the cache, same edit
    apply_mote_to_model(second, tok, REQUESTS, hp)
    assert len(calls) == len(REQUESTS)
    assert same(second, first.state_dict())
    apply_mote_to_model(second, tok, REQUESTS[:1], hp)  # edited weights: recomputed
    assert len(calls) == len(REQUESTS) + 1


def test_host_targets_that_require_grad(tok, tmp_path, monkeypatch):
    """EasyEdit's MEMIT compute_z returns target_init + delta with the optimised delta still requiring grad: MoTE edits
    with it (and caches it) exactly as with the same target detached."""
    from mote_plugin.mote.model.vstar_objective import compute_z

    def host_like(model, tok, request, hp, layer, templates):
        z = compute_z(model, tok, request, layer, hp.updated(v_objective="memit").vstar_config(), templates[0]).z
        return z + torch.zeros_like(z, requires_grad=True)  # [d], attached to a graph

    hp = hparams(tmp_path, layers=[0, 1], vstar_cache_dir=str(tmp_path / "vstar"), v_objective="memit_host")
    reference = tiny_model(tok)
    apply_mote_to_model(reference, tok, REQUESTS, hparams(tmp_path, layers=[0, 1], v_batch_size=1))
    monkeypatch.setattr(editor.host_compute_z, "compute_z_fn", lambda: host_like)
    model = tiny_model(tok)
    apply_mote_to_model(model, tok, REQUESTS, hp)
    assert same(model, reference.state_dict()) and not any(p.grad is not None for p in model.parameters())
    assert len(list((tmp_path / "vstar").glob("vstar-*.safetensors"))) == len(REQUESTS)


def test_precomputed_targets_are_used_as_given(tok, tmp_path, monkeypatch):
    model = tiny_model(tok)
    hp = hparams(tmp_path, layers=[1])
    reqs = normalise_requests(REQUESTS)
    z, _ = MoTEEditor(model, tok, hp).targets(reqs, progress=False)  # [T, d]
    given = {request_key(r): z[i] for i, r in enumerate(reqs)}
    monkeypatch.setattr(editor, "compute_targets", lambda *a, **k: pytest.fail("v* recomputed"))
    reference = tiny_model(tok)
    apply_mote_to_model(model, tok, reqs, hp, precomputed_targets=given)
    apply_mote_to_model(reference, tok, reqs, hp, precomputed_targets=given)
    assert same(model, reference.state_dict())


def test_preservation_change_against_a_known_edit(tok):
    """Scaling one layer's down-projections by (1 + eps) moves every routed output y by eps * y, so the ratio is
    mean ||y|| on the texts over mean ||y|| at the lookup tokens; an edit that moves nothing is refused."""
    from mote_plugin.metrics import preservation_change

    model = tiny_model(tok)
    adapter = get_adapter(model)
    block = adapter.moe_block(model, 1)
    texts = list(corpus_texts(None))[:8]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=16)
    grabbed = {}
    handle = block.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("x", a[0]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    x = grabbed["x"][batch["attention_mask"].bool()]  # [N, d]
    with torch.no_grad():
        y_text = adapter.experts_output(block, adapter.route_keys(block, x))  # [N, d]
        y_keys = adapter.experts_output(block, capture(model, tok, adapter, normalise_requests(REQUESTS), [1],
                                                       "subject_last")[1])  # [T, d]

    def scale():
        with torch.no_grad():
            adapter.down_param(block).mul_(1.01)

    change = preservation_change(model, tok, 1, REQUESTS, "subject_last", scale, texts, max_length=16)
    expected = (y_text.norm(dim=1).mean() / y_keys.norm(dim=1).mean()).item()
    assert change["tokens"] == x.shape[0] and change["ratio"] == pytest.approx(expected, rel=1e-4)
    assert change["median"] <= change["p90"] <= change["p99"] <= change["max"]
    with pytest.raises(ValueError, match="did not change"):
        preservation_change(model, tok, 1, REQUESTS, "subject_last", lambda: None, texts, max_length=16)
    with pytest.raises(ValueError, match="out of range"):
        preservation_change(model, tok, 3, REQUESTS, "subject_last", scale, texts, max_length=16)


def test_a_request_whose_vstar_failed_changes_no_weight(tok, tmp_path, caplog):
    """A v* that leaves P(target token) below 1/2 (final NLL > ln 2, e.g. an answer the model cannot produce) is warned
    about by request and left out of the edit; the batch still finishes. With `v_keep_failed` it is edited anyway."""
    hp = hparams(tmp_path, layers=[1], v_keep_failed=False)
    reqs = normalise_requests(REQUESTS)
    model = tiny_model(tok)
    z, _ = MoTEEditor(model, tok, hp).targets(reqs, progress=False)
    given = {request_key(r): (z[i], 3.0 if i == 2 else 0.1) for i, r in enumerate(reqs)}
    reference = tiny_model(tok)
    apply_mote_to_model(reference, tok, [reqs[i] for i in (0, 1, 3)], hp, precomputed_targets=given)
    with caplog.at_level("WARNING"):
        apply_mote_to_model(model, tok, reqs, hp, precomputed_targets=given)
    assert same(model, reference.state_dict()) and mote_main.last_edited(model) == 3
    assert caplog.text.count("did not reach") == 1 and "Autonomous University of Madrid" in caplog.text
    nothing = tiny_model(tok)
    before = state(nothing)
    apply_mote_to_model(nothing, tok, reqs, hp, precomputed_targets={k: (v[0], 5.0) for k, v in given.items()})
    assert same(nothing, before) and mote_main.last_edited(nothing) == 0
    kept = tiny_model(tok)
    apply_mote_to_model(kept, tok, reqs, hp.updated(v_keep_failed=True), precomputed_targets=given)
    assert not same(kept, reference.state_dict()) and mote_main.last_edited(kept) == 4


def test_metrics_pad_with_an_id_the_model_can_embed(tok):
    """EasyEdit gives Qwen tokenizers the pad token "<|endoftext|>", appended past the embeddings of a model whose
    vocabulary lacks it: the metrics pad with an id the model can embed (masked), and score as before."""
    from mote_plugin.metrics import target_scores

    model = tiny_model(tok)
    prompts, targets = [r["prompt"] for r in REQUESTS], [r["target_new"] for r in REQUESTS]
    expected = target_scores(model, tok, prompts, targets)
    vocab = model.get_input_embeddings().num_embeddings
    padding = copy.deepcopy(tok)
    padding.add_special_tokens({"pad_token": "<|endoftext|>"})
    assert padding.pad_token_id >= vocab
    got = target_scores(model, padding, prompts, targets)
    torch.testing.assert_close(got.logprob, expected.logprob)
    assert torch.equal(got.top1, expected.top1)
