"""Edit N CounterFact facts of the fact model with MoTE and print the CounterFact metrics before and after.

    python examples/edit_fact_model.py [--arch qwen3_moe] [--n 50] [--hparams hparams/MoTE/testbed-qwen3_moe.yaml]

The fact model is the demo's recipe (examples/configs/compare-testbed-qwen3_moe.yaml: 56 facts, names split into
shared word pieces, three profile facts per subject) for the chosen family, built first if its cache is missing (most
of README command 1's time). The YAML's settings were chosen on the quality protocol's dev split, on other facts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from mote_plugin import MoTEHyperParams, apply_mote_to_model
from mote_plugin.metrics import counterfact_metrics
from mote_plugin.testbed import ARCHS, BuildOptions, build, load

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "compare-testbed-qwen3_moe.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default="qwen3_moe")
    parser.add_argument("--n", type=int, default=50, help="facts edited in one batch")
    parser.add_argument("--hparams", default=None, help="MoTE YAML (default: hparams/MoTE/testbed-<arch>.yaml)")
    args = parser.parse_args()

    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    opts = BuildOptions.from_dict(demo["build"] | {"arch": args.arch})
    out = demo["model"].replace("qwen3_moe", args.arch)  # .cache/mote-testbed/<arch>-56-demo
    build(out, opts)
    model, tok, facts, _ = load(out)
    hp = MoTEHyperParams.from_hparams(args.hparams or f"hparams/MoTE/testbed-{args.arch}")
    hp.model_name = f"{out}/model"
    records = [f for f in facts if f["known"]][: args.n]
    if len(records) < args.n:
        raise SystemExit(f"the fact model knows only {len(records)} facts; use --n {len(records)} or a larger build")

    before = counterfact_metrics(model, tok, records)
    start = time.time()
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
    apply_mote_to_model(model, tok, requests, hp)
    seconds = time.time() - start
    after = counterfact_metrics(model, tok, records)

    print(f"\nMoTE, {len(records)} CounterFact edits in one batch on the {args.arch} fact model ({seconds:.1f} s)\n")
    print("| | efficacy | generalization | specificity | utility |\n|---|---|---|---|---|")
    for name, m in (("unedited", before), ("MoTE", after)):
        print(f"| {name} | {m['efficacy']:.3f} | {m['generalization']:.3f} | {m['specificity']:.3f} | "
              f"{m['utility']:.3f} |")


if __name__ == "__main__":
    main()
