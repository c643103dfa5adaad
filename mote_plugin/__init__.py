"""MoTE (MoE Tucker Editor): closed-form knowledge editing for Mixture-of-Experts LLMs.

`mote_plugin.register()` makes "MoTE" selectable in an EasyEdit host (see `mote_plugin.easyedit`); when the host
is already imported, `import mote_plugin` registers by itself.
"""

import sys

__version__ = "0.1.0"

_LAZY = {
    "MoTEHyperParams": "mote_plugin.mote.hparams",
    "apply_mote_to_model": "mote_plugin.mote.mote_main",
    "last_timings": "mote_plugin.mote.mote_main",
    "register": "mote_plugin.easyedit",
    "save_edit": "mote_plugin.patch",
    "apply_edit": "mote_plugin.patch",
    "revert_edit": "mote_plugin.patch",
    "inspect_edit": "mote_plugin.patch",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """The public API, imported on first use (so `import mote_plugin` stays cheap)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mote_plugin' has no attribute {name!r}")


if "easyeditor.util.alg_dict" in sys.modules:  # the host is loaded already: register now (never raises)
    from .easyedit import register as _register

    _register()
