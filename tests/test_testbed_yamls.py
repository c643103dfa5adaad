"""The testbed YAMLs are rows of the quality protocol (benchmarks/quality.py, benchmarks/results/quality.json) with the
settings chosen on its dev split: testbed-<arch>.yaml, ranks in the real-model YAML's ratios, is the best MoTE row at
those ranks on dev (MoTE with the MEMIT-style residual spread); testbed-<arch>-fullrank.yaml is the full-rank row with
the paper's core spread."""

import json
import math
from pathlib import Path

import pytest

from mote_plugin.mote.algebra.tucker import resolve_ranks
from mote_plugin.mote.hparams import MoTEHyperParams

ROOT = Path(__file__).resolve().parent.parent
HPARAMS = ROOT / "hparams" / "MoTE"
QUALITY = ROOT / "benchmarks" / "results" / "quality.json"
YAML_ROWS = {"": ("MoTE-residual", "residual"), "-fullrank": ("MoTE-fullrank", "core")}
REAL = {"qwen3_moe": ("qwen3-30b-a3b", (128, 2048, 768)), "gpt_oss": ("gpt-oss-20b", (32, 2880, 2880)),
        "qwen3_5_moe": ("qwen3.6-35b-a3b", (256, 2048, 512))}  # real YAML, (E, d, h) of the real model
TUNED = ("layers", "v_weight_decay", "mote_lambda", "nullspace_threshold")


@pytest.mark.parametrize("suffix", sorted(YAML_ROWS))
@pytest.mark.parametrize("arch", sorted(REAL))
def test_testbed_yamls_hold_the_dev_chosen_settings(arch, suffix):
    report = json.loads(QUALITY.read_text())["archs"]
    assert arch in report, f"benchmarks/results/quality.json has no {arch}: run benchmarks/quality.py --arch {arch}"
    row, spread = YAML_ROWS[suffix]
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / f"testbed-{arch}{suffix}"))
    assert {k: getattr(hp, k) for k in TUNED} == report[arch]["tune"][row]["chosen"] and hp.spread == spread
    assert hp.model_name == str(ROOT / ".cache" / "mote-testbed" / f"{arch}-200-quality" / "model")  # from any cwd
    shape = tuple(report[arch]["shape"])
    ranks = resolve_ranks((hp.r_e, hp.r_out, hp.r_in), shape)
    if suffix == "-fullrank":
        assert ranks == shape
        return
    real_yaml, real_shape = REAL[arch]
    real = MoTEHyperParams.from_hparams(str(HPARAMS / real_yaml))
    real_ranks = resolve_ranks((real.r_e, real.r_out, real.r_in), real_shape)
    expected = tuple(max(2, math.ceil(r * n / size)) for r, n, size in zip(real_ranks, shape, real_shape))
    assert ranks == expected == tuple(report[arch]["yaml_ranks"])
