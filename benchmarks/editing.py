"""One batch of N CounterFact edits on each default fact model with its testbed YAML: the paper's metrics before and
after, and the wall time per stage. Writes benchmarks/results/editing.md.

    python benchmarks/editing.py [--arch qwen3_moe gpt_oss qwen3_5_moe] [--n 50]

The fact models are built first when their cache is missing (python benchmarks/testbed.py builds all three).
Statistics are computed once per model and layer (a fresh stats directory per run, so their cost is measured).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from pathlib import Path

import torch

from mote_plugin import MoTEHyperParams, apply_mote_to_model, last_timings
from mote_plugin.metrics import counterfact_metrics
from mote_plugin.testbed import ARCHS, BuildOptions, build, load
from mote_plugin.testbed.__main__ import DEFAULT_OUT

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "editing.md"
METRICS = ("efficacy", "generalization", "specificity", "utility")
STAGES = ("statistics", "vstar", "capture", "solve", "writeback")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="*", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for arch in args.arch:
        opts = BuildOptions(arch=arch)
        out = DEFAULT_OUT.format(arch=arch, facts=opts.facts)
        build(out, opts)
        model, tok, facts, report = load(out)
        hp = MoTEHyperParams.from_hparams(str(ROOT / "hparams" / "MoTE" / f"testbed-{arch}"))
        if (hp.fact_token, hp.layers) != (report["lookup_token"], report["edit_layers"]):
            raise SystemExit(f"testbed-{arch}.yaml edits {hp.fact_token} at {hp.layers}, but the build's tracing report "
                             f"selects {report['lookup_token']} at {report['edit_layers']}: update the YAML")
        records = [f for f in facts if f["known"]][: args.n]
        requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
        before = counterfact_metrics(model, tok, records)
        with tempfile.TemporaryDirectory() as stats_dir:
            hp.stats_dir = stats_dir
            apply_mote_to_model(model, tok, requests, hp)
        after = counterfact_metrics(model, tok, records)
        rows.append((arch, len(records), hp, before, after, last_timings(model)))
        print(arch, {k: (round(before[k], 3), round(after[k], 3)) for k in METRICS}, last_timings(model))

    lines = ["# One batch of CounterFact edits on the default fact models", "",
             f"`python benchmarks/editing.py --n {args.n}`; {datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Metrics: unedited -> edited (method.md section 8).", "",
             "| model | edits | YAML layers / token | " + " | ".join(METRICS) + " | " + " | ".join(f"{s} (s)" for s in STAGES) + " |",
             "|---|---|---|" + "---|" * (len(METRICS) + len(STAGES))]
    for arch, n, hp, before, after, t in rows:
        lines.append(f"| {arch} | {n} | {hp.layers} / {hp.fact_token} | " + " | ".join(f"{before[k]:.2f} -> {after[k]:.2f}" for k in METRICS)
                     + " | " + " | ".join(f"{t[s]:.2f}" for s in STAGES) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
