"""One batch of N CounterFact edits on each default fact model with its testbed YAML: the paper's metrics before and
after, and the wall time per stage. Writes benchmarks/results/editing.md.

    python benchmarks/editing.py [--arch qwen3_moe gpt_oss qwen3_5_moe] [--n 50]
    python benchmarks/editing.py --build DIR [--offset 50] [--set layers=[1,2,3]] [--sweep v_weight_decay=0.5,3,6] \
        --out F
    python benchmarks/editing.py --build DIR --n 20 --set spread=core --sweep nullspace_threshold=0.1,1e-4 \
        --preservation

The fact models are built first when their cache is missing (python benchmarks/testbed.py builds all three).
Statistics are computed once per model and layer (a fresh stats directory per run, so their cost is measured).
`--build` measures an existing build instead (e.g. one made with `mote-testbed build --no-subject-tokens`), with the
testbed YAML of its architecture; `--set KEY=VALUE` overrides a YAML key (read as YAML), `--sweep KEY=V1,V2,...`
runs the batch once per value on the same facts (the weights restored in between), `--offset` skips known facts.
`--preservation` adds what the null-space test measures (`mote_plugin.metrics.preservation_change`): the output change
of the last edited layer's experts on the first 64 lines of the shipped corpus (up to 64 tokens each; the statistics'
own text) over the change at the edit keys, as a mean and at the 90th / 99th percentile of the tokens.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from mote_plugin import MoTEHyperParams, apply_mote_to_model, last_timings
from mote_plugin.cli import key_value
from mote_plugin.metrics import counterfact_metrics, preservation_change
from mote_plugin.mote.model.stats import corpus_texts
from mote_plugin.testbed import ARCHS, BuildOptions, build, load
from mote_plugin.testbed.__main__ import DEFAULT_OUT

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "editing.md"
METRICS = ("efficacy", "generalization", "specificity", "utility")
STAGES = ("statistics", "vstar", "capture", "solve", "writeback")


def sweep(text: str) -> tuple[str, list]:
    """"v_weight_decay=0.5,3,6" -> ("v_weight_decay", [0.5, 3, 6])."""
    key, value = key_value(text)
    values = value if isinstance(value, list) else [yaml.safe_load(v) for v in str(value).split(",")]
    return key, values


def runs(args) -> list[tuple[str, dict]]:
    """(build directory, YAML changes) for every batch to measure."""
    changes = dict(args.set)
    if args.build:
        dirs = [args.build]
    else:
        dirs = []
        for arch in args.arch:
            opts = BuildOptions(arch=arch)
            out = DEFAULT_OUT.format(arch=arch, facts=opts.facts)
            build(out, opts)
            dirs.append(out)
    if args.sweep is None:
        return [(d, changes) for d in dirs]
    key, values = args.sweep
    return [(d, changes | {key: v}) for d in dirs for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="*", default=list(ARCHS), choices=ARCHS,
                        help="default builds to measure (not with --build)")
    parser.add_argument("--build", help="an existing fact-model build directory (instead of the default builds)")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--offset", type=int, default=0, help="known facts skipped before the batch")
    parser.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sweep", type=sweep, metavar="KEY=V1,V2,...")
    parser.add_argument("--preservation", action="store_true", help="also measure the output change on preserved text")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for out, changes in runs(args):
        model, tok, facts, report = load(out)
        hp = MoTEHyperParams.from_hparams(str(ROOT / "hparams" / "MoTE" / f"testbed-{report['arch']}"))
        hp = hp.updated("--set/--sweep", **changes)
        chosen = {"fact_token", "layers"} & set(changes)
        if not chosen and (hp.fact_token, hp.layers) != (report["lookup_token"], report["edit_layers"]):
            raise SystemExit(f"testbed-{report['arch']}.yaml edits {hp.fact_token} at {hp.layers}, but the build's "
                             f"tracing report selects {report['lookup_token']} at {report['edit_layers']}: update the "
                             f"YAML (or choose them with --set)")
        records = [f for f in facts if f["known"]][args.offset: args.offset + args.n]
        if not records:
            raise SystemExit(f"{out}: no known facts after the first {args.offset}")
        requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
        before = counterfact_metrics(model, tok, records)
        originals = {}
        with tempfile.TemporaryDirectory() as stats_dir:
            hp.stats_dir = stats_dir
            # noqa: E731
            edit = lambda: originals.update(apply_mote_to_model(model, tok, requests, hp, return_orig_weights=True)[1])
            if args.preservation:
                preserved = preservation_change(model, tok, max(hp.layers), requests, hp.fact_token, edit,
                                                list(corpus_texts(None))[:64])
            else:
                edit()
                preserved = None
        after = counterfact_metrics(model, tok, records)
        rows.append((report["arch"], len(records), hp, changes, before, after, last_timings(model), preserved))
        print(report["arch"], changes, {k: (round(before[k], 3), round(after[k], 3)) for k in METRICS},
              last_timings(model),
              preserved or "")
        with torch.no_grad():  # the next run of a sweep starts from the same weights
            for name, w in originals.items():
                model.get_parameter(name).copy_(w)

    command = shlex.join(["python", "benchmarks/editing.py", *sys.argv[1:]])
    lines = ["# One batch of CounterFact edits on the fact models", "",
             f"`{command}`; {datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Metrics: unedited -> edited "
             "(mote_plugin/metrics.py, the paper's Appendix A).", "",
             "| model | edits | YAML layers / token | changes | " + " | ".join(METRICS) + " | "
             + " | ".join(f"{s} (s)" for s in STAGES) + " |"
             + " preserved / edit change: mean | p90 | p99 |" * args.preservation,
             "|---|---|---|---|" + "---|" * (len(METRICS) + len(STAGES) + 3 * args.preservation)]
    for arch, n, hp, changes, before, after, t, preserved in rows:
        shown = ", ".join(f"{k}={v}" for k, v in changes.items() if k not in ("layers", "fact_token")) or "-"
        lines.append(f"| {arch} | {n} | {hp.layers} / {hp.fact_token} | {shown} | "
                     + " | ".join(f"{before[k]:.2f} -> {after[k]:.2f}" for k in METRICS)
                     + " | " + " | ".join(f"{t[s]:.2f}" for s in STAGES) + " |"
                     + (f" {preserved['ratio']:.2%} | {preserved['p90']:.2%} | {preserved['p99']:.2%} |"
                        if preserved else ""))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
