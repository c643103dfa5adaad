"""Registering MoTE with an EasyEdit host (`easyeditor`), so scripts select it by YAML like ROME or MEMIT.

    import mote_plugin
    mote_plugin.register()          # adds "MoTE" to the host's ALG_DICT and batch_edit's allow-list
    hparams = mote_plugin.MoTEHyperParams.from_hparams("hparams/MoTE/qwen3-30b-a3b")
    editor = BaseEditor.from_hparams(hparams)

EasyEdit has no registration API (docs/easyedit-contract): its `BaseEditor` looks the algorithm up in the
module-level dict `easyeditor.util.alg_dict.ALG_DICT`, and `batch_edit` asserts
`BatchEditor.is_batchable_method(alg_name)` against a hard-coded list. `register` adds the dict entry and
wraps that check (every other name keeps its answer). It is idempotent, imports the host only when it is
installed, and never raises for a missing host: it returns a `HostStatus` saying what happened.

The stale PyPI release (easyeditor 0.0.1.dev0, 2023) hard-codes CUDA devices and cannot run MEMIT's v* on
transformers 5; it is recognised (no AlphaEdit in its ALG_DICT) and refused with a message.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

ALG_NAME = "MoTE"
HOST_HINT = ("clone https://github.com/zjunlp/EasyEdit and put the checkout on PYTHONPATH "
             "(the PyPI release easyeditor 0.0.1.dev0 is too old to run on CPU or with transformers 5)")


class HostError(RuntimeError):
    """An `easyeditor` is importable but cannot host MoTE (the message says why and what to do)."""


@dataclass(frozen=True)
class HostStatus:
    registered: bool
    reason: str

    def __bool__(self) -> bool:
        return self.registered


def _installed_version() -> str | None:
    """The version pip recorded for `easyeditor` (None for a git checkout on PYTHONPATH, which has no metadata)."""
    try:
        return importlib.metadata.version("easyeditor")
    except importlib.metadata.PackageNotFoundError:
        return None


def _host_modules():
    """(alg_dict module, batch_editor module), or raise ImportError / HostError."""
    if importlib.util.find_spec("easyeditor") is None:
        raise ImportError("easyeditor is not installed")
    # `import easyeditor.util.alg_dict as m` breaks after the package's star-imports rebind `easyeditor.util`;
    # importlib.import_module resolves through sys.modules instead.
    try:
        alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    except Exception as e:
        version = _installed_version()
        if version and version.startswith("0.0."):
            raise HostError(f"easyeditor {version} (the stale PyPI release) does not import here ({type(e).__name__}: {e}); "
                            f"MoTE needs the current EasyEdit: {HOST_HINT}") from e
        raise
    if "AlphaEdit" not in alg_dict.ALG_DICT:
        raise HostError(f"the importable easyeditor ({alg_dict.__file__}) is the stale 2023 release (its ALG_DICT has no "
                        f"AlphaEdit); MoTE needs the current EasyEdit: {HOST_HINT}")
    return alg_dict, importlib.import_module("easyeditor.editors.batch_editor")


def _admit_to_batch_edit(batch_editor) -> None:
    cls = batch_editor.BatchEditor
    check = cls.is_batchable_method
    if getattr(check, "_admits_mote", False):
        return

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name == ALG_NAME or check(alg_name)

    is_batchable_method._admits_mote = True
    cls.is_batchable_method = staticmethod(is_batchable_method)


def register(strict: bool = False) -> HostStatus:
    """Make "MoTE" selectable in the importable EasyEdit host. Idempotent.

    Returns a `HostStatus` (truthy when MoTE is registered). With no host installed, or a host that fails to
    import, nothing happens and the status says why; `strict=True` raises instead (ImportError / HostError).
    The stale PyPI host raises `HostError` with `strict`, else it is reported in the status.
    """
    from .mote.mote_main import apply_mote_to_model

    try:
        alg_dict, batch_editor = _host_modules()
    except Exception as e:
        if strict:
            raise
        reason = str(e) if isinstance(e, (ImportError, HostError)) else f"easyeditor failed to import ({type(e).__name__}: {e})"
        log.info("MoTE not registered with EasyEdit: %s", reason)
        return HostStatus(False, reason)
    alg_dict.ALG_DICT[ALG_NAME] = apply_mote_to_model
    _admit_to_batch_edit(batch_editor)
    return HostStatus(True, f"MoTE registered in {alg_dict.__name__}.ALG_DICT ({len(alg_dict.ALG_DICT)} algorithms)")


def is_registered() -> bool:
    """True when the host's ALG_DICT (if the host is already imported) maps "MoTE" to the plugin."""
    import sys

    module = sys.modules.get("easyeditor.util.alg_dict")
    return module is not None and ALG_NAME in getattr(module, "ALG_DICT", {})
