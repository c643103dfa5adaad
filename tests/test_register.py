"""`mote_plugin.register` against FAKE host packages (tests/fake_hosts: the registry's shape only), for what
cannot be checked without a host: a current-style host, a stale one, none. The real host is exercised by
tests/test_easyedit_host.py when EasyEdit is importable."""

import importlib
import importlib.metadata
import sys
from pathlib import Path

import pytest

import mote_plugin
from mote_plugin.easyedit import HostError, is_registered, register
from mote_plugin.mote.mote_main import apply_mote_to_model

FAKES = Path(__file__).resolve().parent / "fake_hosts"


@pytest.fixture
def fake_host(monkeypatch):
    """Put one fake `easyeditor` first on sys.path; the real one (if any) comes back afterwards."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "easyeditor" or k.startswith("easyeditor.")}

    def use(kind: str):
        monkeypatch.syspath_prepend(str(FAKES / kind))
        importlib.invalidate_caches()

    yield use
    for k in [k for k in sys.modules if k == "easyeditor" or k.startswith("easyeditor.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_register_current_host(fake_host):
    fake_host("current")
    status = register()
    assert status and "4 algorithms" in status.reason
    alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    batch = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    assert alg_dict.ALG_DICT["MoTE"] is apply_mote_to_model and is_registered()
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
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "easyeditor" else real_find_spec(name, *a))
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
