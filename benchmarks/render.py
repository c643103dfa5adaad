"""Every number README.md, benchmarks/*.md and docs/*.md restate from a results file, rendered from that file.

    python benchmarks/render.py          # rewrite every rendered block from benchmarks/results/*.json
    python benchmarks/render.py --check  # exit 1 naming each block that differs from what its results file gives

A rendered block is the text between two markers: a table in its own lines, or a few words inside a sentence.

    <!-- rendered: demo -->
    | method | edited | ... |
    ...
    <!-- /rendered -->
    ... took <!-- rendered: end-to-end -->68.6 s ...<!-- /rendered --> on ...

The name says what goes there: BLOCKS maps it to the results files it is rendered from (benchmarks/results/) and the
function that renders them. A function that returns a list of lines is a table, followed by a line naming its results
file and how that was made (command, date, commit, machine, as far as the file records them); one that returns a string
is inline text. tests/test_rendered.py fails while any block differs from what its files give, and checks that each
block follows its files.

To add a block: write the function here (reuse the benchmark's own table function where it has one), add it to BLOCKS,
put the two markers where the numbers go (anything between them is replaced) and run this script. Not placed yet, its
reports not measured: `demo_ranges`, README command 1's range over builds of its recipe (benchmarks/demo_seeds.py
writes demo.json and demo-seedN.json); `"demo-seeds": Block(("demo.json", "demo-seed1.json", "demo-seed2.json"),
demo_ranges)` places it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import coverage_trend  # noqa: E402  (the benchmarks' own table functions)
import edit_memory  # noqa: E402
import offload_memory  # noqa: E402
import quality  # noqa: E402
from mote_plugin.experiments.compare import edited  # noqa: E402
from mote_plugin.experiments.results import run_line  # noqa: E402
from tables import headline, headline_cell  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ("README.md", "benchmarks/*.md", "docs/*.md")
# a marker quoted in backticks (as in this docstring's explanation in a doc) is text, not a marker
MARKER = re.compile(r"(?<!`)<!-- rendered: (?P<name>[\w.-]+) -->(?P<body>.*?)(?<!`)<!-- /rendered -->", re.S)
METRICS = ("efficacy", "generalization", "specificity", "utility")
SHAPES = {"qwen3-30b-a3b": "Qwen3-30B-A3B", "gpt-oss-20b": "GPT-OSS-20B", "qwen3.6-35b-a3b": "Qwen3.6-35B-A3B"}


# ---------------------------------------------------------------------------------------------------------------------
# README command 1 (examples/compare_editors.py's report)
# ---------------------------------------------------------------------------------------------------------------------


def demo_table(report: dict) -> list[str]:
    """Each method that ran: requests edited of those asked and the plugin's metrics; the methods that did not run, in
    one line below."""
    n = report["n"]
    lines = ["| method | edited | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for r in report["results"]:
        if r["status"] == "ok":
            count = edited(r, n)
            lines.append(f"| {r['method']} | {'-' if count is None else count}/{n} | "
                         + " | ".join(f"{r['metrics'][k]:.2f}" for k in METRICS) + " |")
    why: dict[str, list[str]] = {}  # the methods that did not run, by reason
    for r in report["results"]:
        if r["status"] != "ok":
            why.setdefault(f"{r['status']}: {r['reason']}", []).append(r["method"])
    if why:
        lines += ["", "; ".join(f"{', '.join(names)}: {reason}" for reason, names in why.items()) + "."]
    return lines


def demo_ranges(*reports: dict) -> list[str]:
    """The same table over several runs of one comparison (build seeds, machines): each cell the lowest and highest
    value of the runs ("lo-hi"), one value where they agree."""
    def span(values: list[float], fmt: str) -> str:
        lo, hi = min(values), max(values)
        return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"

    n = reports[0]["n"]
    lines = [f"| method (range over {len(reports)} runs) | edited | " + " | ".join(METRICS) + " |",
             "|---" * (len(METRICS) + 2) + "|"]
    for r in reports[0]["results"]:
        rows = [next(x for x in rep["results"] if x["method"] == r["method"]) for rep in reports]
        if any(x["status"] != "ok" for x in rows):
            continue
        counts = [edited(x, n) for x in rows]
        count = "-" if None in counts else span(counts, "d")
        lines.append(f"| {r['method']} | {count}/{n} | "
                     + " | ".join(span([x["metrics"][k] for x in rows], ".2f") for k in METRICS) + " |")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# the quality protocol (benchmarks/quality.py)
# ---------------------------------------------------------------------------------------------------------------------

def quality_headline(report: dict) -> list[str]:
    return headline(report, quality.HEADLINE)


BASES = {"MoTE's settings": "the paper's (weights' HOSVD, whitening in)", "whitening none": "same, no whitening",
         "whitening out": "same, whitening out", "whitening both": "same, whitening in and out",
         "edit-aware": "edit-aware (`weights+edit`)", "edit-aware, r_e = E": "edit-aware, r_e = E",
         "auto 0.9": "`auto` ranks, coverage 0.9"}


def quality_basis(report: dict) -> list[str]:
    """What each basis holds of the first test batch at the last edited layer, per fact model, beside what a random
    subspace of the same rank holds (r / n of the mode)."""
    lines = ["Mean (smallest) share over the batch's edits / what a random subspace of that rank holds:", "",
             "| basis | fact model | (r_e, r_out, r_in) of (E, d, h) | residuals in U_out | keys in U_in | "
             "gates in U_e | reproduced |", "|---|---|---|---|---|---|---|"]
    for name, label in BASES.items():
        for arch, res in report["archs"].items():
            row = res.get("basis", {}).get(name)
            if row is None:
                continue
            (e, d, h), (re_, ro, ri) = res["shape"], row["ranks"]
            shares = [f"{quality._share(row[k])} / {r / m:.2f}" if row.get(k) else "-"
                      for k, r, m in (("residual_in_U_out", ro, d), ("keys_in_U_in", ri, h), ("gates_in_U_e", re_, e))]
            lines.append(f"| {label} | {arch} | {(re_, ro, ri)} of {(e, d, h)} | " + " | ".join(shares)
                         + f" | {quality._share(row.get('reproduced'))} |")
    return lines


def quality_whitening(report: dict) -> list[str]:
    """Test utility [interval] and requests edited of the paper's basis and the edit-aware basis under each whitening
    (ablations of their dev-chosen settings)."""
    archs = {a: r for a, r in report["archs"].items() if "ablations" in r}
    lines = ["| basis, whitening | " + " | ".join(archs) + " |", "|---" * (len(archs) + 1) + "|"]
    for method, label in (("MoTE", "the paper's"), ("MoTE-edit", "edit-aware")):
        for variant in ("none", "in", "out", "both"):
            cells = [headline_cell(r["ablations"].get(method, {}).get("whitening", {}).get(variant), detail=False)
                     for r in archs.values()]
            lines.append(f"| {label}, {variant} | " + " | ".join(cells) + " |")
    return lines


def auto_ranks(report: dict) -> str:
    """The ranks `auto` (coverage 0.9) chose on the test batches, per fact model."""
    return "; ".join(f"{arch} " + " to ".join(str(tuple(r)) for r in dict.fromkeys(
        map(tuple, res["test"]["MoTE-auto"]["coverage"]["ranks"]))) + f" of {tuple(res['shape'])}"
        for arch, res in report["archs"].items() if "MoTE-auto" in res.get("test", {}))


def reproduced_threshold(report: dict) -> str:
    """Efficacy of the dev-grid runs of the edit-aware and `auto` rows whose solves reproduced under 0.3 on average,
    against the others (docs/method.md, the default `min_reproduced`)."""
    low, high = [], []
    for res in report["archs"].values():
        for method in ("MoTE-edit", "MoTE-auto"):
            for point in res.get("tune", {}).get(method, {}).get("grid", []):
                share = (point.get("coverage") or {}).get("reproduced")
                if share is not None:
                    (low if share["mean"] < 0.3 else high).append(point["efficacy"])
    return (f"over the {len(low) + len(high)} dev-grid runs of the edit-aware and `auto` rows on the "
            f"{len(report['archs'])} fact models, the {len(low)} whose solves reproduced under 0.3 on average reached "
            f"an efficacy of {sum(low) / len(low):.2f} on average, the other {len(high)} {sum(high) / len(high):.2f} "
            f"(lowest {min(high):.2f})")


def basis_example(report: dict) -> str:
    """What the paper's basis holds of an edit on the qwen3_moe fact model (docs/method.md)."""
    res = report["archs"]["qwen3_moe"]
    row, (_, d, _) = res["basis"]["MoTE's settings"], res["shape"]
    return (f"{row['residual_in_U_out']['mean']:.2f} of each residual at r_out = {row['ranks'][1]} of d = {d}, and "
            f"`reproduced` {row['reproduced']['mean']:.2f}")


def traced_bands(report: dict) -> str:
    """Where the quality builds' tracing put the facts (docs/testbed.md)."""
    return "; ".join(f"{arch}: layers {res['traced_layers'][0]}-{res['traced_layers'][-1]} at {res['lookup_token']}"
                     for arch, res in report["archs"].items())


# the README's side-by-side rows and their short labels; the full table (every row, with efficacy / generalization /
# specificity, edit times and the settings each chose) is side_by_side.md
README_ROWS = {"MoTE-auto": "MoTE, `auto` ranks", "MoTE": "MoTE, paper's basis", "Global-residual": "Global ridge",
               "MoEEdit-BCD": "MoEEdit-BCD", "MEMIT-experts": "MEMIT on the experts", "ROME": "ROME (o_proj)",
               "MEMIT": "MEMIT (o_proj)", "AlphaEdit": "AlphaEdit (o_proj)", "FT-L (experts)": "FT-L (experts)",
               "FT-M (experts)": "FT-M (experts)", "FT-M (o_proj)": "FT-M (o_proj)", "LoRA": "LoRA",
               "AdaLoRA": "AdaLoRA"}


def side_by_side_summary(report: dict) -> list[str]:
    """The README's rows of the side-by-side protocol (benchmarks/configs/side_by_side.yaml): test utility [interval]
    and requests edited, per fact model; the rows left out named below."""
    cfg = report["config"]
    names = [*cfg["methods"], *(cfg.get("host_methods") or {})]
    tests = [r["test"] for r in report["archs"].values() if "test" in r]
    ran = [n for n in names if any(n in t and "error" not in t[n] for t in tests)]
    lines = headline(report, {n: README_ROWS[n] for n in ran if n in README_ROWS},
                     cell=lambda row: headline_cell(row, detail=False, bold=False))
    rest = [n for n in names if n not in README_ROWS or n not in ran]
    return lines + (["", f"In side_by_side.md only: {', '.join(rest)}."] if rest else [])


# ---------------------------------------------------------------------------------------------------------------------
# speed and memory
# ---------------------------------------------------------------------------------------------------------------------


def end_to_end(report: dict) -> str:
    """The 1000-edit run in words: how many were edited, the time, and v*'s share of it."""
    return (f"{report['edited']} of {report['edits']} requests edited (the other {report['edits'] - report['edited']} "
            f"left out: their v* did not reach the target), {report['total_seconds']:.1f} s on {report['threads']} "
            f"threads, {report['seconds']['vstar']:.1f} s of it v*")


SPEED_ROWS = {"mote": "MoTE (the paper's ranks)", "global": "sparse Global ridge", "bcd": "efficient BCD",
              "global+speedup": "Global + speedup", "moeedit-bcd": "MoEEdit's BCD as published (extrapolated)",
              "floor": "floor: one dense add per layer"}


def solver_speed(report: dict) -> list[str]:
    """Per shape, each solver's solve + write-back seconds for the run's edits (its time over MoTE's) and peak extra
    memory; then the one-time cost per layer."""
    shapes = report["shapes"]
    first = next(iter(shapes.values()))
    lines = [f"{first['edits']} edits in batches of {first['per_batch']}, seconds (x MoTE's) and peak extra MiB:", "",
             "| method | " + " | ".join(f"{SHAPES.get(k, k)} ({s['shape']['layers']} layers)"
                                      for k, s in shapes.items()) + " |", "|---" * (len(shapes) + 1) + "|"]
    for method, label in SPEED_ROWS.items():
        cells = []
        for s in shapes.values():
            m, mote = s["methods"].get(method), s["methods"].get("mote")
            cells.append("-" if m is None else f"{m['seconds']:,.1f} ({m['seconds'] / mote['seconds']:.2f}x), "
                                               f"{m['peak_bytes'] / 2**20:.0f} MiB")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| one-time per layer: projectors + whitened HOSVD | " + " | ".join(
        f"{s['one_time_per_layer']['projectors']:.0f} + {s['one_time_per_layer']['hosvd_whitened']:.0f} s"
        for s in shapes.values()) + " |")
    return lines


def speed_summary(report: dict) -> str:
    """The README's sentence: MoTE, the sparse Global ridge and MoEEdit's BCD at each shape."""
    shapes = report["shapes"].values()
    secs = lambda m, fmt=".0f": " / ".join(f"{s['methods'][m]['seconds']:,{fmt}}" for s in shapes)  # noqa: E731
    ratio = lambda m: " / ".join(f"{s['methods'][m]['seconds'] / s['methods']['mote']['seconds']:.2f}"  # noqa: E731
                                 for s in shapes)
    return (f"{next(iter(shapes))['edits']} edits at the " + " / ".join(SHAPES.get(k, k) for k in report["shapes"])
            + f" layer shapes: MoTE {secs('mote', '.1f')} s, the sparse Global ridge {secs('global', '.1f')} s "
            f"({ratio('global')}x MoTE's time), MoEEdit's BCD as published {secs('moeedit-bcd')} s (extrapolated)")


def edit_memory_table(report: dict) -> list[str]:
    return edit_memory.table(report["results"])


def edit_memory_peaks(report: dict) -> str:
    """The README's words: each real YAML's estimated peak and the smallest GPU it fits."""
    results = report["results"]
    fits = [r["fits"][0] if r["fits"] else "none of the GPUs listed" for r in results]
    return (" / ".join(f"{r['peak'] / edit_memory.GIB:.1f}" for r in results) + " GiB for "
            + " / ".join(SHAPES.get(r["yaml"], r["yaml"]) for r in results) + ", "
            + (f"each within {fits[0]}" if len(set(fits)) == 1 else "within " + " / ".join(fits)))


def sequential_summary(report: dict) -> list[str]:
    """Per method, the first batch's efficacy at the first and the last measurement, and the rest at the last."""
    first = next(iter(report["runs"].values()))[0]["edits"]
    lines = [f"| method | first batch's efficacy (after {first} -> {report['edits']} edits) | specificity | unedited "
             f"facts retained | held-out perplexity (unedited {report['unedited']['perplexity']:.0f}) |",
             "|---|---|---|---|---|"]
    for name, curve in report["runs"].items():
        last = curve[-1]
        lines.append(f"| {name} | {curve[0]['first_batch_efficacy']:.2f} -> {last['first_batch_efficacy']:.2f} | "
                     f"{last['specificity']:.2f} | {last['retained_facts']:.2f} | {last['perplexity']:.0f} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# the blocks
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    files: tuple[str, ...]  # results files under benchmarks/results/, in the order `render` takes them
    render: Callable  # (*reports) -> list of table lines, or a string for inline text


BLOCKS = {
    "demo-seed1": Block(("demo-seed1.json",), demo_table),
    "side-by-side": Block(("side_by_side.json",), side_by_side_summary),
    "quality-headline": Block(("quality.json",), quality_headline),
    "quality-basis": Block(("quality.json",), quality_basis),
    "quality-whitening": Block(("quality.json",), quality_whitening),
    "quality-auto-ranks": Block(("quality.json",), auto_ranks),
    "quality-small-batch": Block(("quality-small-batch.json",), quality_headline),
    "reproduced-threshold": Block(("quality.json",), reproduced_threshold),
    "basis-example": Block(("quality.json",), basis_example),
    "traced-bands": Block(("quality.json",), traced_bands),
    "end-to-end": Block(("end_to_end.json",), end_to_end),
    "solver-speed": Block(("solver_speed.json",), solver_speed),
    "speed-summary": Block(("solver_speed.json",), speed_summary),
    "edit-memory": Block(("edit_memory.json",), edit_memory_table),
    "edit-memory-peaks": Block(("edit_memory.json",), edit_memory_peaks),
    "offload-memory": Block(("offload_memory.json",), offload_memory.table),
    "coverage-trend": Block(("coverage_trend.json",), coverage_trend.table),
    "sequential": Block(("sequential.json",), sequential_summary),
}


def provenance(report: dict) -> str:
    """How a results file was made, as far as it records it: command, date, commit, machine, torch, threads."""
    info = report.get("info", report)  # edit_memory.json keeps it under "info"
    if {"command", "date", "machine", "torch", "threads"} <= info.keys():
        made = run_line(info)
    else:
        made = ", ".join([f"`{info[k]}`" for k in ("command",) if k in info]
                         + [str(info[k]) for k in ("date", "machine") if k in info]
                         + [f"{k} {v}" for k, v in (report.get("versions") or {"torch": info.get("torch")}).items()
                            if v])
    missing = [k for k in ("command", "date", "commit", "machine") if not info.get(k)]
    return made + (f" ({', '.join(missing)} not recorded)" if missing else "")


def render(name: str, doc: Path, load: Callable[[str], dict]) -> str:
    """What goes between the markers of block `name` in `doc`, from the results files `load(file)` gives."""
    block = BLOCKS[name]
    reports = [load(f) for f in block.files]
    out = block.render(*reports)
    if isinstance(out, str):
        return out
    sources = "<br>".join(f"From [`{f}`]({os.path.relpath(RESULTS / f, doc.parent)}): {provenance(r)}."
                          for f, r in zip(block.files, reports))
    return "\n" + "\n".join(out) + f"\n\n<sub>{sources}</sub>\n"


def documents(root: Path = ROOT) -> list[Path]:
    return sorted(p for pattern in DOCS for p in root.glob(pattern))


def loader(results: Path = RESULTS) -> Callable[[str], dict]:
    cache: dict[str, dict] = {}

    def load(file: str) -> dict:
        if file not in cache:
            cache[file] = json.loads((results / file).read_text())
        return cache[file]

    return load


def rendered(text: str, doc: Path, load: Callable[[str], dict]) -> str:
    """`text` with every block rendered; a name not in BLOCKS raises, naming the document."""
    def replace(m: re.Match) -> str:
        if m["name"] not in BLOCKS:
            raise KeyError(f"{doc}: no rendered block {m['name']!r} (known: {', '.join(BLOCKS)})")
        return f"<!-- rendered: {m['name']} -->{render(m['name'], doc, load)}<!-- /rendered -->"

    return MARKER.sub(replace, text)


def stale(root: Path = ROOT, load: Callable[[str], dict] | None = None) -> list[str]:
    """"document: block" for every block that differs from what its results files give (or cannot be rendered)."""
    load = load or loader(root / "benchmarks" / "results")
    out = []
    for doc in documents(root):
        text = doc.read_text()
        for m in MARKER.finditer(text):
            try:
                fresh = render(m["name"], doc, load) if m["name"] in BLOCKS else None
            except (OSError, KeyError, ValueError) as e:
                fresh = f"cannot be rendered: {type(e).__name__}: {e}"
            if fresh != m["body"]:
                why = "unknown block" if fresh is None else fresh if fresh.startswith("cannot") else "stale"
                out.append(f"{doc.relative_to(root)}: {m['name']} ({why})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 listing the stale blocks")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        print("\n".join(problems) or "every rendered block matches its results files")
        return 1 if problems else 0
    load = loader()
    for doc in documents():
        text = doc.read_text()
        new = rendered(text, doc, load)
        if new != text:
            doc.write_text(new)
            print(f"rendered {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
