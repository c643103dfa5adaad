"""MoTE editing real CounterFact facts on the (reduced) fact models, with the testbed YAMLs."""

from pathlib import Path

import pytest
import torch

from mote_plugin.adapters import get_adapter
from mote_plugin.metrics import counterfact_metrics
from mote_plugin.mote.capture import capture
from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote.mote_main import apply_mote_to_model
from mote_plugin.mote.requests import normalise_requests
from mote_plugin.mote.stats import corpus_texts
from mote_plugin.testbed import load

HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "MoTE"

pytestmark = pytest.mark.slow


def setup(reduced_fact_model, arch, tmp_path, n, **overrides):
    out, report = reduced_fact_model(arch)
    model, tok, facts, _ = load(out)
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / f"testbed-{arch}"))
    hp.model_name = str(out / "model")
    hp.stats_dir = str(tmp_path / "stats")
    for k, v in overrides.items():
        setattr(hp, k, v)
    records = [f for f in facts if f["known"]][:n]
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
    return model, tok, hp, records, requests, report


def test_testbed_yaml_matches_the_tracing_report(reduced_fact_model):
    _, report = reduced_fact_model("qwen3_moe")
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / "testbed-qwen3_moe"))
    assert hp.fact_token == report["lookup_token"]
    assert hp.layers == report["edit_layers"]


def preservation_ratio(reduced_fact_model, tmp_path, **overrides) -> float:
    """Mean output change of the last edited layer on preservation-text tokens / at the edit keys."""
    model, tok, hp, records, requests, _ = setup(reduced_fact_model, "qwen3_moe", tmp_path, 20, spread="core", **overrides)
    layer = max(hp.layers)
    adapter = get_adapter(model)
    block = adapter.moe_block(model, layer)
    texts = list(corpus_texts(None))[:64]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    grabbed = {}
    handle = block.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("x", a[0].detach()))

    def preserved():
        with torch.no_grad():
            model(**batch)
        x = grabbed["x"][batch["attention_mask"].bool()]  # [N, d] real tokens only
        idx, gates = adapter.route(block, x)
        return adapter.experts_output(block, x, idx, gates)

    reqs = normalise_requests(requests)
    pres0, edit0 = preserved(), capture(model, tok, adapter, reqs, [layer], hp.fact_token)[layer].out
    apply_mote_to_model(model, tok, requests, hp)
    pres1, edit1 = preserved(), capture(model, tok, adapter, reqs, [layer], hp.fact_token)[layer].out
    handle.remove()
    return ((pres1 - pres0).norm(dim=1).mean() / (edit1 - edit0).norm(dim=1).mean()).item()


def test_nullspace_protects_preservation_keys(reduced_fact_model, tmp_path):
    """The per-expert null-space projection cuts the change on preserved text by far. (Measured here:
    about 2% of the change at the edit keys with a strict threshold, against about 13% without projection;
    the editor issue's < 1% is not reached on the fact model yet.)"""
    without = preservation_ratio(reduced_fact_model, tmp_path, nullspace=False)
    strict = preservation_ratio(reduced_fact_model, tmp_path, nullspace_threshold=1e-3)
    print(f"preservation / edit output change: no null space {without:.2e}, relative threshold 1e-3 {strict:.2e}")
    assert strict < 0.25 * without


def test_fifty_edits_in_one_batch(reduced_fact_model, tmp_path):
    """50 known facts rewritten at once with the testbed YAML (layers 0-2 at the subject's last token).
    Efficacy is the gate here; generalisation and specificity are printed (specificity is the editor's open
    problem on this model: the neighbourhood subjects share the rewritten object)."""
    model, tok, hp, records, requests, _ = setup(reduced_fact_model, "qwen3_moe", tmp_path, 50)
    assert len(records) == 50
    before = counterfact_metrics(model, tok, records)
    apply_mote_to_model(model, tok, requests, hp)
    after = counterfact_metrics(model, tok, records)
    print({k: (round(before[k], 3), round(after[k], 3)) for k in ("efficacy", "generalization", "specificity", "utility")})
    assert before["efficacy"] == 0.0 and after["efficacy"] >= 0.9
    assert after["generalization"] > before["generalization"]
