"""`mote_plugin.register` against FAKE host packages (tests/fake_hosts: the registry's shape only), for what
cannot be checked without a host: a current-style host, a stale one, none; registration on `register()` only (not on
import), `hparams_class`, and MoTE's model loading inside the host's BaseEditor. The real host is exercised by
tests/test_easyedit_host.py when EasyEdit is importable."""

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mote_plugin
from mote_plugin.easyedit import HostError, apply_mote, hparams_class, is_registered, register
from mote_plugin.mote.hparams import MoTEHyperParams

FAKES = Path(__file__).resolve().parent / "fake_hosts"


@pytest.fixture
def fake_host(monkeypatch):
    """Put one fake `easyeditor` first on sys.path; the real one (if any) comes back afterwards."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "easyeditor" or k.startswith("easyeditor.")}

    def use(kind: str):
        for k in [k for k in sys.modules if k == "easyeditor" or k.startswith("easyeditor.")]:
            del sys.modules[k]  # e.g. a real host that hparams_class() registered with before this call
        monkeypatch.syspath_prepend(str(FAKES / kind))
        importlib.invalidate_caches()

    bases = MoTEHyperParams.__bases__
    yield use
    for k in [k for k in sys.modules if k == "easyeditor" or k.startswith("easyeditor.")]:
        del sys.modules[k]
    sys.modules.update(saved)
    MoTEHyperParams.__bases__ = bases  # register() rebased it onto the fake host's HyperParams


def test_register_current_host(fake_host):
    fake_host("current")
    status = register()
    assert status and "4 algorithms" in status.reason
    alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    batch = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    assert alg_dict.ALG_DICT["MoTE"] is apply_mote and is_registered()
    assert batch.is_batchable_method("MoTE") and batch.is_batchable_method("MEMIT")
    assert not batch.is_batchable_method("ROME")
    check = batch.is_batchable_method
    assert register() and batch.is_batchable_method is check, "idempotent: the check is wrapped once"
    assert list(alg_dict.ALG_DICT) == ["ROME", "MEMIT", "AlphaEdit", "MoTE"]


def test_register_refuses_the_stale_host(fake_host):
    fake_host("stale")
    status = register()
    assert not status and "stale" in status.reason and "PYTHONPATH" in status.reason
    assert "MoTE" not in importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    with pytest.raises(HostError, match="stale"):
        register(strict=True)


def test_register_without_host(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name,
                        *a: None if name == "easyeditor" else real_find_spec(name, *a))
    status = register()
    assert not status and status.reason == "easyeditor is not installed"
    with pytest.raises(ImportError):
        register(strict=True)
    assert mote_plugin.register is register


def test_stale_release_that_does_not_import(fake_host, monkeypatch):
    """The real PyPI 0.0.1.dev0 fails at import on transformers 5: the message names the release, not just the error."""
    fake_host("broken")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1.dev0")
    status = register()
    assert not status and "easyeditor 0.0.1.dev0 (the stale PyPI release)" in status.reason
    assert "apply_chunking_to_forward" in status.reason and "PYTHONPATH" in status.reason


def test_importing_registers_nothing_register_does():
    """Importing the plugin never touches a host (a fresh interpreter, as a script starts): not `import mote_plugin`,
    not `MoTEHyperParams`, not after `import easyeditor`; `mote_plugin.register()` registers MoTE and makes
    `MoTEHyperParams` a subclass of the host's `HyperParams`."""
    code = ("import sys, mote_plugin; from mote_plugin import MoTEHyperParams, MoTEEditor, apply_mote_to_model; "
            "assert 'easyeditor' not in sys.modules; "
            "import easyeditor; import mote_plugin.easyedit; from easyeditor.util.alg_dict import ALG_DICT; "
            "from easyeditor.util.hparams import HyperParams; from mote_plugin.easyedit import apply_mote; "
            "assert 'MoTE' not in ALG_DICT and not issubclass(MoTEHyperParams, HyperParams); "
            "assert mote_plugin.register(); "
            "assert issubclass(MoTEHyperParams, HyperParams) and ALG_DICT['MoTE'] is apply_mote; "
            "assert easyeditor.editors.batch_editor.BatchEditor.is_batchable_method('MoTE'); print('registered')")
    plugin = str(FAKES.parent.parent)  # this repository's mote_plugin, not another installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKES / "current"), plugin,
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "registered", run.stderr[-2000:]


def test_constructing_hparams_registers(fake_host):
    """An EasyEdit script that only names MoTEHyperParams in its if/elif chain gets MoTE registered: loading or
    constructing the class registers it with an importable host (idempotent); without a host nothing happens."""
    fake_host("current")
    importlib.import_module("easyeditor")  # EasyEdit's scripts import the host first
    assert not is_registered()
    MoTEHyperParams(alg_name="MoTE", model_name="m", layers=[0], device="cpu")
    assert is_registered()
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    MoTEHyperParams(alg_name="MoTE", model_name="m", layers=[0], device="cpu")
    assert list(alg_dict) == ["ROME", "MEMIT", "AlphaEdit", "MoTE"]


def test_constructing_hparams_imports_a_host_once(fake_host, monkeypatch):
    """A host not imported yet is imported (once per process) when the class is constructed."""
    from mote_plugin import easyedit

    fake_host("current")
    monkeypatch.setattr(easyedit, "_IMPORT_TRIED", False)
    assert "easyeditor" not in sys.modules
    MoTEHyperParams(alg_name="MoTE", model_name="m", layers=[0], device="cpu")
    assert is_registered() and easyedit._IMPORT_TRIED


def test_hparams_class_registers(fake_host):
    """Asking for a hyper-parameter class is meeting the host: EasyEdit's scripts then run MoTE by its YAML."""
    fake_host("current")
    assert hparams_class("MoTE") is MoTEHyperParams
    assert is_registered()
    assert issubclass(MoTEHyperParams, importlib.import_module("easyeditor.util.hparams").HyperParams)


def test_hparams_class(fake_host, monkeypatch):
    """One line replaces an EasyEdit script's if/elif chain: MoTE, or the host's class by its method name."""
    assert hparams_class("MoTE") is MoTEHyperParams
    fake_host("current")
    host = importlib.import_module("easyeditor")
    assert hparams_class("MEMIT") is host.MEMITHyperParams and hparams_class("R-ROME") is host.R_ROMEHyperParams
    with pytest.raises(NotImplementedError,
                       match="'KE'.*known: MEMITHyperParams, MoTEHyperParams, R_ROMEHyperParams\\)"):
        hparams_class("KE")  # training classes are not editors' hyper-parameters


def test_hparams_class_without_host(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyeditor", None)  # `import easyeditor` fails
    assert hparams_class("MoTE") is MoTEHyperParams
    with pytest.raises(NotImplementedError, match="'MEMIT': only MoTE is available without an EasyEdit host"):
        hparams_class("MEMIT")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Tiny OLMoE / Qwen3-MoE checkpoints with a tokenizer, in directories named as their families."""
    from mote_plugin.mote.model.stats import corpus_texts
    from mote_plugin.testbed.tokenizer import train_tokenizer
    from test_adapters import olmoe, qwen3_moe
    from test_mote_main import REQUESTS

    tok = train_tokenizer(list(corpus_texts(None))[:100] + [r["prompt"] for r in REQUESTS], 64)
    root = tmp_path_factory.mktemp("models")
    for name, make in (("OLMoE-tiny", olmoe), ("qwen3-moe-tiny", qwen3_moe)):
        make().save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_base_editor_loads_every_family_for_mote(fake_host, saved_models):
    """BaseEditor picks a loader by substring and raises a bare NotImplementedError for other names: for MoTE the
    plugin loads those names itself; a (model, tok) pair leaves a string behind for the host's evaluators; other
    algorithms keep the host's behaviour."""
    fake_host("current")
    assert register()
    editor_cls = importlib.import_module("easyeditor").BaseEditor
    hp = MoTEHyperParams(alg_name="MoTE", model_name=str(saved_models / "OLMoE-tiny"), layers=[0], device="cpu",
                         fp16=True)
    editor = editor_cls.from_hparams(hp)
    assert type(editor.model).__name__ == "OlmoeForCausalLM" and editor.model.dtype == torch.float16  # fp16 read
    assert editor.tok.padding_side == "left" and editor.tok.pad_token_id is not None
    assert editor.model_name == hp.model_name == str(saved_models / "OLMoE-tiny")
    hp.model_name = str(saved_models / "qwen3-moe-tiny")  # a name the host would load, in float16 / float32 only
    hp.fp16, hp.dtype = False, "bfloat16"
    qwen = editor_cls.from_hparams(hp)
    assert type(qwen.model).__name__ == "Qwen3MoeForCausalLM" and qwen.model.dtype == torch.bfloat16
    assert qwen.tok.pad_token == "<|endoftext|>" and qwen.tok.padding_side == "left"  # the host's Qwen tokens
    hp.model_name = (editor.model, editor.tok)
    editor = editor_cls.from_hparams(hp)
    assert editor.model_name == hp.model_name == str(saved_models / "OLMoE-tiny")  # the model's own name
    hp.model_name = str(saved_models / "DeepSeek-V3-missing")
    with pytest.raises(ValueError,
                       match="DeepSeek-V3-missing.*could not load it.*hparams.model_name = \\(model, tok\\)"):
        editor_cls.from_hparams(hp)

    class Other:  # another algorithm: untouched
        alg_name, model_name = "MEMIT", str(saved_models / "OLMoE-tiny")

    with pytest.raises(NotImplementedError):
        editor_cls.from_hparams(Other())
    init = editor_cls.__init__
    assert register() and editor_cls.__init__ is init, "idempotent: wrapped once"
