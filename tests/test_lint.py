"""The linter (ruff, configured in pyproject.toml: pyflakes, pycodestyle, import order, 120 columns) finds nothing.

Part of the suite so that the README's one test command, which CI runs (.ci/run), checks it too. Skipped only where
ruff is not installed (it is in the `test` extra)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_check_finds_nothing():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
