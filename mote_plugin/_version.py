"""The package version (read by setuptools, and recorded in statistics caches, fact-model manifests and patches)."""

__version__ = "0.1.0"
