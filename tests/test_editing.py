"""MoTE editing real CounterFact facts on the (reduced) fact models, with the testbed YAMLs."""

from pathlib import Path

import pytest
import torch

from mote_plugin.adapters import get_adapter
from mote_plugin.metrics import counterfact_metrics, preservation_change
from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote import mote_main
from mote_plugin.mote.mote_main import apply_mote_to_model
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


@pytest.fixture(scope="session")
def vstar_dir(tmp_path_factory):
    """One v* cache per build for the tests that edit the same 20 facts at the same lookup token and last layer with
    the same v* settings (the null-space runs and the other-architecture edits): each v* is computed once."""
    return lambda arch: str(tmp_path_factory.getbasetemp() / f"vstar-{arch}")


def preservation_run(reduced_fact_model, arch, tmp_path, **overrides) -> tuple[float, float]:
    """20 edits at the lookup token and layers of the build's tracing report (where edits move the facts):
    (mean output change of the last edited layer on preserved text / at the edit keys, efficacy after the edit)."""
    _, report = reduced_fact_model(arch)
    model, tok, hp, records, requests, _ = setup(reduced_fact_model, arch, tmp_path, 20, spread="core",
                                                 fact_token=report["lookup_token"], layers=report["edit_layers"], **overrides)
    texts = list(corpus_texts(None))[:64]  # 64 lines of the statistics' own corpus, up to 64 tokens each
    change = preservation_change(model, tok, max(hp.layers), requests, hp.fact_token,
                                 lambda: apply_mote_to_model(model, tok, requests, hp), texts)
    return change["ratio"], counterfact_metrics(model, tok, records)["efficacy"]


# How far the null space keeps preserved text apart from an edit that still moves the facts depends on how far the edit
# keys stand apart from the preserved keys. Measured with the builds of tests/conftest.py, 20 edits at each build's
# lookup token (`python benchmarks/editing.py --build DIR --n 20 --set spread=core --set fact_token=TOKEN --set
# layers=BAND --sweep nullspace_threshold=1,0.1,1e-2,1e-4 --preservation`; benchmarks/results/nullspace.md):
#   build          ratio (efficacy): no projection | 0.1        | 1e-2        | 1e-4
#   qwen3_5_moe    22% (0.65)                      | 8.0% (0.60) | 3.3% (0.50) | 0.04% (0.25)
#   gpt_oss        25% (0.94)                      | 7.8% (0.88) | 3.7% (0.88) | 1.1% (0.71)
#   qwen3_moe      40% (1.00)                      | 30% (0.90)  | 39% (0.75)  | 9.7% (0.05)
# The qwen3_moe build splits names into shared word pieces, so the subject's last token is an ordinary piece whose key
# the preserved text already covers: a key inside the preserved span cannot be moved without moving the preserved text.
# The 1% is reached, with an edit that still changes facts, only on qwen3_5_moe; the test asserts it there and
# a cut to under 30% of the unprojected leak on every build.
PRESERVATION_LIMIT = {"gpt_oss": None, "qwen3_5_moe": 0.01, "qwen3_moe": None}


@pytest.mark.parametrize("arch", sorted(PRESERVATION_LIMIT))
def test_nullspace_protects_preservation_keys(reduced_fact_model, arch, tmp_path, vstar_dir):
    """The per-expert null-space projection cuts the output change on preserved text, relative to the change at the
    edit keys, to under 30% of its value without projection, and under 1% on the build where the edit keys stand
    apart from the preserved keys, with facts still edited (the comment above)."""
    # both runs edit the same weights: one v* pass (kept for the other-architecture test) and one stats pass (tmp_path)
    without, _ = preservation_run(reduced_fact_model, arch, tmp_path, nullspace=False, vstar_cache_dir=vstar_dir(arch))
    strict, efficacy = preservation_run(reduced_fact_model, arch, tmp_path, nullspace_threshold=1e-4, vstar_cache_dir=vstar_dir(arch))
    print(f"{arch} preservation / edit output change: no null space {without:.2e}, relative threshold 1e-4 {strict:.2e} "
          f"(efficacy {efficacy:.2f})")
    assert strict < 0.3 * without
    if PRESERVATION_LIMIT[arch] is not None:
        assert strict < PRESERVATION_LIMIT[arch] and efficacy > 0


def test_fifty_edits_in_one_batch(reduced_fact_model, tmp_path):
    """Issue 3's gate: 50 known facts rewritten at once at the layers the build's tracing report selects (0-2, the
    subject's last token) reach efficacy >= 0.9 with specificity within 5 points of the unedited model. The gate
    build splits names into shared pieces and gives each subject three profile facts (tests/conftest.py); on it the
    testbed YAML's v* weight decay 0.5, tuned for the default builds, over-reaches into neighbourhood subjects, so
    this batch uses 3. Measured: efficacy / generalisation / specificity 1.00 / 0.77 / 0.94 at decay 2, 0.96 / 0.74 /
    0.96 at 3, 0.78 / 0.64 / 0.98 at 6 (unedited 0.00 / 0.13 / 1.00)."""
    model, tok, hp, records, requests, report = setup(reduced_fact_model, "qwen3_moe", tmp_path, 50, v_weight_decay=3.0)
    assert len(records) == 50 and hp.layers == report["edit_layers"]
    before = counterfact_metrics(model, tok, records)
    apply_mote_to_model(model, tok, requests, hp)
    after = counterfact_metrics(model, tok, records)
    print({k: (round(before[k], 3), round(after[k], 3)) for k in ("efficacy", "generalization", "specificity", "utility")})
    assert before["efficacy"] == 0.0 and after["efficacy"] >= 0.9
    assert after["specificity"] >= before["specificity"] - 0.05
    assert after["generalization"] > before["generalization"]


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_5_moe"])
def test_other_architectures_edit(reduced_fact_model, tmp_path, arch, vstar_dir):
    """The GPT-OSS (router bias, interleaved clamped experts, [E, h, d] down_proj with bias) and Qwen3.5-MoE (shared
    expert, left untouched) fact models take a batch of edits, at the lookup token and layers their build's tracing
    report selects (these reduced 24-fact builds may not store facts at the subject as the default builds do; the
    testbed YAMLs are for the default builds)."""
    _, report = reduced_fact_model(arch)
    assert report["lookup_token"], report["editability"]
    model, tok, hp, records, requests, _ = setup(reduced_fact_model, arch, tmp_path, 20, fact_token=report["lookup_token"],
                                                 layers=report["edit_layers"], vstar_cache_dir=vstar_dir(arch))
    assert len(records) >= 15
    adapter = get_adapter(model)
    shared = [p.clone() for l in hp.layers if (s := adapter.shared_expert(adapter.moe_block(model, l))) is not None
              for p in s.parameters()]
    before = counterfact_metrics(model, tok, records)
    apply_mote_to_model(model, tok, requests, hp)
    after = counterfact_metrics(model, tok, records)
    timings = mote_main.last_timings(model)
    print(arch, {k: (round(before[k], 3), round(after[k], 3)) for k in ("efficacy", "generalization", "specificity")},
          {k: round(v, 2) for k, v in timings.items()})
    assert before["efficacy"] == 0.0 and after["efficacy"] >= 0.9
    assert set(timings) == {"statistics", "vstar", "capture", "solve", "writeback", "edits"} and timings["edits"] == len(requests)
    now = [p for l in hp.layers if (s := adapter.shared_expert(adapter.moe_block(model, l))) is not None for p in s.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(shared, now)) and (arch != "qwen3_5_moe" or shared)
