"""The testbed YAMLs are rows of the quality protocol (benchmarks/quality.py, benchmarks/results/quality.json) with the
settings chosen on its dev split: testbed-<arch>.yaml is the best MoTE row on dev (MoTE-auto: ranks from each batch's
coverage, residual spread); testbed-<arch>-fullrank.yaml is the full-rank row with the paper's basis and core spread.
The protocol's fixed ranks are the real models' in the same ratios (benchmarks/configs/quality.yaml `real_ranks`)."""

import json
import math
from pathlib import Path

import pytest
import yaml

from mote_plugin.mote.algebra.tucker import resolve_ranks
from mote_plugin.mote.hparams import MoTEHyperParams

ROOT = Path(__file__).resolve().parent.parent
HPARAMS = ROOT / "hparams" / "MoTE"
QUALITY = ROOT / "benchmarks" / "results" / "quality.json"
CONFIG = ROOT / "benchmarks" / "configs" / "quality.yaml"
YAML_ROWS = {"": ("MoTE-auto", "residual", "weights"), "-fullrank": ("MoTE-fullrank", "core", "weights")}
ARCHS = ("gpt_oss", "qwen3_5_moe", "qwen3_moe")
TUNED = ("layers", "v_weight_decay", "mote_lambda", "nullspace_threshold")


@pytest.mark.parametrize("suffix", sorted(YAML_ROWS))
@pytest.mark.parametrize("arch", ARCHS)
def test_testbed_yamls_hold_the_dev_chosen_settings(arch, suffix):
    report = json.loads(QUALITY.read_text())["archs"]
    assert arch in report, f"benchmarks/results/quality.json has no {arch}: run benchmarks/quality.py --arch {arch}"
    row, spread, basis = YAML_ROWS[suffix]
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / f"testbed-{arch}{suffix}"))
    assert {k: getattr(hp, k) for k in TUNED} == report[arch]["tune"][row]["chosen"]
    assert (hp.spread, hp.basis) == (spread, basis)
    assert hp.model_name == str(ROOT / ".cache" / "mote-testbed" / f"{arch}-200-quality" / "model")  # from any cwd
    shape = tuple(report[arch]["shape"])
    if suffix == "-fullrank":
        assert (hp.r_e, hp.r_out, hp.r_in) == ("full", "full", "full")
        assert resolve_ranks(hp.layer_ranks(), shape) == shape
        return
    assert (hp.r_e, hp.r_out, hp.r_in, hp.min_coverage) == ("auto", "auto", "auto", 0.9)
    real = yaml.safe_load(CONFIG.read_text())["real_ranks"][arch]
    expected = tuple(max(2, math.ceil(r * n / size)) for r, n, size in zip(real["ranks"], shape, real["shape"]))
    assert expected == tuple(report[arch]["yaml_ranks"])  # the fixed-rank rows ran at the real ranks' ratios
