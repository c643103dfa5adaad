"""README command 1 (the demo comparison) on builds of its fact model with other training seeds: how much of the
demo's table is the build rather than the methods.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--config examples/configs/compare-testbed-qwen3_moe.yaml]

A training seed changes the order and wording of the training statements only (the same facts, tokenizer and initial
weights). Seed 0 is the demo's own build; seed N is built beside it (`<model>-train-seedN`, the same recipe as the
tests' build with MOTE_TEST_TRAIN_SEED=N). Each seed's comparison report is written to benchmarks/results/demo.{json,md}
(seed 0: README command 1's table) and demo-seedN.{json,md}; benchmarks/render.py's `demo-seeds` block gives each
row's range over them.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from mote_plugin.experiments.compare import CompareConfig, compare, markdown
from mote_plugin.experiments.results import write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def seeded(cfg: CompareConfig, seed: int) -> CompareConfig:
    """The comparison on the build trained with `seed` (seed 0: the config's own build)."""
    if cfg.build is None:
        raise SystemExit("the config has no `build:`: only a fact-model build can be rebuilt with another seed")
    build = copy.deepcopy(cfg.build)
    build.setdefault("train", {})["seed"] = seed
    suffix = f"-train-seed{seed}" if seed else ""
    return replace(cfg, build=build, model=cfg.model + suffix, out=cfg.out + suffix)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/configs/compare-testbed-qwen3_moe.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    cfg = CompareConfig.from_yaml(args.config)
    command = shlex.join(["python", "benchmarks/demo_seeds.py", *(argv if argv is not None else sys.argv[1:])])
    for seed in args.seeds:
        report = compare(seeded(cfg, seed), command=command)
        write_results(RESULTS / ("demo" if seed == 0 else f"demo-seed{seed}"), report, markdown(report))


if __name__ == "__main__":
    main()
