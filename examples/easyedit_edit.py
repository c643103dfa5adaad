"""An EasyEdit script that selects MoTE by its YAML, the way EasyEdit's own examples select ROME or MEMIT.

    PYTHONPATH=/path/to/EasyEdit python examples/easyedit_edit.py --hparams hparams/MoTE/testbed-qwen3_moe \\
        [--mode edit|sequential|batch] [--n 10] [--batch-size N]

Records are the fact model's known CounterFact facts (EasyEdit's flat fields) from the build that holds the YAML's
`model_name` (`.cache/mote-testbed/<arch>-200/model`, built by `mote-testbed build --arch <arch>`), or `--data` (a flat
EasyEdit CounterFact JSON). `edit` restores the weights after each request, `sequential` keeps them (both run the YAML
as it is: its batch_size is 1, as EasyEdit's edit() requires), `batch` edits --batch-size requests per call (default:
all of them in one call), keeping the edits. Prints EasyEdit's own pre/post metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mote_plugin
from mote_plugin import MoTEHyperParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hparams", required=True)
    parser.add_argument("--mode", choices=("edit", "sequential", "batch"), default="batch")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--batch-size", type=int, help="requests per call in batch mode (default: all)")
    parser.add_argument("--data", help="flat EasyEdit CounterFact JSON (default: the fact model's known facts)")
    args = parser.parse_args()

    mote_plugin.register(strict=True)  # raises with the reason when no usable EasyEdit is importable
    from easyeditor import BaseEditor

    hparams = MoTEHyperParams.from_hparams(args.hparams)
    if args.data:
        records = json.loads(Path(args.data).read_text())[: args.n]
    else:
        facts = json.loads((Path(hparams.model_name).parent / "facts.json").read_text())
        records = [f for f in facts if f["known"]][: args.n]
    editor = BaseEditor.from_hparams(hparams)
    inputs = dict(
        prompts=[r["prompt"] for r in records],
        target_new=[r["target_new"] for r in records],
        ground_truth=[r["ground_truth"] for r in records],
        subject=[r["subject"] for r in records],
        rephrase_prompts=[r["rephrase_prompt"] for r in records],
        locality_inputs={"neighborhood": {"prompt": [r["locality_prompt"] for r in records],
                                          "ground_truth": [r["locality_ground_truth"] for r in records]}},
    )
    if args.mode == "batch":
        hparams.batch_size = args.batch_size or len(records)  # the batch size belongs to the call
        metrics, _, _ = editor.batch_edit(**inputs, sequential_edit=True)
    else:
        metrics, _, _ = editor.edit(**inputs, sequential_edit=args.mode == "sequential")

    def mean(key, phase):
        values = [sum(m[phase][key]) / len(m[phase][key]) for m in metrics if key in m[phase]]
        return sum(values) / len(values)

    print(f"{len(metrics)} edits, mode {args.mode}: rewrite_acc {mean('rewrite_acc', 'pre'):.3f} -> "
          f"{mean('rewrite_acc', 'post'):.3f}, rephrase_acc {mean('rephrase_acc', 'pre'):.3f} -> "
          f"{mean('rephrase_acc', 'post'):.3f}")


if __name__ == "__main__":
    main()
