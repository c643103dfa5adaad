"""The README's two set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for b in blocks[:2] for line in b.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    install_and_run, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
    assert "set -euo pipefail" in ci


def test_readme_pins_the_cpu_torch_wheel():
    for command in readme_commands():
        assert "torch==2.13.0" in command


def test_version_in_one_place():
    import mote_plugin

    assert re.fullmatch(r"\d+\.\d+\.\d+", mote_plugin.__version__)
    project = (ROOT / "pyproject.toml").read_text().split("[project]")[1].split("[")[0]
    assert "version = " not in project.replace('dynamic = ["version"]', "")


def test_readme_is_short():
    """The README speaks to a newcomer; long tables and lab notes live in benchmarks/ and docs/ (its numbers are
    rendered from the results files: tests/test_rendered.py)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 8000, len(readme)
