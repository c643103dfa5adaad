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


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_readme_numbers_come_from_committed_results():
    """The README's result tables are copies of committed results files, each written by the command it names: the
    headline table of benchmarks/results/quality.md (benchmarks/quality.py) and the demo's table
    (benchmarks/results/demo.md, README command 1's output)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 8500, len(readme)
    quality = (ROOT / "benchmarks" / "results" / "quality.md").read_text()
    headline = table_rows(quality.split("## Headline (test split)")[1].split("\n## ")[0])
    assert len(headline) >= 7 and all(row in readme for row in headline)
    demo = table_rows((ROOT / "benchmarks" / "results" / "demo.md").read_text())
    for row in demo[1:]:  # the plugin's metrics and edit time of every method (host columns dropped without a host)
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[1] != "ok":
            continue
        assert f"| {cells[0]} | ok | " + " | ".join(cells[2:6]) + f" | {cells[-1]} |" in readme, cells[0]
