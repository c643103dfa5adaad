"""Sequential editing at scale: thousands of CounterFact edits in batches on the Qwen3-MoE fact model.

    python benchmarks/sequential.py                      # 2000 edits in batches of 50: MoTE memory on/off, MoEEdit-BCD
    python benchmarks/sequential.py --edits 500 --method MoTE+memory

The first batch is 50 facts the fact model knows (so that their neighbourhood prompts are facts it knows too); the
rest are CounterFact records from `--counterfact` (EasyEdit's flat file; not shipped with the package) whose
subjects the fact model never saw. v* of every edit is computed once on the unedited model and cached (the paper's
and MoEEdit's protocol); each run starts from the same unedited weights. After every `--every` batches:

    first-batch efficacy   P(new) > P(true) on the first batch's rewrite prompts (does the run forget early edits?)
    specificity            P(true) > P(new) on the first batch's neighbourhood prompts
    retained facts         P(true) > P(new) on 100 known facts never edited (does the model keep its knowledge?)
    perplexity             on a held-out WikiText slice (not the preservation text)

Results: benchmarks/results/sequential.{json,md,png}.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from mote_plugin import MoTEEditor, MoTEHyperParams, apply_mote_to_model
from mote_plugin.experiments.results import run_info, run_line, write_results
from mote_plugin.metrics import counterfact_metrics
from mote_plugin.mote.editor import request_key
from mote_plugin.testbed import BuildOptions, build, load
from mote_plugin.testbed.__main__ import DEFAULT_OUT
from mote_plugin.testbed.data import edit_records

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SHARED = ROOT.parent / "shared" / "data"
METHODS = {
    "MoTE+memory": {"spread": "core", "sequential_memory": True},
    "MoTE": {"spread": "core", "sequential_memory": False},
    "MoEEdit-BCD": {"solver": "bcd", "spread": "layerwise", "bcd_passes": 4, "lambda_growth": 1e-3},
}


def records_and_kept(facts: list[dict], counterfact: Path, n: int, first: int) -> tuple[list[dict], list[dict]]:
    """(n edit records: `first` known facts, then CounterFact records on other subjects; 100 known facts kept aside)."""
    known = [f for f in facts if f["known"]]
    if first + 100 > len(known):
        raise ValueError(f"the fact model knows {len(known)} facts; need {first} for the first batch and 100 kept "
                         "aside")
    return edit_records(facts, n, first, counterfact, one_per_subject=False), known[first : first + 100]


def perplexity(model, tok, text: str, window: int = 128) -> float:
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def measure(model, tok, first_batch: list[dict], kept: list[dict], text: str) -> dict:
    first = counterfact_metrics(model, tok, first_batch)
    retained = counterfact_metrics(model, tok, kept)  # efficacy here = P(counterfactual) > P(true) on unedited facts
    weights_finite = all(torch.isfinite(p).all() for p in model.parameters())
    return {"first_batch_efficacy": first["efficacy"], "specificity": first["specificity"],
            "retained_facts": 1.0 - retained["efficacy"], "perplexity": perplexity(model, tok, text),
            "finite": bool(weights_finite)}


def run(model, tok, records, kept, text, hp, z, batch_size, every, log) -> list[dict]:
    original = {k: v.clone() for k, v in model.state_dict().items()}
    editor = MoTEEditor(model)
    editor.reset()
    editor.record_history = False  # no edit-patch history over thousands of edits
    first = records[:batch_size]
    curve, seconds = [], 0.0
    n_batches = len(records) // batch_size
    for b in range(n_batches):
        batch = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]}
                 for r in records[b * batch_size : (b + 1) * batch_size]]
        t = time.perf_counter()
        apply_mote_to_model(model, tok, batch, hp, precomputed_targets=z)
        seconds += time.perf_counter() - t
        if (b + 1) % every == 0 or b + 1 == n_batches:
            point = {"edits": (b + 1) * batch_size, "edit_seconds": seconds} | measure(model, tok, first, kept, text)
            curve.append(point)
            log("   " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items()))
    model.load_state_dict(original)
    MoTEEditor(model).reset()
    return curve


def plot(report: dict, plt):
    """sequential.png: each measure against the number of edits, one curve per method."""
    keys = ("first_batch_efficacy", "specificity", "retained_facts", "perplexity")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        for name, curve in report["runs"].items():
            ax.plot([p["edits"] for p in curve], [p[key] for p in curve], marker=".", label=name)
        ax.axhline(report["unedited"][key], color="grey", linestyle=":", label="unedited")
        ax.set_xlabel("edits")
        ax.set_title(key.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def markdown(report: dict) -> str:
    keys = ("first_batch_efficacy", "specificity", "retained_facts", "perplexity")
    lines = ["# Sequential editing at scale (Qwen3-MoE fact model)", "",
             f"{run_line(report)}. {report['edits']} edits in batches of {report['batch_size']}; v* "
             f"precomputed on the unedited model ({report['vstar_seconds']:.0f} s for all). Curves: sequential.png.",
             "",
             "| method | edits | " + " | ".join(keys) + " | edit time (s) | finite |",
             "|---|---|" + "---|" * (len(keys) + 2)]
    u = report["unedited"]
    lines.append("| unedited | 0 | " + " | ".join(f"{u[k]:.3f}" for k in keys) + " | 0 | True |")
    for name, curve in report["runs"].items():
        for p in curve:
            lines.append(f"| {name} | {p['edits']} | " + " | ".join(f"{p[k]:.3f}" for k in keys)
                         + f" | {p['edit_seconds']:.1f} | {p['finite']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--every", type=int, default=4, help="measure after every this many batches")
    parser.add_argument("--method", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--counterfact", default=str(SHARED / "counterfact" / "counterfact-train.json"))
    parser.add_argument("--heldout-text", default=str(SHARED / "corpus" / "wikitext-2-raw-test.txt"))
    parser.add_argument("--out", default=str(RESULTS / "sequential"))
    args = parser.parse_args(argv)
    if args.edits < args.batch_size:
        parser.error("--edits must be >= --batch-size")
    torch.set_num_threads(2)
    opts = BuildOptions(arch="qwen3_moe")
    out_dir = DEFAULT_OUT.format(arch="qwen3_moe", facts=opts.facts)
    build(out_dir, opts)
    model, tok, facts, _ = load(out_dir)
    records, kept = records_and_kept(facts, Path(args.counterfact), args.edits, args.batch_size)
    text = Path(args.heldout_text).read_text()[-30000:]  # the end of the file: never in the preservation statistics
    hp = MoTEHyperParams.from_hparams(ROOT / "hparams" / "MoTE" / "testbed-qwen3_moe")
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
    cached = MoTEHyperParams(**(hp.to_dict() | {"vstar_cache_dir": str(ROOT / ".cache" / "mote-vstar")}))
    t = time.perf_counter()
    z, nll = MoTEEditor(model, tok, cached).targets(requests)
    report = run_info("python benchmarks/sequential.py" + (f" --edits {args.edits}" if args.edits != 2000 else ""))
    report |= {"edits": len(records),
              "batch_size": args.batch_size, "vstar_seconds": time.perf_counter() - t,
              "unedited": measure(model, tok, records[: args.batch_size], kept, text), "runs": {}}
    z = {request_key(r): (z[i], float(nll[i])) for i, r in enumerate(requests)}
    for name in args.method:
        print(f"[{name}]")
        report["runs"][name] = run(model, tok, records, kept, text, MoTEHyperParams(**(hp.to_dict() | METHODS[name])),
                                   z,
                                   args.batch_size, args.every, print)
    write_results(args.out, report, markdown(report), {"": lambda plt: plot(report, plt)})
    print(markdown(report))


if __name__ == "__main__":
    main()
