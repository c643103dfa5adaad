"""MoTE inside the real EasyEdit host: registration, BaseEditor.edit / sequential edit / batch_edit on CPU with the
host's v* and evaluators, every MoE family loaded by model_name, and EasyEdit's own example script with the documented
two-line change. Runs when a current `easyeditor` imports (e.g. PYTHONPATH=/path/to/EasyEdit), skipped otherwise (CI
has no host; see docs/easyedit.md)."""

import difflib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mote_plugin.easyedit import apply_mote
from mote_plugin.metrics import counterfact_metrics
from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.testbed import load

HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "MoTE"

pytestmark = pytest.mark.slow


def test_registered(easyedit_host):
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    batch = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    assert alg_dict["MoTE"] is apply_mote
    assert {"ROME", "MEMIT", "AlphaEdit"} <= set(alg_dict)
    assert batch.is_batchable_method("MoTE") and batch.is_batchable_method("MEMIT")
    assert not batch.is_batchable_method("ROME")
    hparams_base = importlib.import_module("easyeditor.util.hparams").HyperParams
    assert issubclass(MoTEHyperParams, hparams_base)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host writes logs/ into the working directory


def _editor(easyedit_host, out, model_and_tok=None, **overrides):
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / "testbed-qwen3_moe-fullrank"))
    hp.model_name = str(out / "model")
    for k, v in overrides.items():
        setattr(hp, k, v)
    if model_and_tok is not None:
        hp.model_name = model_and_tok
    editor = easyedit_host.BaseEditor.from_hparams(hp)
    # a (model, tok) pair leaves the model's own name behind (the host's evaluators call model_name.lower())
    assert editor.model_name == hp.model_name == str(out / "model")
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

    # the YAML as shipped: batch_size 1, which the host's edit() requires (batch_edit() chunks requests by it)
    editor, hp = _editor(easyedit_host, out, (model, tok), stats_dir=str(tmp_path / "stats"))
    assert hp.batch_size == 1
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

    out, _ = reduced_fact_model("qwen3_moe")
    cfg = yaml.safe_load((HPARAMS / "testbed-qwen3_moe-fullrank.yaml").read_text())
    cfg.update(model_name=str(out / "model"), stats_dir=str(tmp_path / "stats"))  # batch_size as shipped: 1
    (tmp_path / "mote.yaml").write_text(yaml.safe_dump(cfg))
    script = Path(__file__).resolve().parent.parent / "examples" / "easyedit_edit.py"
    monkeypatch.setattr(sys, "argv",
                        [str(script), "--hparams", str(tmp_path / "mote.yaml"), "--mode", mode, "--n", "3"])
    runpy.run_path(str(script), run_name="__main__")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"3 edits, mode {mode}: rewrite_acc")
    post = float(line.split("rewrite_acc ")[1].split(" -> ")[1].split(",")[0])
    assert post >= 0.6, line


# ---------------------------------------------------------------------------------------------------------
# every MoE family by model_name
# ---------------------------------------------------------------------------------------------------------

FAMILIES = {  # directory name (what BaseEditor's substring loader sees) -> (tiny model of test_adapters.py, class)
    "Qwen3-MoE-tiny": ("qwen3_moe", "Qwen3MoeForCausalLM"), "Qwen2-MoE-tiny": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3.5-MoE-tiny": ("qwen3_5_moe", "Qwen3_5MoeForCausalLM"), "Mixtral-tiny": ("mixtral", "MixtralForCausalLM"),
    "OLMoE-tiny": ("olmoe", "OlmoeForCausalLM"), "gpt-oss-tiny": ("gpt_oss", "GptOssForCausalLM"),
    "DeepSeek-V3-tiny": ("deepseek_v3", "DeepseekV3ForCausalLM"),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    import test_adapters
    from mote_plugin.mote.model.stats import corpus_texts
    from mote_plugin.testbed.tokenizer import train_tokenizer

    tok = train_tokenizer(list(corpus_texts(None))[:200] + ["The mother tongue of Danielle Darrieux is English"], 64)
    root = tmp_path_factory.mktemp("families")
    for name, (make, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = getattr(test_adapters, make)()
        model.resize_token_embeddings(len(tok))  # the byte-level tokenizer's 260 ids
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_every_family_loads_by_model_name(easyedit_host, family_dirs, tmp_path):
    """A YAML naming any supported MoE family loads through BaseEditor.from_hparams (the host's substring loader raises
    NotImplementedError for OLMoE / DeepSeek names and would read GPT-OSS with GPT2Tokenizer; the plugin loads
    those), and MoTE edits an OLMoE model loaded that way."""
    from mote_plugin.adapters import get_adapter

    for name, (_, cls) in FAMILIES.items():
        # random tiny models: 5 v* steps do not reach the target, and the edit is to be written all the same
        hp = MoTEHyperParams(alg_name="MoTE", model_name=str(family_dirs / name), layers=[1], device="cpu",
                             v_num_grad_steps=5, preservation_tokens=1000, max_length=32, nullspace_min_tokens=1,
                             stats_dir=str(tmp_path / "stats"), v_keep_failed=True)
        editor = easyedit_host.BaseEditor.from_hparams(hp)
        assert type(editor.model).__name__ == cls and editor.tok is not None, name
        assert editor.model_name == hp.model_name == str(family_dirs / name)
        hp.check_against_model(editor.model)  # the default module names fit every family
        get_adapter(editor.model)
    with pytest.raises(NotImplementedError):  # another algorithm keeps the host's loader
        easyedit_host.BaseEditor.from_hparams(type("HP", (),
                                                   {"alg_name": "ROME", "model_name": str(family_dirs / "OLMoE-tiny"),
                                                              "model_parallel": False, "fp16": False})())

    hp.model_name = str(family_dirs / "OLMoE-tiny")
    editor = easyedit_host.BaseEditor.from_hparams(hp)
    before = editor.model.model.layers[1].mlp.experts.down_proj.detach().clone()
    metrics, edited, _ = editor.edit(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
                                     subject=["Danielle Darrieux"], sequential_edit=True, verbose=False)
    assert len(metrics) == 1 and "rewrite_acc" in metrics[0]["post"]
    assert not torch.equal(edited.model.layers[1].mlp.experts.down_proj, before)


# ---------------------------------------------------------------------------------------------------------
# EasyEdit's own example script, with the two lines of docs/easyedit.md
# ---------------------------------------------------------------------------------------------------------

HPARAMS_IMPORT = "from mote_plugin.easyedit import hparams_class\n"
HPARAMS_LINE = "editing_hparams = hparams_class(args.editing_method)"


def two_line_change(text: str) -> str:
    """docs/easyedit.md: import hparams_class above `if __name__ == "__main__":`, and let the if/elif chain's
    `raise NotImplementedError` give the class instead."""
    assert text.count('if __name__ == "__main__":') == 1 and text.count("raise NotImplementedError\n") == 1
    text = text.replace('if __name__ == "__main__":', HPARAMS_IMPORT + '\n\nif __name__ == "__main__":')
    return text.replace("raise NotImplementedError\n", HPARAMS_LINE + "\n")


def test_easyedit_example_script_runs_mote(easyedit_host, reduced_fact_model, tmp_path):
    """examples/run_AlphaEdit_editing.py of the EasyEdit checkout on PYTHONPATH, copied here with the documented two
    lines changed, edits three CounterFact records of the fact model with `--editing_method MoTE` and the testbed YAML
    (EasyEdit's edit(): one request at a time, weights restored after each; its own metrics)."""
    checkout = Path(importlib.util.find_spec("easyeditor").origin).resolve().parent.parent
    original = checkout / "examples" / "run_AlphaEdit_editing.py"
    if not original.is_file():
        pytest.skip(f"{checkout} has no examples/run_AlphaEdit_editing.py (not a git checkout of EasyEdit)")
    text = original.read_text()
    changed = two_line_change(text)
    diff = [l for l in difflib.unified_diff(text.splitlines(), changed.splitlines(), lineterm="", n=0)
            if l[:1] in "+-" and not l.startswith(("+++", "---")) and l.strip("+-").strip()]
    expected = ["+" + HPARAMS_IMPORT.strip(), "-        raise NotImplementedError", "+        " + HPARAMS_LINE]
    assert diff == expected, diff
    script = tmp_path / "examples" / original.name
    script.parent.mkdir()
    script.write_text(changed)

    out, _ = reduced_fact_model("qwen3_moe")
    _, _, facts, _ = load(out)
    records = [f for f in facts if f["known"] and f["neighbours"]][:3]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "counterfact.json").write_text(json.dumps([{  # CounterFact's own (ROME) format
        "case_id": r["case_id"],
        "requested_rewrite": {"prompt": r["prompt"].replace(r["subject"], "{}", 1), "subject": r["subject"],
                              "target_new": {"str": r["target_new"]}, "target_true": {"str": r["target_true"]}},
        "paraphrase_prompts": r["paraphrase_prompts"][:1], "neighborhood_prompts": [r["neighbours"][0]["prompt"]]}
        for r in records]))
    cfg = yaml.safe_load((HPARAMS / "testbed-qwen3_moe-fullrank.yaml").read_text())
    cfg.update(model_name=str(out / "model"), stats_dir=str(tmp_path / "stats"))
    (tmp_path / "MoTE.yaml").write_text(yaml.safe_dump(cfg))

    # the script's fluency metric (test_generation=True) tokenises with NLTK's punkt data (punkt_tab from NLTK 3.8.2 on,
    # the punkt pickle before: EasyEdit's requirements pin 3.6.5), which `nltk.download` fetches; offline, an empty
    # English model (no abbreviations) stands in for it
    punkt = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).touch()
    import pickle

    from nltk.tokenize.punkt import PunktSentenceTokenizer

    (punkt.parent.parent / "punkt" / "PY3").mkdir(parents=True)  # where NLTK 3.6 looks under Python 3
    (punkt.parent.parent / "punkt" / "PY3" / "english.pickle").write_bytes(pickle.dumps(PunktSentenceTokenizer()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]),
               NLTK_DATA=str(tmp_path / "nltk_data"))
    argv = ["--editing_method", "MoTE", "--hparams_dir", str(tmp_path / "MoTE"), "--data_dir", str(tmp_path / "data"),
            "--data_type", "CF", "--ds_size", "3", "--output_dir", str(tmp_path / "out")]
    # python -m mote_plugin.host_stubs: the script as `python SCRIPT ...` runs it, with the vision packages stubbed
    run = subprocess.run([sys.executable, "-m", "mote_plugin.host_stubs", str(script), *argv], cwd=script.parent,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "model_MoTE_N=3_Sequential=False.json").read_text())
    pre = [m["pre"]["rewrite_acc"][0] for m in metrics]
    post = [m["post"]["rewrite_acc"][0] for m in metrics]
    assert len(metrics) == 3 and sum(post) > sum(pre) and sum(post) / 3 >= 0.6, (pre, post)
