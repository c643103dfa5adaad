"""examples/compare_editors.py and mote_plugin.experiments.compare without a host: MoTE on the fact model, baselines
reported as unavailable, MoTE not applicable on a dense model, bad configurations refused. (With EasyEdit on
PYTHONPATH the host methods run too: tests/test_easyedit_host.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mote_plugin.experiments.compare import CompareConfig, compare, edited, markdown, method_spec, run_method
from mote_plugin.experiments.host_methods import dense_module_problem, override
from mote_plugin.mote.hparams import MoTEHyperParams

ROOT = Path(__file__).resolve().parent.parent
MOTE_YAML = str(ROOT / "hparams/MoTE/testbed-qwen3_moe-fullrank.yaml")  # edits every fact of these small batches
pytestmark = pytest.mark.slow


def write_config(tmp_path, out_dir, **kw) -> Path:
    cfg = {"model": str(out_dir), "n": 6, "batch_size": 3, "out": str(tmp_path / "out"),
           "methods": {"MoTE": MOTE_YAML,
                       "MEMIT": str(ROOT / "hparams/MEMIT/testbed-qwen3_moe.yaml")}} | kw
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_compare_script_on_the_fact_model(reduced_fact_model, tmp_path):
    out_dir, _ = reduced_fact_model("qwen3_moe")
    methods = {"MoTE": {"hparams": MOTE_YAML, "nullspace_threshold": 0.5},
               "MEMIT": str(ROOT / "hparams/MEMIT/testbed-qwen3_moe.yaml")}
    config = write_config(tmp_path, out_dir, methods=methods)
    run = subprocess.run([sys.executable, str(ROOT / "examples/compare_editors.py"), "--config", str(config)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "out/results.json").read_text())
    by_method = {r["method"]: r for r in report["results"]}
    assert by_method["unedited"]["metrics"]["efficacy"] == 0.0
    print({k: round(by_method["MoTE"]["metrics"][k], 3) for k in ("efficacy", "generalization", "specificity")})
    # 5 of the 6 facts flip (measured 6 of 6 on training seeds 0, 1 and 2: conftest.py)
    assert by_method["MoTE"]["status"] == "ok" and by_method["MoTE"]["metrics"]["efficacy"] >= 0.8
    assert by_method["MoTE"]["edit_seconds"] > 0
    hp = MoTEHyperParams.from_hparams(MOTE_YAML)  # per edit call (2 of 3 requests), the coverage of each solve
    solves = [max(hp.layers)] if hp.spread == "core" else sorted(hp.layers)
    assert [[c["layer"] for c in call] for call in by_method["MoTE"]["coverage"]] == [solves, solves]
    assert all(0 <= c["residual_in_U_out"]["min"] <= c["residual_in_U_out"]["mean"] <= 1 + 1e-6  # full rank: 1
               for call in by_method["MoTE"]["coverage"] for c in call)
    if by_method["MEMIT"]["status"] == "unavailable":  # no host in this environment
        assert "EasyEdit" in by_method["MEMIT"]["reason"]
    table = (tmp_path / "out/results.md").read_text()
    assert "| MoTE | ok |" in table and "| MEMIT |" in table and "| MoTE | ok |" in run.stdout
    assert f"| MoTE | ok | {edited(by_method['MoTE'], 6)}/6 |" in table  # the requests MoTE edited, of those asked
    assert report["command"].startswith("python examples/compare_editors.py --config") and report["date"]
    assert (tmp_path / "out/results.png").stat().st_size > 1000
    # what produced the numbers: versions, the hyper-parameters MoTE ran with, a score per record
    import transformers

    import mote_plugin

    versions = report["versions"]
    assert versions["transformers"] == transformers.__version__ and versions["mote_plugin"] == mote_plugin.__version__
    mote = by_method["MoTE"]
    assert mote["effective_hparams"]["batch_size"] == 3 and mote["effective_hparams"]["layers"] == [0, 1, 2]
    assert mote["overrides"] == {"nullspace_threshold": 0.5} and mote["effective_hparams"]["nullspace_threshold"] == 0.5
    rows = mote["per_record"]
    assert len(rows) == 6 and {"case_id", "subject", "efficacy", "generalization", "specificity"} <= set(rows[0])
    assert sum(r["efficacy"] for r in rows) / 6 == pytest.approx(mote["metrics"]["efficacy"])
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in by_method["unedited"]["per_record"]]


def test_markdown_counts_the_requests_each_row_edited():
    """A MoTE row's edited count comes from its coverage (the requests whose v* reached the target), a host method's
    is every request, the unedited row has none; benchmarks/results/demo.json (README command 1) has each kind."""
    report = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert [edited(rows[m], 50) for m in ("unedited", "MoTE", "MoTE, paper's basis", "ROME")] == [None, 39, 14, None]
    assert edited(rows["MoTE"] | {"effective_hparams": {"alg_name": "ROME"}, "coverage": []}, 50) == 50
    table = markdown(report)
    assert "| MoTE | ok | 39/50 | 0.680 |" in table and "| unedited | ok | -/50 | 0.000 |" in table


def test_weights_restored_between_methods(reduced_fact_model, tmp_path):
    from mote_plugin.testbed import load

    out_dir, _ = reduced_fact_model("qwen3_moe")
    model, tok, facts, _ = load(out_dir)
    cfg = CompareConfig.from_yaml(write_config(tmp_path, out_dir, n=2, batch_size=1))
    records = [f for f in facts if f["known"]][:2]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = run_method("MoTE", MOTE_YAML, model, tok, records, cfg, None, {})
    print("efficacy", result.metrics["efficacy"])
    assert result.status == "ok" and result.metrics["efficacy"] > 0  # the edit took effect before the restore
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())


def test_mote_not_applicable_on_a_dense_model(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=8))
    cfg = CompareConfig(model="dense", methods={}, out=str(tmp_path))
    result = run_method("MoTE", str(ROOT / "hparams/MoTE/testbed-qwen3_moe.yaml"), model, None, [], cfg, None, {})
    assert result.status == "not applicable" and "MoE" in result.reason


def test_method_entries_override_their_yaml(reduced_fact_model, tmp_path):
    """A `methods:` entry {hparams: YAML, KEY: VALUE} edits with the YAML's settings changed for this comparison: here a
    layer the model does not have, refused before any weight is touched; host hyper-parameters refuse keys they lack."""
    from mote_plugin.testbed import load

    mote_yaml = str(ROOT / "hparams/MoTE/testbed-qwen3_moe.yaml")
    assert method_spec("MoTE", mote_yaml) == (mote_yaml, {})
    assert method_spec("MoTE", {"hparams": mote_yaml, "v_weight_decay": 3}) == (mote_yaml, {"v_weight_decay": 3})
    out_dir, _ = reduced_fact_model("qwen3_moe")
    model, tok, facts, _ = load(out_dir)
    cfg = CompareConfig.from_yaml(write_config(tmp_path, out_dir, n=1,
                                               methods={"MoTE": {"hparams": mote_yaml, "layers": [9]}}))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        run_method("MoTE", cfg.methods["MoTE"], model, tok, [f for f in facts if f["known"]][:1], cfg, None, {})
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())

    class HostHyperParams:
        layers = [2]

    assert override(HostHyperParams(), "ROME", {"layers": [1]}).layers == [1]
    with pytest.raises(ValueError, match="ROME: unknown HostHyperParams key\\(s\\) v_decay"):
        override(HostHyperParams(), "ROME", {"v_decay": 3})


@pytest.mark.parametrize("config", sorted((ROOT / "examples/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(config, monkeypatch):
    """The shipped comparison configs (README command 1 is compare-testbed-qwen3_moe.yaml) load: their build options
    are the builder's, their MoTE overrides apply to their YAML, and every YAML exists."""
    monkeypatch.chdir(ROOT)  # their paths are relative to the repository root, where the README runs them
    cfg = CompareConfig.from_yaml(config)
    assert all(Path(method_spec(name, entry)[0]).is_file() for name, entry in cfg.methods.items())


@pytest.mark.parametrize("change, match", [
    ({"colour": "red"}, "unknown keys \\['colour'\\]"),
    ({"dataset": "wikipedia"}, "counterfact or zsre"),
    ({"methods": {}}, "no methods"),
    ({"build": {"arch": "qwen3_moe", "fact": 56}}, "build: .*unexpected keyword argument 'fact'"),
    ({"build": {"arch": "qwen3_moe", "train": {"epoch": 60}}}, "build: .*unexpected keyword argument 'epoch'"),
    ({"methods": {"MoTE": {"v_weight_decay": 3}}}, "MoTE: expected a hyper-parameter YAML path"),
    ({"methods": {"MoTE": {"hparams": str(ROOT / "hparams/MoTE/testbed-qwen3_moe.yaml"), "v_decay": 3}}},
     "methods: MoTE: unknown MoTE hyper-parameter\\(s\\): v_decay"),
    ({"methods": {"MoTE": {"hparams": str(ROOT / "hparams/MoTE/testbed-qwen3_moe.yaml"), "batch_size": 1}}},
     "methods: MoTE: batch_size is the comparison's own \\(the config's batch_size: 3\\)"),
])
def test_bad_config(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        CompareConfig.from_yaml(write_config(tmp_path, tmp_path, **change))


def test_records_without_subject_are_refused(reduced_fact_model, tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": 1, "prompt": "Paris is in", "target_new": "Italy",
                                 "ground_truth": "France"}]))
    out_dir, _ = reduced_fact_model("qwen3_moe")
    cfg = CompareConfig.from_yaml(write_config(tmp_path, out_dir, data=str(data), n=1))
    with pytest.raises(ValueError, match="no `subject`"):
        compare(cfg, log=lambda m: None)


def test_zsre_metrics_through_compare(reduced_fact_model, shared_data, tmp_path, caplog):
    """Records of MEND's zsRE file (MEND/MEMIT format) through the comparison, on a fact model that was never taught
    them (a build with zsRE facts edits its own: `dataset: zsre`, `data: null`, test_zsre.py): MEMIT's token
    accuracies, specificity against the gold answers of MEND's NQ questions, which this model never learnt either.
    zsRE's answers are multi-piece names it never saw (like "Aligarh Muslim University"), so v* cannot reach them at
    the lookup token: the user is warned per request, such a request is left out of the edit, and the metrics say so."""
    out_dir, _ = reduced_fact_model("qwen3_moe")
    cfg = CompareConfig.from_yaml(write_config(tmp_path, out_dir, dataset="zsre",
                                               data=str(shared_data / "zsre/zsre-eval.json"),
                                               n=4, batch_size=4,
                                               methods={"MoTE": str(ROOT / "hparams/MoTE/testbed-qwen3_moe.yaml")}))
    report = compare(cfg, log=lambda m: None)
    unedited, mote = (r["metrics"] for r in report["results"])
    assert unedited["efficacy"] < 0.5 and unedited["specificity"] < 0.5
    assert mote["efficacy"] >= unedited["efficacy"] and 0.0 <= mote["specificity"] <= 1.0
    assert "did not reach" in caplog.text and "left out of this edit" in caplog.text  # a failed v* changes no weight
    assert set(mote) >= {"efficacy", "generalization", "specificity", "utility", "efficacy_exact"}


def test_dense_method_on_packed_experts_is_not_applicable(reduced_fact_model):
    """What makes a dense baseline (ROME/MEMIT/AlphaEdit) not applicable: its rewrite module must be a 2-D weight."""
    from types import SimpleNamespace

    from mote_plugin.testbed import load

    model = load(reduced_fact_model("qwen3_moe")[0])[0]
    attn = SimpleNamespace(layers=[0, 1], rewrite_module_tmp="model.layers.{}.self_attn.o_proj")
    experts = SimpleNamespace(layers=[1], rewrite_module_tmp="model.layers.{}.mlp.experts")
    missing = SimpleNamespace(layers=[1], rewrite_module_tmp="model.layers.{}.mlp.down_proj")
    assert dense_module_problem(model, attn) is None
    assert "packed experts (model.layers.1.mlp.experts.gate_up_proj" in dense_module_problem(model, experts)
    assert "does not exist" in dense_module_problem(model, missing)


def test_per_record_scores_regroup_the_items():
    """`metrics.per_record`: a record's generalization / specificity are the means over its own paraphrases and
    neighbours (records may have several, or none)."""
    from mote_plugin.metrics import per_record

    records = [{"paraphrase_prompts": ["a", "b"], "neighbours": [{"prompt": "n", "answer": "x"}]},
               {"paraphrase_prompts": ["c"], "neighbours": []}]
    metrics = {"efficacy_items": [True, False], "generalization_items": [True, False, True],
               "specificity_items": [False]}
    assert per_record(metrics, records) == [{"efficacy": 1.0, "generalization": 0.5, "specificity": 0.0},
                                            {"efficacy": 0.0, "generalization": 1.0, "specificity": None}]
    with pytest.raises(ValueError, match="generalization: 2 items for 3 prompts"):
        per_record(metrics | {"generalization_items": [True, True]}, records)


def test_a_row_runs_the_algorithm_of_its_yaml(tmp_path):
    """A `methods:` row's name is a label: its YAML's alg_name picks the editor, so one comparison can hold several MoTE
    rows; a missing YAML is refused with the row's name before any model is built."""
    from mote_plugin.experiments.compare import method_alg

    assert method_alg("MoTE full rank", MOTE_YAML) == "MoTE"
    assert method_alg("a label", str(ROOT / "hparams/MEMIT/testbed-qwen3_moe")) == "MEMIT"
    with pytest.raises(ValueError, match="methods: Global: no hyper-parameter file"):
        CompareConfig.from_yaml(write_config(tmp_path, tmp_path, methods={"Global": str(tmp_path / "none.yaml")}))
