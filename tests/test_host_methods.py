"""EasyEdit's editors on the fact models through `HostEdit` (mote_plugin/experiments/host_edit.py) and as rows of the
quality protocol (benchmarks/host_rows.py): each edits one small batch and changes only what its YAML names, LoRA's
adapters are gone afterwards, UnKE's failure under transformers 5 is what the side-by-side report says, and the protocol
runs host rows end to end on a tiny grid. Runs when a current `easyeditor` imports (PYTHONPATH=/path/to/EasyEdit),
skipped otherwise, as tests/test_easyedit_host.py."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mote_plugin.metrics import counterfact_metrics
from mote_plugin.testbed import load

ROOT = Path(__file__).resolve().parent.parent
HPARAMS = ROOT / "hparams"

pytestmark = pytest.mark.slow

# (fact model, YAML): every host YAML of the testbed on a fact model it is written for
EDITS = [("qwen3_moe", f"{alg}/testbed-qwen3_moe.yaml") for alg in ("ROME", "MEMIT", "AlphaEdit")] + [
    ("gpt_oss", f"{alg}/testbed-gpt_oss.yaml") for alg in ("ROME", "MEMIT", "AlphaEdit")] + [
    ("qwen3_moe", f"FT/testbed-{v}-{m}.yaml") for v in ("L", "M") for m in ("experts", "o_proj")] + [
    ("gpt_oss", "FT/testbed-M-experts.yaml"), ("qwen3_moe", "LoRA/testbed.yaml"),
    ("qwen3_moe", "LoRA/testbed-adalora.yaml")] + [
    # the dense expert-shaped module of an MoE block: its inputs come flattened over the batch's tokens
    ("qwen3_5_moe", f"{alg}/testbed-qwen3_5_moe-shared_expert.yaml") for alg in ("MEMIT", "AlphaEdit")]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything the host writes into its working directory


def _run(easyedit_host, model, out, yaml_path, tmp_path, **settings):
    from mote_plugin.experiments.host_edit import HostEdit, host_hparams

    alg = yaml.safe_load(yaml_path.read_text())["alg_name"]
    hp = host_hparams(easyedit_host, alg, str(yaml_path))
    hp.model_name = str(out / "model")
    for k, v in settings.items():
        setattr(hp, k, v)
    return hp, HostEdit(hp, model, model.tok, stats_dir=tmp_path / "stats", workdir=tmp_path / "work",
                        covariance_texts=200)


def _requests(facts, n):
    known = [f for f in facts if f["known"]][:n]
    return known, [{"prompt": f["prompt"], "subject": f["subject"], "target_new": f["target_new"],
                    "case_id": f["case_id"]} for f in known]


@pytest.mark.parametrize("arch, name", EDITS, ids=[f"{a}-{n}" for a, n in EDITS])
def test_host_method_changes_only_what_its_yaml_names(easyedit_host, reduced_fact_model, tmp_path, arch, name):
    """One batch of 3 requests: the parameters that change are those the YAML names (ROME / MEMIT / AlphaEdit its
    2-D `rewrite_module_tmp` weight at its layers, FT every parameter whose name holds `rewrite_module_tmp` at its
    layers); LoRA changes no parameter of the model, adds adapters only on its target modules at its layers, and
    `undo` removes them: the model has its original modules, parameters and values again."""
    from mote_plugin.experiments.host_edit import written_parameters

    out, _ = reduced_fact_model(arch)
    model, tok, facts, _ = load(out)
    model.tok = tok
    original = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hp, run = _run(easyedit_host, model, out, HPARAMS / name, tmp_path)
    _, requests = _requests(facts, 3)
    assert run.edit(requests) > 0
    state = model.state_dict()
    changed = {k for k, v in state.items() if k in original and not torch.equal(v, original[k])}
    written = set(written_parameters(model, hp))
    if hp.alg_name == "LoRA":
        assert not changed and not written
        adapted = {n.rsplit(".lora_", 1)[0] for n in state if ".lora_" in n}
        expected = {f"model.layers.{l}.self_attn.{t}" for l in hp.layers for t in hp.target_modules}
        assert {n.removeprefix("base_model.model.") for n in adapted} == expected
    else:
        assert changed and changed <= written, (changed, written)
        assert {k.split(".")[2] for k in changed} <= {str(l) for l in hp.layers}
    run.undo()
    assert {n: type(m) for n, m in model.named_modules()} == modules  # no adapter or wrapper left
    assert not hasattr(model, "peft_config")
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_lora_rows_follow_each_other_on_the_unedited_model(easyedit_host, reduced_fact_model, tmp_path):
    """Two LoRA runs in a row (the protocol's grid): the second starts from the unedited model, not from the first's
    adapter (EasyEdit reuses a model that still has `peft_config`), and both edit."""
    out, _ = reduced_fact_model("qwen3_moe")
    model, tok, facts, _ = load(out)
    model.tok = tok
    records, requests = _requests(facts, 3)
    before = counterfact_metrics(model, tok, records)
    for _ in range(2):
        _, run = _run(easyedit_host, model, out, HPARAMS / "LoRA/testbed.yaml", tmp_path)
        run.edit(requests)
        assert sum(".lora_A." in n for n in model.state_dict()) == 4 * 3  # 4 modules x 3 layers, one adapter
        assert counterfact_metrics(model, tok, records)["efficacy"] > before["efficacy"]
        run.undo()
        assert counterfact_metrics(model, tok, records) == before


def test_alphaedit_runs_on_any_linear_and_its_threshold_sets_the_null_space(easyedit_host, reduced_fact_model,
                                                                           tmp_path):
    """The host picks AlphaEdit's projector shape by model name (llama / qwen / gpt-j): on gpt_oss it would raise.
    HostEdit builds it with the host's get_project for the key size at hand; a larger absolute threshold keeps a
    larger null space."""
    out, _ = reduced_fact_model("gpt_oss")
    model, tok, facts, _ = load(out)
    model.tok = tok
    dims = []
    for threshold in (1e-3, 1e-1):
        _, run = _run(easyedit_host, model, out, HPARAMS / "AlphaEdit/testbed-gpt_oss.yaml", tmp_path,
                      nullspace_threshold=threshold)
        dims.append(run.null_space_dims())
        run.edit(_requests(facts, 2)[1])
        run.undo()
    assert all(0 <= a < b <= 128 for a, b in zip(*dims)), dims


def test_unke_under_transformers_5(easyedit_host, reduced_fact_model, tmp_path):
    """UnKE as the side-by-side report states it: under the fact model's name its layer-training loop has no branch
    (names containing Llama3-8B-Instruct or Qwen2.5-7B-Instruct only) and raises UnboundLocalError; under the Qwen2.5
    name it runs, but `layer(...)[0]` is the first sequence of the batch under transformers 5 (decoder layers return
    a tensor, not a tuple), and torch warns that the MSE target's size differs from its input's."""
    out, _ = reduced_fact_model("qwen3_moe")
    model, tok, facts, _ = load(out)
    model.tok = tok
    requests = _requests(facts, 2)[1]
    _, run = _run(easyedit_host, model, out, HPARAMS / "UnKE/testbed.yaml", tmp_path)
    with pytest.raises(UnboundLocalError, match="loss"):
        run.edit(requests)
    run.undo()
    _, run = _run(easyedit_host, model, out, HPARAMS / "UnKE/testbed.yaml", tmp_path,
                  model_name="Qwen2.5-7B-Instruct", optim_num_step=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.edit(requests)
    run.undo()
    assert any("different to the input size" in str(w.message) for w in caught)
    assert isinstance(model.model.layers[0], nn.Module)


def test_side_by_side_protocol_end_to_end(easyedit_host, reduced_fact_model, tmp_path, monkeypatch):
    """benchmarks/quality.py with host rows on a small build (dev 2, test 4 in batches of 2): each host row's grid
    runs on dev, the best dev utility is chosen, the test split reports it with intervals; a method that cannot run
    (UnKE) is reported with its error; side_by_side.md holds every row, the settings and the grid of a weak row."""
    import test_benchmarks

    quality = test_benchmarks.load("quality")
    out, report = reduced_fact_model("qwen3_moe")
    monkeypatch.setattr(quality, "fact_model", lambda arch, cfg: load(out))
    monkeypatch.setattr(quality, "CACHE", tmp_path)
    cfg = yaml.safe_load((ROOT / "benchmarks/configs/side_by_side.yaml").read_text())
    cfg.update(builds={"qwen3_moe": {"facts": 56}}, dev=2, test=4, batch_size=2, bootstrap=50, covariance_texts=100,
               methods={"MoTE": {"spread": "core", "rank_scale": 1}}, tune={"mote_lambda": [1.0]},
               real_ranks={"qwen3_moe": cfg["real_ranks"]["qwen3_moe"]})
    cfg["host_methods"] = {
        "MEMIT": cfg["host_methods"]["MEMIT"] | {"tune": {"mom2_update_weight": [10, 15000]}},
        "LoRA": cfg["host_methods"]["LoRA"] | {"tune": {"layers": [0]}},
        "UnKE": cfg["host_methods"]["UnKE"]}
    path = tmp_path / "side_by_side.yaml"
    path.write_text(yaml.safe_dump(cfg))
    quality.main(["--config", str(path), "--out", str(tmp_path / "side_by_side"), "--only", "tune", "test"])
    res = json.loads((tmp_path / "side_by_side.json").read_text())["archs"]["qwen3_moe"]
    memit = res["tune"]["MEMIT"]
    assert [p["settings"] for p in memit["grid"]] == [{"mom2_update_weight": 10}, {"mom2_update_weight": 15000}]
    assert memit["chosen"] == max(memit["grid"], key=lambda p: p["utility"])["settings"] and memit["objective"]
    assert res["tune"]["LoRA"]["chosen"] == {"layers": report["edit_layers"]}  # the traced band, shift 0
    assert "UnboundLocalError" in res["tune"]["UnKE"]["error"] and "error" in res["test"]["UnKE"]
    for name in ("MoTE", "MEMIT", "LoRA"):
        row = res["test"][name]
        assert row["n"] == 4 and row["ci95"]["utility"][0] <= row["utility"] <= row["ci95"]["utility"][1]
    assert res["test"]["MEMIT"]["seconds"]["edit"] > 0
    md = (tmp_path / "side_by_side.md").read_text()
    assert "## Side by side (test split)" in md and "| MEMIT | **" in md and "did not run: UnboundLocalError" in md
    assert "### Settings chosen on dev" in md and "mom2_update_weight" in md
