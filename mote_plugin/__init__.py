"""MoTE (MoE Tucker Editor): closed-form knowledge editing for Mixture-of-Experts LLMs."""

__version__ = "0.1.0"

_LAZY = {
    "MoTEHyperParams": "mote_plugin.mote.hparams",
    "apply_mote_to_model": "mote_plugin.mote.mote_main",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """The public API, imported on first use (so `import mote_plugin` stays cheap)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mote_plugin' has no attribute {name!r}")
