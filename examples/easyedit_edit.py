"""An EasyEdit script that selects MoTE by its YAML, the way EasyEdit's own examples select ROME or MEMIT: the
if/elif chain names `MoTEHyperParams` and nothing else is MoTE-specific (loading the YAML registers MoTE with the
host, docs/easyedit.md).

    PYTHONPATH=/path/to/EasyEdit python -m mote_plugin.host_stubs examples/easyedit_edit.py \\
        --editing_method MoTE --hparams_dir hparams/MoTE/demo-qwen3_moe [--mode edit|sequential|batch] [--n 10]

Records are the fact model's known CounterFact facts (EasyEdit's flat fields) from the build that holds the YAML's
`model_name` (demo-qwen3_moe: README command 1's build), or `--data` (a flat EasyEdit CounterFact JSON). `edit`
restores the weights after each request, `sequential` keeps them (one request per call), `batch` edits the YAML's
`batch_size` requests per call (`--batch-size` to change it), keeping the edits. Prints EasyEdit's own pre/post metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from easyeditor import AlphaEditHyperParams, BaseEditor, MEMITHyperParams, ROMEHyperParams

from mote_plugin import MoTEHyperParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editing_method", required=True)
    parser.add_argument("--hparams_dir", required=True)
    parser.add_argument("--mode", choices=("edit", "sequential", "batch"), default="batch")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--batch-size", type=int, help="requests per call in batch mode (default: the YAML's)")
    parser.add_argument("--data", help="flat EasyEdit CounterFact JSON (default: the fact model's known facts)")
    args = parser.parse_args()

    if args.editing_method == "ROME":
        editing_hparams = ROMEHyperParams
    elif args.editing_method == "MEMIT":
        editing_hparams = MEMITHyperParams
    elif args.editing_method == "AlphaEdit":
        editing_hparams = AlphaEditHyperParams
    elif args.editing_method == "MoTE":
        editing_hparams = MoTEHyperParams
    else:
        raise NotImplementedError(args.editing_method)

    hparams = editing_hparams.from_hparams(args.hparams_dir)
    if args.data:
        records = json.loads(Path(args.data).read_text())[: args.n]
    else:
        facts = json.loads((Path(hparams.model_name).parent / "facts.json").read_text())
        records = [f for f in facts if f["known"]][: args.n]
    if args.batch_size:
        hparams.batch_size = args.batch_size
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
