"""MoTE inside the real EasyEdit host: registration, BaseEditor.edit / sequential edit / batch_edit on CPU with the
host's v* and evaluators. Runs when a current `easyeditor` imports (e.g. PYTHONPATH=/path/to/EasyEdit), skipped
otherwise (CI has no host; see docs/easyedit.md)."""

import importlib
from pathlib import Path

import pytest
import torch

from mote_plugin.metrics import counterfact_metrics
from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote.mote_main import apply_mote_to_model
from mote_plugin.testbed import load

HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "MoTE"

pytestmark = pytest.mark.slow


def test_registered(easyedit_host):
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    batch = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    assert alg_dict["MoTE"] is apply_mote_to_model
    assert {"ROME", "MEMIT", "AlphaEdit"} <= set(alg_dict)
    assert batch.is_batchable_method("MoTE") and batch.is_batchable_method("MEMIT") and not batch.is_batchable_method("ROME")
    hparams_base = importlib.import_module("easyeditor.util.hparams").HyperParams
    assert issubclass(MoTEHyperParams, hparams_base)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host writes logs/ into the working directory


def _editor(easyedit_host, out, model_and_tok=None, **overrides):
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / "testbed-qwen3_moe"))
    hp.model_name = str(out / "model")
    for k, v in overrides.items():
        setattr(hp, k, v)
    if model_and_tok is not None:
        hp.model_name = model_and_tok
    editor = easyedit_host.BaseEditor.from_hparams(hp)
    editor.model_name = hp.model_name = str(out / "model")  # the host's evaluators call model_name.lower()
    return editor, hp


def _inputs(records):
    return dict(
        prompts=[r["prompt"] for r in records],
        target_new=[r["target_new"] for r in records],
        ground_truth=[r["target_true"] for r in records],
        subject=[r["subject"] for r in records],
        rephrase_prompts=[r["paraphrase_prompts"][0] for r in records],
        locality_inputs={"neighborhood": {"prompt": [r["neighbours"][0]["prompt"] for r in records],
                                          "ground_truth": [r["neighbours"][0]["answer"] for r in records]}},
    )


def test_base_editor_edit_sequential_and_batch(easyedit_host, reduced_fact_model, tmp_path):
    out, _ = reduced_fact_model("qwen3_moe")
    model, tok, facts, _ = load(out)
    records = [f for f in facts if f["known"] and f["neighbours"]][:4]
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    # the host's edit() requires batch_size 1 (batch_edit() chunks requests by it)
    editor, hp = _editor(easyedit_host, out, (model, tok), stats_dir=str(tmp_path / "stats"), batch_size=1)
    # edit(): one request at a time, weights restored by the host after each
    metrics, edited, _ = editor.edit(**_inputs(records), sequential_edit=False, verbose=False)
    assert len(metrics) == 4
    assert sum(m["post"]["rewrite_acc"][0] for m in metrics) > sum(m["pre"]["rewrite_acc"][0] for m in metrics)
    assert all(torch.equal(p, original[n]) for n, p in edited.named_parameters()), "host restored every weight"

    # sequential edit(): the edits stay
    metrics, edited, _ = editor.edit(**_inputs(records), sequential_edit=True, verbose=False)
    after = counterfact_metrics(edited, tok, records)
    assert after["efficacy"] >= 0.75, after
    changed = [n for n, p in edited.named_parameters() if not torch.equal(p, original[n])]
    assert changed and all("experts.down_proj" in n for n in changed)
    with torch.no_grad():
        for n, p in edited.named_parameters():
            p.copy_(original[n])

    # batch_edit(): chunks of hparams.batch_size, host padding trap handled inside the apply function
    tok.padding_side = "left"
    hp.batch_size = 4
    metrics, edited, _ = editor.batch_edit(**_inputs(records), sequential_edit=False, verbose=False)
    assert len(metrics) == 4 and tok.padding_side == "left"
    assert sum(m["post"]["rewrite_acc"][0] for m in metrics) >= 3


def test_yaml_selected_model_by_name(easyedit_host, reduced_fact_model, tmp_path):
    """The plain EasyEdit path: the YAML's model_name is a directory the host loads itself (its name contains qwen3)."""
    out, _ = reduced_fact_model("qwen3_moe")
    _, _, facts, _ = load(out)
    records = [f for f in facts if f["known"] and f["neighbours"]][:2]
    editor, _ = _editor(easyedit_host, out, stats_dir=str(tmp_path / "stats"), batch_size=2)
    metrics, _, _ = editor.batch_edit(**_inputs(records), sequential_edit=True, verbose=False)
    assert [m["post"]["rewrite_acc"][0] for m in metrics] == [1.0, 1.0]


@pytest.mark.parametrize("mode", ["edit", "sequential", "batch"])
def test_easyedit_style_script(easyedit_host, reduced_fact_model, tmp_path, monkeypatch, capsys, mode):
    """examples/easyedit_edit.py: an EasyEdit-style script selecting MoTE only through its YAML."""
    import runpy
    import sys

    import yaml

    out, _ = reduced_fact_model("qwen3_moe")
    cfg = yaml.safe_load((HPARAMS / "testbed-qwen3_moe.yaml").read_text())
    cfg.update(model_name=str(out / "model"), stats_dir=str(tmp_path / "stats"), batch_size=3)
    (tmp_path / "mote.yaml").write_text(yaml.safe_dump(cfg))
    script = Path(__file__).resolve().parent.parent / "examples" / "easyedit_edit.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--hparams", str(tmp_path / "mote.yaml"), "--mode", mode, "--n", "3"])
    runpy.run_path(str(script), run_name="__main__")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"3 edits, mode {mode}: rewrite_acc")
    post = float(line.split("rewrite_acc ")[1].split(" -> ")[1].split(",")[0])
    assert post >= 0.6, line
