"""Hard inputs, each with a clear outcome: duplicates and conflicts, empty and single-edit batches, both sides of the
Woodbury identity, identical keys, context-dependent tokenisation, unicode and over-long prompts, multi-token targets,
half-precision models. Reproducibility: the same inputs give bit-identical weights."""

import pytest
import torch

from mote_plugin.adapters import get_adapter
from mote_plugin.mote.algebra.core_solve import solve_core
from mote_plugin.mote.algebra.tucker import TuckerFactors
from mote_plugin.mote.editor import MoTEEditor, request_key
from mote_plugin.mote.model.capture import layer_outputs
from mote_plugin.mote.model.lookup import encode_with_lookup
from mote_plugin.mote.model.requests import normalise_requests
from mote_plugin.mote.mote_main import apply_mote_to_model
from reference import direct_ridge, routed
from test_mote_main import REQUESTS, hparams, same, state, tiny_model, tok  # noqa: F401 (tok: the fixture)


def test_duplicates_are_one_edit(tok, tmp_path):
    a, b = tiny_model(tok), tiny_model(tok)
    hp = hparams(tmp_path)
    apply_mote_to_model(a, tok, REQUESTS, hp)
    apply_mote_to_model(b, tok, REQUESTS + [dict(REQUESTS[0]), dict(REQUESTS[2])], hp)
    assert same(b, a.state_dict())


def test_conflicting_targets_are_refused_before_any_change(tok, tmp_path):
    model = tiny_model(tok)
    before = state(model)
    conflict = dict(REQUESTS[1], target_new="guitar")
    with pytest.raises(ValueError, match=r"conflicting requests for subject 'Toko Yasuda'.*'piano' and 'guitar'"):
        apply_mote_to_model(model, tok, REQUESTS + [conflict], hparams(tmp_path))
    assert same(model, before)
    # the same subject in another prompt (another relation) is not a conflict
    other = {"prompt": "Toko Yasuda was born in", "subject": "Toko Yasuda", "target_new": "Sweden"}
    assert len(normalise_requests(REQUESTS + [other])) == len(REQUESTS) + 1


def test_empty_batch_changes_nothing(tok, tmp_path):
    model = tiny_model(tok)
    before = state(model)
    out, weights = apply_mote_to_model(model, tok, [], hparams(tmp_path), return_orig_weights=True)
    assert out is model and weights == {} and same(model, before)


def residual_left(model, tok, reqs, hp, z) -> float:
    h = layer_outputs(model, tok, reqs, "model.layers.1", hp.fact_token, hp.max_length)
    return float(((h - z) ** 2).sum())  # the least-squares objective the solve lowers


@pytest.mark.parametrize("n,ranks", [(1, ("full", "full", "full")), (4, (1, 32, 3))], ids=["T=1", "T>r_e*r_in"])
def test_single_edit_and_the_feature_side(tok, tmp_path, n, ranks):
    """T = 1, and T = 4 > r_e * r_in = 3 (the feature-side solve): both move the layer output towards z."""
    model = tiny_model(tok)
    r_e, r_out, r_in = ranks
    hp = hparams(tmp_path, layers=[1], r_e=r_e, r_out=r_out, r_in=r_in, nullspace=False)
    reqs = normalise_requests(REQUESTS[:n])
    z, _ = MoTEEditor(model, tok, hp).targets(reqs, progress=False)
    before = residual_left(model, tok, reqs, hp, z)
    apply_mote_to_model(model, tok, reqs, hp)
    after = residual_left(model, tok, reqs, hp, z)
    assert torch.isfinite(torch.tensor(after)) and after < before


def test_feature_side_and_identical_keys_agree_with_the_direct_solve():
    gen = torch.Generator().manual_seed(0)
    E, d, h, K, T = 4, 6, 5, 2, 7
    factors = TuckerFactors(*(torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
                              for n, r in ((E, 2), (d, 3), (h, 2))))  # r_e * r_in = 4 < T
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    gates = torch.rand(T, K, generator=gen, dtype=torch.float64)
    R = torch.randn(T, d, generator=gen, dtype=torch.float64)
    for keys in (torch.randn(T, K, h, generator=gen, dtype=torch.float64),
                 torch.randn(1, K, h, generator=gen, dtype=torch.float64).expand(T, K, h)):  # identical keys: rank 1
        same_idx = idx if keys.stride(0) else idx[:1].expand(T, K)
        sol = solve_core(routed(keys, gates, same_idx), R, factors, lam=0.1)
        assert sol.side == "feature" and torch.isfinite(sol.G_flat).all()
        torch.testing.assert_close(sol.G_flat, direct_ridge(keys, gates, same_idx, R, factors, 0.1), rtol=1e-8,
                                   atol=1e-10)
        forced = solve_core(routed(keys, gates, same_idx), R, factors, lam=0.1, side="T")
        torch.testing.assert_close(forced.G_flat, sol.G_flat, rtol=1e-6, atol=1e-9)


def test_lookup_uses_the_prompts_own_tokenisation(tok):
    """A subject glued to punctuation, inside a longer word context, or with unicode: the lookup token is the last
    token that covers the subject's characters in the prompt as tokenised (never the standalone tokenisation)."""
    prompts = ["Toko Yasuda, the", "Autonomous University of Madrid, which is located in",
               "Ivo Andrić's mother tongue is 日本語"]
    subjects = ["Toko Yasuda", "Madrid", "Ivo Andrić"]
    batch, lookup, spans = encode_with_lookup(tok, prompts, subjects, "subject_last")
    for b, (prompt, subject) in enumerate(zip(prompts, subjects)):
        enc = tok(prompt, return_offsets_mapping=True)
        start, end = enc["offset_mapping"][int(lookup[b])]
        assert start < prompt.rfind(subject) + len(subject) <= end, (prompt, prompt[start:end])
        assert int(batch["input_ids"][b, lookup[b]]) == enc["input_ids"][int(lookup[b])]


def test_over_long_prompts(tok, tmp_path):
    """Beyond max_length the prompt is cut from the left: the edit works when the subject survives the cut, and is
    refused before any weight changes when it would not."""
    filler = "the history of the region is long and " * 20
    ends_with_subject = {"prompt": filler + "in the end Toko Yasuda plays the", "subject": "Toko Yasuda",
                         "target_new": "piano"}
    starts_with_subject = {"prompt": "Toko Yasuda plays the " + filler, "subject": "Toko Yasuda", "target_new": "piano"}
    model = tiny_model(tok)
    hp = hparams(tmp_path, max_length=32)
    apply_mote_to_model(model, tok, [ends_with_subject], hp)
    before = state(model)
    with pytest.raises(ValueError, match="longer than max_length=32 and the cut would drop the subject"):
        apply_mote_to_model(model, tok, [starts_with_subject], hp)
    assert same(model, before)


def test_unicode_and_multi_token_targets(tok, tmp_path):
    reqs = [{"prompt": "Ivo Andrić — the writer — speaks", "subject": "Ivo Andrić",
             "target_new": "Serbo-Croatian of Bosnia 🇧🇦"},
            {"prompt": "The capital of Ελλάδα is", "subject": "Ελλάδα", "target_new": "Thessaloniki city centre"}]
    model = tiny_model(tok)
    before = state(model)
    apply_mote_to_model(model, tok, reqs, hparams(tmp_path))
    assert not same(model, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype,unit", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_half_precision_models(tok, tmp_path, dtype, unit):
    """bf16/fp16 models: the update is computed in float32 and written once in the model's dtype. Checked two ways:
    (1) every written entry equals its float32 update up to the two roundings of the write (the delta cast to the
    dtype, then the in-place sum): |written - delta| <= u (|delta| + |W + delta|), u = 2^-8 bf16, 2^-11 fp16; (2) end
    to end, the update is close to the float32 edit of the same weights (the difference also carries the
    half-precision forward passes behind the keys, statistics and projectors: measured up to 17% of the update's norm
    in bf16, so < 25%)."""
    reference = tiny_model(tok).to(dtype).float()  # the same weights, representable in `dtype`
    half = tiny_model(tok).to(dtype)
    hp = hparams(tmp_path)
    reqs = normalise_requests(REQUESTS)
    z, _ = MoTEEditor(reference, tok, hp).targets(reqs, progress=False)
    given = {request_key(r): z[i] for i, r in enumerate(reqs)}
    _, ref_orig = apply_mote_to_model(reference, tok, reqs, hp, return_orig_weights=True, precomputed_targets=given)
    _, half_orig = apply_mote_to_model(half, tok, reqs, hp, return_orig_weights=True, precomputed_targets=given)
    adapter = get_adapter(half)
    computed = {}
    for layer, update in MoTEEditor(half).last_writes:
        name = f"model.layers.{layer}.mlp.experts.down_proj"
        computed[name] = computed.get(name, 0) + update.dense(adapter.num_experts(adapter.moe_block(half, layer)))
    for name in ref_orig:
        p = half.get_parameter(name)
        assert p.dtype == dtype
        written = p.detach().float() - half_orig[name].float()
        # subnormals
        bound = unit * (computed[name].abs() + p.detach().float().abs()) + torch.finfo(dtype).smallest_normal
        assert bool(((written - computed[name]).abs() <= bound).all()), name
        ref_delta = reference.get_parameter(name).detach() - ref_orig[name]
        rel = float((written - ref_delta).norm() / ref_delta.norm())
        assert rel < 0.25, (name, rel)


@pytest.mark.parametrize("solver,spread",
                         [("mote", "core"), ("mote", "residual"), ("global", "core"), ("bcd", "layerwise")])
def test_same_inputs_give_bit_identical_weights(tok, tmp_path, solver, spread):
    """Two fresh copies, the same requests and settings (fresh and shared statistics caches): bit-identical weights.
    Randomness: context templates sample from a seeded generator, BCD's order from a seeded permutation."""
    a, b, c = tiny_model(tok), tiny_model(tok), tiny_model(tok)
    apply_mote_to_model(a, tok, REQUESTS, hparams(tmp_path / "one", solver=solver, spread=spread))
    apply_mote_to_model(b, tok, REQUESTS, hparams(tmp_path / "two", solver=solver, spread=spread))
    torch.manual_seed(1234)  # global RNG state must not matter
    apply_mote_to_model(c, tok, REQUESTS, hparams(tmp_path / "one", solver=solver, spread=spread))  # cached statistics
    assert same(b, a.state_dict()) and same(c, a.state_dict())


def test_experts_without_weights_are_refused_before_any_change(tok, tmp_path):
    """Experts on the meta device with no accelerate hook holding their values (never loaded) would make every
    in-place write a silent no-op (offloaded experts are edited: tests/test_offload.py)."""
    model = tiny_model(tok)
    model.model.layers[1].mlp.experts.to("meta")
    before = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    with pytest.raises(ValueError,
                       match="layer 1: the weights experts.gate_up_proj, experts.down_proj are on the meta device and "
                             "not offloaded"):
        apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
