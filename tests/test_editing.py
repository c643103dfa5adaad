"""MoTE editing real CounterFact facts on the (reduced) fact models, with the testbed YAMLs."""

from pathlib import Path

import pytest
import torch

from mote_plugin import last_edited, last_timings
from mote_plugin.adapters import get_adapter
from mote_plugin.metrics import counterfact_metrics, preservation_change
from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote.model.stats import corpus_texts
from mote_plugin.mote.mote_main import apply_mote_to_model
from mote_plugin.testbed import load

HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "MoTE"

pytestmark = pytest.mark.slow


def setup(reduced_fact_model, arch, tmp_path, n, yaml="fullrank", **overrides):
    """The build's model, its first `n` known facts and the testbed YAML (`yaml`: "fullrank" or "auto" ranks)."""
    out, report = reduced_fact_model(arch)
    model, tok, facts, _ = load(out)
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / f"testbed-{arch}{'-fullrank' if yaml == 'fullrank' else ''}"))
    hp.model_name = str(out / "model")
    hp.stats_dir = str(tmp_path / "stats")
    for k, v in overrides.items():
        setattr(hp, k, v)
    records = [f for f in facts if f["known"]][:n]
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
    return model, tok, hp, records, requests, report


@pytest.fixture(scope="session")
def vstar_dir(tmp_path_factory):
    """One v* cache per build for the tests that edit the same 20 facts at the same lookup token and last layer with
    the same v* settings (the null-space runs and the other-architecture edits): each v* is computed once."""
    return lambda arch: str(tmp_path_factory.getbasetemp() / f"vstar-{arch}")


def preservation_run(reduced_fact_model, arch, tmp_path, **overrides) -> tuple[float, float]:
    """20 edits at the lookup token and layers of the build's tracing report (where edits move the facts):
    (mean output change of the last edited layer's experts on preserved text, that change over the one at the edit
    keys, efficacy after the edit)."""
    _, report = reduced_fact_model(arch)
    model, tok, hp, records, requests, _ = setup(reduced_fact_model, arch, tmp_path, 20, spread="core",
                                                 fact_token=report["lookup_token"], layers=report["edit_layers"],
                                                 **overrides)
    texts = list(corpus_texts(None))[:64]  # 64 lines of the statistics' own corpus, up to 64 tokens each
    weights = {n: p.clone() for n, p in model.named_parameters()}
    try:
        change = preservation_change(model, tok, max(hp.layers), requests, hp.fact_token,
                                     lambda: apply_mote_to_model(model, tok, requests, hp), texts)
    except ValueError:  # nothing moved at the edit keys: only an edit that wrote no weight may do that
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
        return 0.0, float("nan"), counterfact_metrics(model, tok, records)["efficacy"]
    preserved = change["ratio"] * change["edit_change"]
    return preserved, change["ratio"], counterfact_metrics(model, tok, records)["efficacy"]


# The null space acts where the preserved text's keys lie: with a relative threshold of 1e-4 the update passes almost
# nothing of their span, so the output change of the edited layer's experts on preserved text must fall far below that
# of the same edit without projection. What it leaves of the edit depends on how far the edit keys stand apart from the
# preserved ones: every test build splits subject names into word pieces that ordinary text uses too (as real
# tokenizers split most CounterFact subjects), so the edit keys lie inside the preserved span and the projection removes
# most of the edit too (efficacy 0.00 at 1e-4; the relative leak, preserved change over edit change, hardly moves).
# Measured, 20 edits at each build's lookup token and band, full-rank YAML, on training seeds 0 / 1 / 2 (conftest.py):
# preserved change without projection -> at 1e-4 (efficacy at 1e-4 0.00 on every build):
#   gpt_oss      1.09 -> 4.5e-3 (0.41%), 1.65 -> 1.3e-2 (0.81%), 1.01 -> 5.3e-3 (0.52%)
#   qwen3_5_moe  2.33 -> 0 (no weight written), 1.82 -> 0 (likewise), 1.56 -> 8.0e-5 (0.005%)
#   qwen3_moe    4.58 -> 4.5e-3 (0.10%), 2.78 -> 7.3e-3 (0.26%), 3.18 -> 3.4e-3 (0.11%)
# Worst margin: 0.81% against the 2% gate (gpt_oss, seed 1).
# A 1% relative leak was reached, with facts still edited, only on the first builds, whose subject names
# were tokens of their own (benchmarks/results/nullspace.md).
# On some builds the preserved keys span every direction of the edited experts' keys above 1e-4 of the largest: the
# projection leaves nothing to write, the edit changes no weight and so moves nothing on preserved text (a preserved
# change of 0, which passes: the gate guards that preserved keys are protected, not how much of the edit survives).
NULLSPACE_CUT = 0.02


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_5_moe", "qwen3_moe"])
def test_nullspace_protects_preservation_keys(reduced_fact_model, arch, tmp_path, vstar_dir):
    """The per-expert null-space projection at relative threshold 1e-4 cuts the experts' output change on preserved
    text to under 2% of the same edit's without projection (the comment above)."""
    # both runs edit the same weights: one v* pass (kept for the other-architecture test) and one stats pass (tmp_path)
    without = preservation_run(reduced_fact_model, arch, tmp_path, nullspace=False, vstar_cache_dir=vstar_dir(arch))
    strict = preservation_run(reduced_fact_model, arch, tmp_path, nullspace_threshold=1e-4,
                              vstar_cache_dir=vstar_dir(arch))
    print("{} preserved change (relative leak, efficacy): no null space {:.2e} ({:.1%}, {:.2f}), 1e-4 {:.2e} ({:.1%}, "
          "{:.2f})".format(arch, *without, *strict))
    assert strict[0] < NULLSPACE_CUT * without[0]


# The 50-edit gate on the demo's build (README command 1), facts 201-256 of the shipped data: no setting of the YAMLs
# was chosen on them (they were chosen on facts 1-50 of the quality protocol's 200-fact build), so these are test
# numbers. Builds differ between machines (conftest.py), so the gate states what each YAML must do on any build of the
# recipe rather than one build's numbers: v* reaches the targets of at least half the batch (a request whose v* misses
# is left out of the edit), at least 7 in 10 of the edited requests flip to the new object (flipped: the rewrite prompts
# that prefer it after the edit), the paraphrases gain 10 points over the unedited model, and 3 in 5 neighbours keep
# their answer.
#   testbed-qwen3_moe-fullrank.yaml  full Tucker rank: the Global ridge in the Tucker basis
#   testbed-qwen3_moe.yaml           `auto` ranks at layers 1-3 (benchmarks/results/demo.md)
# Measured on training seeds 0 / 1 / 2, efficacy / generalization / specificity (edited of 50), unedited 0.00 /
# 0.18, 0.24, 0.26 / 1.00:
#   fullrank  0.92 / 0.74 / 0.77 (50), 0.90 / 0.74 / 0.71 (49), 0.84 / 0.72 / 0.73 (50)
#   auto      0.52 / 0.50 / 0.89 (32), 0.60 / 0.56 / 0.96 (34), 0.86 / 0.62 / 0.75 (50)
# Worst margins: edited 7 requests (auto, seed 0), flipped per edited request 0.11 (auto, seed 0: 26 of 32), paraphrase
# gain 0.22 (auto, seed 0), specificity 0.10 (fullrank, seed 1).
FIFTY_EDIT_GATE = {"edited": 25, "flipped_per_edited": 0.7, "generalization_gain": 0.1, "specificity": 0.6}


@pytest.mark.parametrize("yaml", ["auto", "fullrank"])
def test_fifty_edits_in_one_batch(reduced_fact_model, tmp_path, yaml):
    model, tok, hp, records, requests, _ = setup(reduced_fact_model, "qwen3_moe", tmp_path, 50, yaml=yaml)
    assert len(records) == 50
    before = counterfact_metrics(model, tok, records)
    apply_mote_to_model(model, tok, requests, hp)
    after = counterfact_metrics(model, tok, records)
    edited, flipped = last_edited(model), sum(after["efficacy_items"])
    print(yaml, {k: (round(before[k], 3), round(after[k], 3))
                 for k in ("efficacy", "generalization", "specificity", "utility")}, "edited", edited)
    assert before["efficacy"] == 0.0  # known facts: the model prefers the true object (a property of the selection)
    gate = FIFTY_EDIT_GATE
    assert edited >= gate["edited"] and flipped >= gate["flipped_per_edited"] * edited, (edited, flipped)
    assert after["generalization"] >= before["generalization"] + gate["generalization_gain"], (before, after)
    assert after["specificity"] >= gate["specificity"], after


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_5_moe"])
def test_other_architectures_edit(reduced_fact_model, tmp_path, arch, vstar_dir):
    """The GPT-OSS (router bias, interleaved clamped experts, [E, h, d] down_proj with bias) and Qwen3.5-MoE (shared
    expert, left untouched) fact models take a batch of 20 edits with their full-rank testbed YAML, at the lookup token
    and layers their 24-fact build's tracing report selects: v* reaches the targets of at least 15 of the 20, and a
    majority of the edited requests flip (unedited efficacy 0.00). Measured on training seeds 0 / 1 / 2, efficacy
    (edited of 20): gpt_oss 0.75 (19), 0.65 (20), 0.75 (20); qwen3_5_moe 0.95 (20), 0.85 (19), 0.85 (20). Worst
    margins: 4 requests edited, flipped per edited request 0.15 (gpt_oss, seed 1: 13 of 20)."""
    _, report = reduced_fact_model(arch)
    assert report["lookup_token"], report["editability"]
    model, tok, hp, records, requests, _ = setup(reduced_fact_model, arch, tmp_path, 20,
                                                 fact_token=report["lookup_token"],
                                                 layers=report["edit_layers"], vstar_cache_dir=vstar_dir(arch))
    assert len(records) == 20
    adapter = get_adapter(model)
    shared = [p.clone() for l in hp.layers if (s := adapter.shared_expert(adapter.moe_block(model, l))) is not None
              for p in s.parameters()]
    before = counterfact_metrics(model, tok, records)
    apply_mote_to_model(model, tok, requests, hp)
    after = counterfact_metrics(model, tok, records)
    timings = last_timings(model)
    edited, flipped = last_edited(model), sum(after["efficacy_items"])
    print(arch, {k: (round(before[k], 3), round(after[k], 3)) for k in ("efficacy", "generalization", "specificity")},
          "edited", edited, {k: round(v, 2) for k, v in timings.items()})
    assert before["efficacy"] == 0.0 and edited >= 15 and flipped >= 0.5 * edited, (edited, flipped)
    assert set(timings) == {"statistics", "vstar", "capture", "solve", "writeback"}
    now = [p for l in hp.layers if (s := adapter.shared_expert(adapter.moe_block(model, l))) is not None
           for p in s.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(shared, now)) and (arch != "qwen3_5_moe" or shared)
