"""MoTE side by side with ROME, MEMIT and AlphaEdit (when an EasyEdit host is importable) on the same model and the
same CounterFact or zsRE records; prints the table and writes results.json, results.md and results.png.

    python examples/compare_editors.py --config examples/configs/compare-testbed-qwen3_moe.yaml [--n 20] [--out DIR]

Without EasyEdit, MoTE runs alone (the plugin's own v* and metrics) and the host methods are reported as unavailable.
With it (`PYTHONPATH=/path/to/EasyEdit`), ROME, MEMIT and AlphaEdit run too and the host's token accuracies are added.
The config keys are the fields of `mote_plugin.experiments.compare.CompareConfig`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from mote_plugin.experiments.compare import CompareConfig, compare, markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="comparison YAML (model, methods, dataset, data, n, batch_size, out)")
    parser.add_argument("--n", type=int, help="override the number of records")
    parser.add_argument("--batch-size", type=int, help="override the batch size")
    parser.add_argument("--out", help="override the results directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = CompareConfig.from_yaml(args.config)
    for key in ("n", "batch_size", "out"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    report = compare(cfg, command=shlex.join(["python", "examples/compare_editors.py", *sys.argv[1:]]))
    print(markdown(report))
    print(f"results in {cfg.out}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()
