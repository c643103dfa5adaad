"""The quality protocol's summary tables (benchmarks/quality.py, its host rows in host_rows.py), shared with the docs
rendered from its results (render.py): plain formatting of a report, no torch."""

from __future__ import annotations

from collections.abc import Callable


def headline_cell(row: dict | None, detail: bool = True, bold: bool = True) -> str:
    """One method on one arch's test split: utility (in bold with `bold`) [95% interval], with `detail` efficacy /
    generalization / specificity, then the requests edited of those asked (not for the unedited model; "N/M edited",
    without `detail` "N/M"); "-" where it did not run."""
    if row is None:
        return "-"
    if "error" in row:
        return f"did not run: {row['error']}"
    lo, hi = row["ci95"]["utility"]
    utility = f"**{row['utility']:.2f}**" if bold else f"{row['utility']:.2f}"
    cell = f"{utility} [{lo:.2f}, {hi:.2f}]"
    if detail:
        cell += " · " + " / ".join(f"{row[k]:.2f}" for k in ("efficacy", "generalization", "specificity"))
    return cell + (f" · {row['edited']}/{row['n']}" + " edited" * detail if "edited" in row else "")


def headline(report: dict, rows: dict[str, str], cell: Callable[[dict | None], str] = headline_cell) -> list[str]:
    """The unedited model and `rows` ({method: label}; those that ran on some arch) on every arch's test split, one
    column per arch, a `cell` (by default `headline_cell`) each."""
    archs = {a: r for a, r in report["archs"].items() if "test" in r}
    head = "| method | " + " | ".join(
        f"{a} (N = {r['splits']['test'][1] - r['splits']['test'][0] + 1})" for a, r in archs.items()) + " |"
    lines = [head, "|---" * (len(archs) + 1) + "|"]
    for method, label in {"unedited": "unedited", **rows}.items():
        if any(method in res["test"] for res in archs.values()):
            lines.append(f"| {label} | " + " | ".join(cell(res["test"].get(method)) for res in archs.values()) + " |")
    return lines
