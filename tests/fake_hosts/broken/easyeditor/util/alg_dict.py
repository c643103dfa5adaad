"""FAKE: how the stale PyPI easyeditor 0.0.1.dev0 fails on transformers 5 (its models import a removed helper)."""

raise ImportError("cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'")
