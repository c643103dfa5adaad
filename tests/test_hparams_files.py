"""Every YAML in hparams/ loads and validates."""

from pathlib import Path

import pytest

from mote_plugin.mote.hparams import MoTEHyperParams

YAMLS = sorted((Path(__file__).resolve().parent.parent / "hparams").rglob("*.yaml"))


def test_there_are_yaml_files():
    assert len(YAMLS) >= 3


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_loads(path):
    hp = MoTEHyperParams.from_hparams(str(path.with_suffix("")))  # '.yaml' is optional
    assert hp.alg_name == "MoTE" and hp.layers
    assert isinstance(hp.eps_whitening, float)
