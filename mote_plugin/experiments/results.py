"""Writing an experiment's results: the report as JSON, its table as Markdown, its figures as PNG.

    write_results("runs/compare/results", report, markdown(report), {"": lambda plt: bars(report, plt)})
    -> runs/compare/results.json, results.md, results.png

Used by the editor comparison and by every benchmark under benchmarks/.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# a figure: draws with the pyplot module it is given and returns the matplotlib Figure (None: nothing to draw)
Figure = Callable[[object], object]


def run_info(command: str) -> dict:
    """What a report records about its run: the command, the date, the code's git commit, the machine, torch's version
    and thread count."""
    return {"command": command, "date": str(datetime.date.today()), "commit": git_commit(), "machine": machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def git_commit(root: str | Path | None = None) -> str | None:
    """The commit of the checkout this package runs from (`root`: another checkout), with "+changes" when tracked files
    outside benchmarks/results differ from it; None outside a git checkout or without git. Never raises."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if changes.returncode == 0 and changes.stdout.strip() else "")


def machine() -> str:
    """The machine in a few words: architecture, CPU model, whether it has AVX-512 (x86, from /proc/cpuinfo where it
    is readable; builds of the fact model differ between CPUs), and the CPU count."""
    parts = [platform.machine() or "unknown architecture"]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith(("model name", "Model", "Hardware"))), platform.processor())
    if model:
        parts.append(model)
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is not None:
        parts.append("AVX-512" if "avx512f" in flags else "no AVX-512")
    parts.append(f"{os.cpu_count()} CPUs")
    return ", ".join(parts)


def run_line(report: dict) -> str:
    """A Markdown report's provenance, from `run_info`'s keys: "`command`; date, commit C, machine, torch X, N
    threads" (a report written before commits were recorded has none)."""
    commit = report.get("commit")
    where = f"commit {commit[:12]}{'+changes' if commit.endswith('+changes') else ''}, " if commit else ""
    return (f"`{report['command']}`; {report['date']}, {where}{report['machine']}, torch {report['torch']}, "
            f"{report['threads']} threads")


def write_results(stem: str | Path, report: dict, markdown: str | None = None, figures: dict[str, Figure] | None = None,
                  json_default: Callable | None = None) -> Path:
    """Write the report as `<stem>.json` (indent 1; `json_default` as `json.dumps`'s `default`), `markdown` (when
    given) as `<stem>.md`, and each figure: the one named "" as `<stem>.png`, one named e.g. "-ranks" as
    `<stem>-ranks.png` (120 dpi, matplotlib's Agg backend). Creates the directory. Without matplotlib the figures are
    skipped and stale ones removed. Returns the JSON file's path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(report, indent=1, default=json_default))
    if markdown is not None:
        stem.with_suffix(".md").write_text(markdown)
    if figures:
        _write_figures(stem, figures)
    return path


def _figure_path(stem: Path, name: str) -> Path:
    return stem.with_suffix(".png") if not name else stem.with_name(f"{stem.name}{name}.png")


def _write_figures(stem: Path, figures: dict[str, Figure]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not importable: no figures written")
        for name in figures:
            _figure_path(stem, name).unlink(missing_ok=True)
        return
    for name, draw in figures.items():
        fig = draw(plt)
        if fig is None:
            continue
        fig.savefig(_figure_path(stem, name), dpi=120)
        plt.close(fig)
