"""FAKE: the shape of the stale PyPI easyeditor 0.0.1.dev0 registry (no AlphaEdit; register() looks no further)."""

ALG_DICT = {"ROME": object(), "MEMIT": object()}
