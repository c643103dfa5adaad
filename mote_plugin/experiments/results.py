"""Writing an experiment's results: the report as JSON, its table as Markdown, its figures as PNG.

    write_results("runs/compare/results", report, markdown(report), {"": lambda plt: bars(report, plt)})
    -> runs/compare/results.json, results.md, results.png

Used by the editor comparison and by every benchmark under benchmarks/.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# a figure: draws with the pyplot module it is given and returns the matplotlib Figure (None: nothing to draw)
Figure = Callable[[object], object]


def run_info(command: str) -> dict:
    """What a report records about its run: the command, the date, the machine, torch's version and thread count."""
    return {"command": command, "date": str(datetime.date.today()),
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_line(report: dict) -> str:
    """A Markdown report's provenance, from `run_info`'s keys: "`command`; date, machine, torch X, N threads"."""
    return (f"`{report['command']}`; {report['date']}, {report['machine']}, torch {report['torch']}, "
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
