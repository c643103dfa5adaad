"""MoTE inside the real EasyEdit host: registration, BaseEditor.edit / sequential edit / batch_edit on CPU with the
host's v* and evaluators, every MoE family loaded by model_name, EasyEdit's own example script changed by one import and
one elif, the edit state across the host's restores, one YAML for edit() and batch_edit(), and bf16 by model_name.
Runs when a current `easyeditor` imports (e.g. PYTHONPATH=/path/to/EasyEdit), skipped otherwise (CI has no host; see
docs/easyedit.md)."""

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

    # the YAML as shipped: batch_size 1 (edit() edits one request per call whatever it says; batch_edit() chunks by it)
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
    assert after["efficacy"] >= 0.75, after  # 3 of 4 (this test and the next pass on training seeds 0, 1, 2)
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
    """The plain EasyEdit path: the YAML names the model directory, which the plugin loads inside BaseEditor."""
    out, _ = reduced_fact_model("qwen3_moe")
    _, _, facts, _ = load(out)
    records = [f for f in facts if f["known"] and f["neighbours"]][:2]
    editor, _ = _editor(easyedit_host, out, stats_dir=str(tmp_path / "stats"), batch_size=2)
    metrics, _, _ = editor.batch_edit(**_inputs(records), sequential_edit=True, verbose=False)
    assert [m["post"]["rewrite_acc"][0] for m in metrics] == [1.0, 1.0]  # both (on training seeds 0, 1 and 2)


@pytest.mark.parametrize("mode", ["edit", "sequential", "batch"])
def test_easyedit_style_script(easyedit_host, yaml_fact_model, tmp_path, monkeypatch, capsys, mode):
    """examples/easyedit_edit.py: an EasyEdit-style script selecting MoTE by an elif of its if/elif chain, with one
    YAML (batch_size 50) for edit(), sequential edit() and batch_edit()."""
    import runpy

    out, _ = yaml_fact_model
    cfg = yaml.safe_load((HPARAMS / "testbed-qwen3_moe-fullrank.yaml").read_text())
    cfg.update(model_name=str(out / "model"), stats_dir=str(tmp_path / "stats"), batch_size=50)
    (tmp_path / "mote.yaml").write_text(yaml.safe_dump(cfg))
    script = Path(__file__).resolve().parent.parent / "examples" / "easyedit_edit.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--editing_method", "MoTE", "--hparams_dir",
                                      str(tmp_path / "mote.yaml"), "--mode", mode, "--n", "3"])
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
# EasyEdit's own example script, changed by one import and one elif
# ---------------------------------------------------------------------------------------------------------

MOTE_IMPORT = "from mote_plugin import MoTEHyperParams"
MOTE_ELIF = ["    elif args.editing_method == 'MoTE':", "        editing_hparams = MoTEHyperParams"]


def one_elif_change(text: str) -> str:
    """docs/easyedit.md: import MoTEHyperParams after EasyEdit's imports and give the if/elif chain a MoTE branch."""
    assert text.count("\n)\n") >= 1 and text.count("    else:\n        raise NotImplementedError\n") == 1
    text = text.replace("\n)\n", "\n)\n" + MOTE_IMPORT + "\n", 1)  # after `from easyeditor import (...)`
    return text.replace("    else:\n        raise NotImplementedError\n",
                        "\n".join(MOTE_ELIF) + "\n    else:\n        raise NotImplementedError\n")


def _counterfact_file(records, path: Path) -> None:
    path.write_text(json.dumps([{  # CounterFact's own (ROME) format
        "case_id": r["case_id"],
        "requested_rewrite": {"prompt": r["prompt"].replace(r["subject"], "{}", 1), "subject": r["subject"],
                              "target_new": {"str": r["target_new"]}, "target_true": {"str": r["target_true"]}},
        "paraphrase_prompts": r["paraphrase_prompts"][:1], "neighborhood_prompts": [r["neighbours"][0]["prompt"]]}
        for r in records]))


def _empty_punkt(root: Path) -> None:
    """The script's fluency metric (test_generation=True) tokenises with NLTK's punkt data (punkt_tab from NLTK 3.8.2
    on, the punkt pickle before: EasyEdit's requirements pin 3.6.5), which `nltk.download` fetches; offline, an empty
    English model (no abbreviations) stands in for it."""
    import pickle

    from nltk.tokenize.punkt import PunktSentenceTokenizer

    punkt = root / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).touch()
    (root / "tokenizers" / "punkt" / "PY3").mkdir(parents=True)  # where NLTK 3.6 looks under Python 3
    (root / "tokenizers" / "punkt" / "PY3" / "english.pickle").write_bytes(pickle.dumps(PunktSentenceTokenizer()))


def test_easyedit_example_script_runs_mote(easyedit_host, yaml_fact_model, tmp_path):
    """examples/run_AlphaEdit_editing.py of the EasyEdit checkout on PYTHONPATH, copied here with one import and one
    elif added (no register() call: loading the YAML registers MoTE), edits three CounterFact records of a fact model
    with `--editing_method MoTE` (EasyEdit's edit(): one request at a time, weights restored after each; its own
    metrics), run from another working directory than the YAML's, which names the model relative to itself."""
    checkout = Path(importlib.util.find_spec("easyeditor").origin).resolve().parent.parent
    original = checkout / "examples" / "run_AlphaEdit_editing.py"
    if not original.is_file():
        pytest.skip(f"{checkout} has no examples/run_AlphaEdit_editing.py (not a git checkout of EasyEdit)")
    text = original.read_text()
    changed = one_elif_change(text)
    diff = [l for l in difflib.unified_diff(text.splitlines(), changed.splitlines(), lineterm="", n=0)
            if l[:1] in "+-" and not l.startswith(("+++", "---")) and l.strip("+-").strip()]
    assert diff == ["+" + MOTE_IMPORT] + ["+" + line for line in MOTE_ELIF], diff
    script = tmp_path / "examples" / original.name
    script.parent.mkdir()
    script.write_text(changed)

    out, _ = yaml_fact_model
    _, _, facts, _ = load(out)
    records = [f for f in facts if f["known"] and f["neighbours"]][:3]
    (tmp_path / "data").mkdir()
    _counterfact_file(records, tmp_path / "data" / "counterfact.json")
    cfg = yaml.safe_load((HPARAMS / "testbed-qwen3_moe-fullrank.yaml").read_text())
    (tmp_path / "hparams" / "MoTE").mkdir(parents=True)
    model_dir = os.path.relpath(out / "model", tmp_path / "hparams" / "MoTE")  # relative to the YAML
    cfg.update(model_name=model_dir, stats_dir="../../stats", batch_size=50)
    (tmp_path / "hparams" / "MoTE" / "MoTE.yaml").write_text(yaml.safe_dump(cfg))
    _empty_punkt(tmp_path / "nltk_data")
    # the checkout, and this repository's mote_plugin first (not another copy the environment may have installed)
    plugin = str(HPARAMS.parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), plugin, os.environ.get("PYTHONPATH", "")]),
               NLTK_DATA=str(tmp_path / "nltk_data"))
    argv = ["--editing_method", "MoTE", "--hparams_dir", "../hparams/MoTE/MoTE", "--data_dir", "../data",
            "--data_type", "CF", "--ds_size", "3", "--output_dir", "../out"]
    # python -m mote_plugin.host_stubs: the script as `python SCRIPT ...` runs it, with the vision packages stubbed
    run = subprocess.run([sys.executable, "-m", "mote_plugin.host_stubs", str(script), *argv], cwd=script.parent,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "stats").is_dir(), "stats_dir read from the YAML's directory"
    metrics = json.loads((tmp_path / "out" / "model_MoTE_N=3_Sequential=False.json").read_text())
    pre = [m["pre"]["rewrite_acc"][0] for m in metrics]
    post = [m["post"]["rewrite_acc"][0] for m in metrics]
    print(f"run_AlphaEdit_editing.py, MoTE, edit(): rewrite_acc {pre} -> {post}")
    assert len(metrics) == 3 and sum(post) > sum(pre) and sum(post) / 3 >= 0.6, (pre, post)


# ---------------------------------------------------------------------------------------------------------
# the edit state across EasyEdit's restores; one YAML for edit() and batch_edit(); bf16 by model_name
# ---------------------------------------------------------------------------------------------------------


def _small_editor(easyedit_host, out, tmp_path, **overrides):
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / "testbed-qwen3_moe-fullrank"))
    hp = hp.updated(model_name=str(out / "model"), stats_dir=str(tmp_path / "stats"), **overrides)
    return easyedit_host.BaseEditor.from_hparams(hp), hp


def _down(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "down_proj" in n}


@pytest.mark.parametrize("memory", [False, True])
def test_edit_after_easyedit_restores_is_a_fresh_edit(easyedit_host, yaml_fact_model, tmp_path, memory):
    """edit() (the host restores the weights after each request), then batch_edit() of other requests, equals that
    batch_edit() on a freshly loaded model; the YAML's batch_size (50) serves both calls unchanged."""
    out, _ = yaml_fact_model
    _, _, facts, _ = load(out)
    records = [f for f in facts if f["known"] and f["neighbours"]]
    a, b = records[:3], records[3:6]
    editor, hp = _small_editor(easyedit_host, out, tmp_path, sequential_memory=memory, batch_size=50)
    editor.edit(**_inputs(a), sequential_edit=False, verbose=False)
    assert hp.batch_size == 50
    _, after, _ = editor.batch_edit(**_inputs(b), sequential_edit=True, verbose=False)
    fresh, _ = _small_editor(easyedit_host, out, tmp_path, sequential_memory=memory, batch_size=50)
    _, expected, _ = fresh.batch_edit(**_inputs(b), sequential_edit=True, verbose=False)
    got, want = _down(after), _down(expected)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_sequential_edit_accumulates(easyedit_host, yaml_fact_model, tmp_path):
    from mote_plugin.mote.editor import MoTEEditor

    out, _ = yaml_fact_model
    _, _, facts, _ = load(out)
    records = [f for f in facts if f["known"] and f["neighbours"]][:4]
    editor, hp = _small_editor(easyedit_host, out, tmp_path, sequential_memory=True, batch_size=50)
    editor.edit(**_inputs(records), sequential_edit=True, verbose=False)
    state = MoTEEditor(editor.model).state
    assert state.edits == 4 and len(state.timings) == 4 and state.memory


def test_bf16_by_model_name(easyedit_host, yaml_fact_model, tmp_path):
    """`dtype: bfloat16` loads model_name in bf16 through BaseEditor; one batch_edit() of 40 known facts edits as
    well as in float32 (efficacy within 5 points, the plugin's metric), writes finite bf16 weights, and the host's
    weights_copy restores them exactly."""
    out, _ = yaml_fact_model
    _, _, facts, _ = load(out)
    records = [f for f in facts if f["known"] and f["neighbours"]][:40]
    efficacy = {}
    for dtype in ("float32", "bfloat16"):
        editor, hp = _small_editor(easyedit_host, out, tmp_path, dtype=dtype, batch_size=len(records))
        assert editor.model.dtype == getattr(torch, dtype)
        before = _down(editor.model)
        _, edited, weights_copy = editor.batch_edit(**_inputs(records), sequential_edit=True, verbose=False)
        efficacy[dtype] = counterfact_metrics(edited, editor.tok, records)["efficacy"]
        assert all(p.dtype == getattr(torch, dtype) and torch.isfinite(p).all() for p in edited.parameters())
        assert weights_copy and all(not torch.equal(edited.get_parameter(n), v) for n, v in weights_copy.items())
        with torch.no_grad():
            for n, v in weights_copy.items():
                edited.get_parameter(n)[...] = v
        assert all(torch.equal(edited.get_parameter(n), v) for n, v in before.items())
    print(f"efficacy of {len(records)} edits in one batch_edit(): {efficacy}")
    assert abs(efficacy["bfloat16"] - efficacy["float32"]) <= 0.05 and efficacy["float32"] >= 0.8, efficacy
