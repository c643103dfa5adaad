"""Does the weights' Tucker basis carry more of an edit as a model learns, or in a wider model?

    python benchmarks/coverage_trend.py            # both builds, ~40 min on 2 CPU cores
    python benchmarks/coverage_trend.py --wide-d 0            # the checkpoints only (results are merged per build)
    python benchmarks/coverage_trend.py --epochs --wide-d 256  # the final d = 128 model and the wider build

One build of the demo recipe (qwen3_moe, facts 201-256 of the shipped data, names in shared word pieces, three profile
facts per subject, 60 epochs) with its weights kept after the given epochs, and one wider build of the same recipe
(d_model and expert hidden both `--wide-d`). For every model: the first batch of (at most) 50 facts the final build
knows, edited at the final build's edit band as the quality protocol's MoTE-residual row edits (the paper's basis at
Qwen3-30B-A3B's ranks in the same ratios to the model's shape, residual spread, that row's dev-chosen settings):

  coverage   the basis phase of benchmarks/quality.py at the last edited layer: the shares of the residuals in U_out,
             of the gated projected keys in U_in, of the gate vectors in U_e, and the share of each residual the solved
             update reproduces, for the weights' basis and, as a reference, what a random subspace of the same rank
             holds on average (r / n)
  quality    MoTE's efficacy / generalization / specificity after editing the batch (and the unedited model's)

Results: benchmarks/results/coverage_trend.{json,md}. No setting is chosen here: the YAML's were chosen on the quality
protocol's dev split (other facts, another build).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

import torch

from mote_plugin import MoTEEditor, MoTEHyperParams, apply_mote_to_model, last_edited
from mote_plugin.adapters import get_adapter
from mote_plugin.experiments.results import run_info, run_line, write_results
from mote_plugin.metrics import counterfact_metrics
from mote_plugin.testbed import BuildOptions, build, load
from mote_plugin.testbed.model import ModelSize
from quality import batch_coverage, load_config, ratio_ranks, request

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
RESULTS = Path(__file__).resolve().parent / "results" / "coverage_trend"
RECIPE = {"arch": "qwen3_moe", "facts": 56, "skip_facts": 200, "subject_tokens": False, "profile_facts": 3,
          "probe_facts": 10, "train": {"epochs": 60, "length_grouped": True}}
YAML = ROOT / "hparams" / "MoTE" / "testbed-qwen3_moe"
QUALITY = ROOT / "benchmarks" / "results" / "quality.json"
METRICS = ("efficacy", "generalization", "specificity")


def settings(report: dict, shape: tuple[int, int, int]) -> MoTEHyperParams:
    """The quality protocol's MoTE-residual row at the build's edit band and lookup token: the testbed YAML with the
    paper's basis at Qwen3-30B-A3B's ranks in the same ratios to `shape` (E, d, h), the residual spread and the
    settings that row chose on the quality dev split."""
    cfg = load_config(ROOT / "benchmarks" / "configs" / "quality.yaml")
    chosen = json.loads(QUALITY.read_text())["archs"]["qwen3_moe"]["tune"]["MoTE-residual"]["chosen"]
    r_e, r_out, r_in = ratio_ranks(cfg["real_ranks"]["qwen3_moe"], shape)
    hp = MoTEHyperParams.from_hparams(YAML)
    return hp.updated("coverage_trend", **{k: v for k, v in chosen.items() if k != "layers"}, basis="weights",
                      spread="residual", layers=report["edit_layers"], fact_token=report["lookup_token"], r_e=r_e,
                      r_out=r_out, r_in=r_in, stats_dir=str(CACHE / "mote-stats"))


def measure(model, tok, records: list[dict], hp: MoTEHyperParams, shape: tuple[int, int, int]) -> dict:
    """Coverage of the batch in the weights' basis, then MoTE's edit of it and the metrics (the model is restored)."""
    cov = batch_coverage(model, tok, [request(r) for r in records], {"weights": hp})["weights"]
    random = dict(zip(("gates_in_U_e", "residual_in_U_out", "keys_in_U_in"),
                      (r / n for r, n in zip(cov["ranks"], shape))))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unedited = counterfact_metrics(model, tok, records)
    try:
        apply_mote_to_model(model, tok, [request(r) for r in records], hp)
        written = last_edited(model)  # requests whose v* reached its target
        edited = counterfact_metrics(model, tok, records)
    finally:
        model.load_state_dict(before)
        MoTEEditor(model).reset()
    return {"coverage": cov, "random_subspace": random, "unedited": {k: unedited[k] for k in METRICS},
            "MoTE": {k: edited[k] for k in METRICS} | {"edited": written}}


def run_build(name: str, opts: BuildOptions, epochs: list[int], log) -> dict:
    """Build (checkpoints kept in memory at `epochs`) and measure the final model and every checkpoint."""
    checkpoints = {}

    def keep(epoch, model):
        if epoch in epochs:
            checkpoints[epoch] = copy.deepcopy(model.state_dict())

    out = CACHE / "mote-testbed" / f"trend-{name}"
    report = build(out, opts, on_epoch=keep)
    if set(epochs) - set(checkpoints) - {opts.train.epochs}:
        raise SystemExit(f"{out} was built earlier without its checkpoints: remove it and run again")
    model, tok, facts, report = load(out)
    adapter = get_adapter(model)
    shape = tuple(adapter.down_weight(adapter.moe_block(model, report["edit_layers"][-1]), dtype=None).shape)
    records = [f for f in facts if f["known"]][:50]
    hp = settings(report, shape)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    rows = {}
    for epoch in sorted(set(epochs) | {opts.train.epochs}):
        model.load_state_dict(checkpoints.get(epoch, final))
        MoTEEditor(model).reset()
        rows[str(epoch)] = measure(model, tok, records, hp, shape)
        c = rows[str(epoch)]
        log(f"[{name}] epoch {epoch}: " + ", ".join(f"{k} {v['mean']:.2f}" for k, v in c["coverage"].items()
                                                    if isinstance(v, dict)) + f"; MoTE {c['MoTE']}")
    return {"shape": list(shape), "ranks": [hp.r_e, hp.r_out, hp.r_in], "edit_layers": report["edit_layers"],
            "facts": len(records), "epochs": rows}


def markdown(report: dict) -> str:
    return "\n".join(["# Coverage of the weights' basis across training and width", "",
                      f"{run_line(report)}. Demo recipe (qwen3_moe, facts 201-256); the first <= 50 facts the final "
                      "build knows, one batch, edited as quality.md's MoTE-residual row (the paper's basis at the real "
                      "ranks' ratios). Shares: mean over the batch (smallest); `random` is what a random subspace of "
                      "the same rank holds on average (r / n).", "", *table(report)]) + "\n"


def table(report: dict) -> list[str]:
    """Per build and epoch: what the basis holds of the batch, the update reproduces, and the metrics (edited)."""
    lines = ["| build | epoch | (E, d, h), ranks | residual in U_out (random) | keys in U_in (random) | gates in U_e "
             "(random) | reproduced | unedited eff / gen / spec | MoTE eff / gen / spec (edited) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, b in report["builds"].items():
        for epoch, row in sorted(b["epochs"].items(), key=lambda item: int(item[0])):
            c, rnd = row["coverage"], row["random_subspace"]
            cells = [f"{c[k]['mean']:.2f} ({c[k]['min']:.2f}) ({rnd[k]:.2f})"
                     for k in ("residual_in_U_out", "keys_in_U_in", "gates_in_U_e")]
            lines.append(f"| {name} | {epoch} | {tuple(b['shape'])}, {tuple(b['ranks'])} | " + " | ".join(cells)
                         + f" | {c['reproduced']['mean']:.2f} | "
                         + " / ".join(f"{row['unedited'][k]:.2f}" for k in METRICS) + " | "
                         + " / ".join(f"{row['MoTE'][k]:.2f}" for k in METRICS)
                         + f" ({row['MoTE'].get('edited', '-')}/{b['facts']}) |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="*", default=[5, 15, 30, 60],
                        help="checkpoints of the d = 128 build")
    parser.add_argument("--wide-d", type=int, default=256,
                        help="d_model and expert hidden of the wider build (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"builds": {}}
    report |= run_info(shlex.join(["python", "benchmarks/coverage_trend.py", *(argv or sys.argv[1:])]))
    log = lambda m: print(m, flush=True)  # noqa: E731
    base = BuildOptions.from_dict(RECIPE | {"threads": args.threads})
    builds = {"d128": (base, args.epochs)}
    if args.wide_d:
        wide = copy.deepcopy(base)
        wide.size = ModelSize(d_model=args.wide_d, expert_hidden=args.wide_d)
        builds[f"d{args.wide_d}"] = (wide, [])
    for name, (opts, epochs) in builds.items():
        measured = run_build(name, opts, epochs, log)
        # a build measured again keeps the checkpoints measured before
        report["builds"][name] = measured | {"epochs": report["builds"].get(name, {}).get("epochs", {})
                                             | measured["epochs"]}
        write_results(out, report, markdown(report))  # after every build: a long run keeps its parts
    print(markdown(report))


if __name__ == "__main__":
    main()
