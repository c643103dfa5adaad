"""Build the three default fact models and write their reports to benchmarks/results/testbed.md.

    python benchmarks/testbed.py [--out-root .cache/mote-testbed] [--arch qwen3_moe ...]

Each build is the CLI's default (`python -m mote_plugin.testbed build --arch A`); a cached build is reused
(its report keeps the time of the run that built it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch

from mote_plugin.testbed import ARCHS, BuildOptions, build
from mote_plugin.testbed.__main__ import DEFAULT_OUT, format_report

RESULTS = Path(__file__).resolve().parent / "results" / "testbed.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="*", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    sections = []
    for arch in args.arch:
        opts = BuildOptions(arch=arch)
        report = build(DEFAULT_OUT.format(arch=arch, facts=opts.facts), opts)
        sections.append(format_report(report))
    header = [
        "# Fact models: knowledge, causal tracing, editability",
        "",
        f"Command: `python benchmarks/testbed.py` (each: `python -m mote_plugin.testbed build --arch ARCH`, defaults). "
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. Date: {datetime.date.today()}.",
        "",
    ]
    Path(args.out).write_text("\n".join(header + ["\n\n".join(sections)]) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
