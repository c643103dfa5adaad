"""MoTE (MoE Tucker Editor): closed-form knowledge editing for Mixture-of-Experts LLMs.

    MoTEEditor(model, tok, hparams).edit(requests)           the editor (mote_plugin.mote.editor)
    apply_mote_to_model(model, tok, requests, hparams)       the same behind EasyEdit's apply-function contract
    last_timings(model)                                      seconds per stage of the last edit
    last_coverage(model)                                     what the basis held of the last edit, per solve
    save_edit / apply_edit / revert_edit / inspect_edit      edit patches (docs/patches.md)
    save_model(model, src, out, names)                       the source checkpoint with the edited tensors rewritten
    MoTEHyperParams                                          the YAML hyper-parameters
    register()                                               make "MoTE" selectable in an EasyEdit host

Importing the package does nothing else: it never imports or registers with an EasyEdit host; `register()` does, and
constructing or loading `MoTEHyperParams` calls it when a host is importable (see `mote_plugin.easyedit`).
"""

from . import _hooks
from ._version import __version__


def _register_with_host() -> None:
    from .easyedit import register_with_host

    register_with_host()


_hooks.HPARAMS_CREATED.append(_register_with_host)

_LAZY = {
    "MoTEEditor": "mote_plugin.mote.editor",
    "MoTEHyperParams": "mote_plugin.mote.hparams",
    "apply_mote_to_model": "mote_plugin.mote.mote_main",
    "last_timings": "mote_plugin.mote.mote_main",
    "last_edited": "mote_plugin.mote.mote_main",
    "last_coverage": "mote_plugin.mote.mote_main",
    "register": "mote_plugin.easyedit",
    "save_edit": "mote_plugin.mote.patches.files",
    "save_model": "mote_plugin.saving",
    "apply_edit": "mote_plugin.mote.patches.files",
    "revert_edit": "mote_plugin.mote.patches.files",
    "inspect_edit": "mote_plugin.mote.patches.files",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """The public API, imported on first use (so `import mote_plugin` stays cheap)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mote_plugin' has no attribute {name!r}")
