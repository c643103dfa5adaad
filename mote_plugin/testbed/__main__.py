"""`python -m mote_plugin.testbed build ...` (also the `mote-testbed` console script)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .build import BuildOptions, build
from .data import DataError
from .model import ARCHS, ModelSize
from .train import TrainConfig

DEFAULT_OUT = ".cache/mote-testbed/{arch}-{facts}"


def format_report(r: dict) -> str:
    lines = [f"# {r['arch']} fact model: {r['n_facts']} edit facts + {r['n_unedited_facts']} unedited (neighbour and "
             f"support) facts + {r.get('n_profile_facts', 0)} profile facts, "
             f"{r['params'] / 1e6:.2f} M parameters, built in {r['build_seconds']:.0f} s"]
    lines += ["", "| prompts | n | top-1 true | P(true) > P(new) | majority baseline |", "|---|---|---|---|---|"]
    for key, row in r["knowledge"].items():
        if row.get("n"):
            ptn = f"{row['p_true_gt_new']:.3f}" if "p_true_gt_new" in row else "-"
            lines.append(f"| {key} | {row['n']} | {row['top1']:.3f} | {ptn} | {row['majority']:.3f} |")
    t = r["tracing"]
    if t is None:
        lines += ["", "The model knows none of its facts yet: no tracing or v* probe (train longer)."]
        return "\n".join(lines + _zsre_lines(r.get("zsre")))
    lines += ["",
              f"Causal tracing over {t['n']} known facts (P(true) clean {t['clean']:.3f}, subject corrupted "
              f"{t['corrupt']:.3f}); share of the gap recovered by restoring one token's hidden state after layer l:",
              "",
              "| token | " + " | ".join(f"L{l}" for l in range(len(t["last"]))) + " |",
              "|---|" + "---|" * len(t["last"])]
    for token in ("subject_last", "last"):
        lines.append(f"| {token} | " + " | ".join(f"{v:.2f}" for v in t[token]) + " |")
    lines += ["", "v* probe (a delta at the lookup token of one layer, 20 known facts):", "",
              "| lookup token | band (recovery >= threshold) | layer | flipped to target_new | carried to held-out "
              "phrasing | |delta|/|h| |",
              "|---|---|---|---|---|---|"]
    for token, e in r["editability"].items():
        lines.append(f"| {token} | {e['band'] or 'none'} | {e['layer']} | {e['flipped']:.2f} | "
                     f"{e['heldout_carried']:.2f} | {e['delta_norm_ratio']:.2f} |")
    lines += ["", f"Lookup token for editing this model: {r['lookup_token'] or 'NONE (no token passes the gates)'}; "
              f"edit layers: {r['edit_layers']}"]
    return "\n".join(lines + _zsre_lines(r.get("zsre")))


def _zsre_lines(z: dict | None) -> list[str]:
    if not z:
        return []
    lines = ["", f"zsRE: {z['n_facts']} edit facts ({z['known_share']:.2f} known) + {z['n_unedited_facts']} unedited "
                 "(neighbour and support) facts", "", "| questions | n | top-1 taught answer |", "|---|---|---|"]
    lines += [f"| {key} | {row['n']} | {row['top1']:.3f} |" for key, row in z["knowledge"].items() if row.get("n")]
    if "unedited" in z:
        u = z["unedited"]
        lines += ["", f"Unedited model on its known zsRE facts (token accuracy): efficacy {u['efficacy']:.3f}, "
                      f"generalization {u['generalization']:.3f}, specificity {u['specificity']:.3f}"]
    return lines


# what each option of `build` means (ModelSize, TrainConfig and BuildOptions fields; the defaults are added)
HELP = {
    # BuildOptions
    "skip_facts": "edit facts skip+1 .. skip+facts of the data's selection, none of them in a smaller build's facts "
                  "(zsRE facts likewise)",
    "seed": "seed of the fact selection, templates, tokenizer and training",
    "vocab_size": "size of the BPE vocabulary trained for the model",
    "corpus_chars": "characters of WikiText text mixed into training and used for the tokenizer",
    "threads": "torch CPU threads while building (part of the cache key: another count builds anew)",
    "probe_facts": "known facts used for causal tracing and the v* probe of the report",
    "zsre_facts": "zsRE questions taught beside the CounterFact facts, with a neighbour question and a support "
                  "statement each, read from the --zsre-data file (0 = none)",
    "profile_facts": "extra fictional facts per subject, so a subject is more than one fact (0 = off)",
    # ModelSize
    "d_model": "hidden size of the residual stream",
    "layers": "decoder layers",
    "heads": "attention heads (key/value heads too)",
    "experts": "routed experts per MoE layer",
    "top_k": "experts each token is routed to",
    "expert_hidden": "intermediate size of one expert",
    "max_positions": "longest sequence in tokens",
    # TrainConfig
    "epochs": "passes over the facts",
    "statements_per_fact": "statements of each fact per epoch, under random templates",
    "text_share": "share of training sequences that are WikiText windows",
    "prefix_prob": "chance a fact statement follows a WikiText snippet (as CounterFact's paraphrases do)",
    "batch_size": "sequences per optimiser step",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear learning-rate warm-up steps",
    "text_window": "tokens per WikiText window",
    "router_aux_loss_coef": "weight of the routers' load-balancing loss",
    "subject_readout_layer": "below this decoder layer, tokens after the subject may not attend to it in training "
                             "statements (-1: half the layers; 0: off), so facts are stored at the subject",
    "subject_readout_last_only": "from that layer on, they may read only the subject's last token",
    "subject_readout_share": "share of fact statements trained under those attention masks",
    "length_grouped": "batch sequences of similar length (less padding; the quality, demo and test builds use it)",
}


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, dest=f.name,
                                help=HELP[f.name])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, dest=f.name,
                                help=f"{HELP[f.name]} (default {f.default})")


def parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="mote-testbed",
                                     description="Build the fact model: a small MoE LM that knows real CounterFact "
                                                 "facts.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (mote-plugin)")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train (or reuse) a fact model and print its knowledge and tracing report")
    b.add_argument("--arch", choices=ARCHS, default="qwen3_moe", help="MoE family of the model (default qwen3_moe)")
    b.add_argument("--facts", type=int, default=BuildOptions.facts,
                   help=f"edit facts (CounterFact records) (default {BuildOptions.facts})")
    b.add_argument("--data", default=None,
                   help="a folder laid out like shared/data (counterfact/*.json, corpus/*.txt); default: the data "
                        "shipped with the package")
    b.add_argument("--out", default=None, help=f"cache directory (default {DEFAULT_OUT})")
    b.add_argument("--zsre-data", default=None, metavar="PATH",
                   help="the zsRE file --zsre-facts reads, required with it: a MEND/MEMIT-format zsRE JSON (subject, "
                        "src, rephrase, alt, answers, loc, loc_ans), e.g. MEMIT's zsre_mem_eval.json or EasyEdit's "
                        "zsre_mem.json; zsRE is not shipped with the package (its licence is unknown)")
    for name in ("skip_facts", "zsre_facts", "seed", "vocab_size", "corpus_chars", "threads", "probe_facts",
                 "profile_facts"):
        default = getattr(BuildOptions, name)
        b.add_argument("--" + name.replace("_", "-"), type=int, default=default, dest=name,
                       help=f"{HELP[name]} (default {default})")
    b.add_argument("--subject-tokens", action=argparse.BooleanOptionalAction, default=BuildOptions.subject_tokens,
                   help="train the tokenizer on the subjects' names too, so each gets tokens of its own (default; "
                        "--no-subject-tokens splits names into shared word pieces, as the quality, demo and test "
                        "builds do: docs/testbed.md)")
    _add_dataclass_args(b, ModelSize)
    _add_dataclass_args(b, TrainConfig, skip=("seed",))
    b.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser_ = parser()
    args = parser_.parse_args(argv)
    if args.arch not in ARCHS:  # argparse already refuses; kept for programmatic calls
        parser_.error(f"unknown --arch {args.arch}")
    opts = BuildOptions(
        arch=args.arch, facts=args.facts, skip_facts=args.skip_facts, zsre_facts=args.zsre_facts,
        zsre_data=args.zsre_data, seed=args.seed,
        vocab_size=args.vocab_size,
        corpus_chars=args.corpus_chars,
        threads=args.threads, probe_facts=args.probe_facts, profile_facts=args.profile_facts,
        subject_tokens=args.subject_tokens,
        size=ModelSize(**{f.name: getattr(args, f.name) for f in fields(ModelSize)}),
        train=TrainConfig(seed=args.seed,
                          **{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "seed"}),
    )
    if args.data:
        opts.data = args.data
    out = args.out or DEFAULT_OUT.format(arch=args.arch, facts=args.facts)
    try:
        report = build(out, opts, log=lambda m: print(m, file=sys.stderr))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
