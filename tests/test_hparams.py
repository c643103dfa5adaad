"""MoTEHyperParams: YAML loading, scientific notation, unknown/missing keys, value validation."""

from dataclasses import fields

import pytest

from mote_plugin.mote.hparams import MoTEHyperParams

YAML = """\
alg_name: MoTE
model_name: Qwen/Qwen3-30B-A3B
layers: [3, 4, 5, 6, 7]
device: 0
mote_lambda: 1
eps_whitening: 1e-5
nullspace_threshold: 2E-2
r_e: 4
r_out: 0.25
whitening: in
preservation_corpus: null
"""


def write(tmp_path, text, name="qwen3.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_yaml(tmp_path):
    path = write(tmp_path, YAML)
    hp = MoTEHyperParams.from_hparams(str(path)[: -len(".yaml")])  # ".yaml" appended
    assert hp.layers == [3, 4, 5, 6, 7] and hp.device == 0 and hp.model_name == "Qwen/Qwen3-30B-A3B"
    assert hp.eps_whitening == 1e-5 and isinstance(hp.eps_whitening, float)
    assert hp.nullspace_threshold == 2e-2
    assert hp.mote_lambda == 1.0 and isinstance(hp.mote_lambda, float)
    assert hp.r_e == 4 and isinstance(hp.r_e, int) and hp.r_out == 0.25 and hp.r_in == 0.5
    assert hp.fact_token == "subject_last" and hp.batch_size == 1 and hp.preservation_corpus is None
    d = hp.to_dict()
    assert d["layers"] == [3, 4, 5, 6, 7] and d["alg_name"] == "MoTE" and set(d) == {f.name for f in fields(hp)}
    assert MoTEHyperParams(**d) == hp


def test_wrong_alg_name(tmp_path):
    with pytest.raises(ValueError, match="MEMIT"):
        MoTEHyperParams.from_hparams(write(tmp_path, YAML.replace("alg_name: MoTE", "alg_name: MEMIT")))


def test_unknown_and_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="mom2_dataset, rewrite_module_tmp"):
        MoTEHyperParams.from_hparams(write(tmp_path, YAML + "rewrite_module_tmp: x\nmom2_dataset: wiki\n"))
    with pytest.raises(ValueError, match="missing required.*layers, device"):
        text = "\n".join(l for l in YAML.splitlines() if not l.startswith(("layers", "device")))
        MoTEHyperParams.from_hparams(write(tmp_path, text))


def test_updated_copy_is_read_like_a_yaml(tmp_path):
    hp = MoTEHyperParams.from_hparams(write(tmp_path, YAML))
    new = hp.updated(v_weight_decay="6e0", layers=[1, 2, 3], mote_lambda=2)
    assert new.v_weight_decay == 6.0 and new.layers == [1, 2, 3] and isinstance(new.mote_lambda, float)
    assert hp.layers == [3, 4, 5, 6, 7] and hp.v_weight_decay == 0.5  # the original is unchanged
    with pytest.raises(ValueError, match="--set: unknown MoTE hyper-parameter.*v_decay"):
        hp.updated("--set", v_decay=6)
    with pytest.raises(ValueError, match="v_weight_decay must be a number >= 0"):
        hp.updated(v_weight_decay=-1)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("layers", [], "layers"),
        ("layers", [3, "4"], "layers"),
        ("layers", [3, 3], "duplicates"),
        ("mote_lambda", 0.0, "mote_lambda"),
        ("whitening", "left", "whitening"),
        ("fact_token", "subject_middle", "fact_token"),
        ("spread", "uniform", "spread"),
        ("nullspace_rule", "fuzzy", "nullspace_rule"),
        ("nullspace_fallback", "ignore", "nullspace_fallback"),
        ("r_in", 1.5, "r_in"),
        ("r_out", 0, "r_out"),
        ("r_e", True, "r_e"),
        ("device", "gpu", "device"),
        ("v_loss_layer", 1.0, "v_loss_layer"),
        ("nullspace_threshold", 2.0, "relative nullspace_threshold"),
    ],
)
def test_invalid_values(field, value, match):
    base = dict(alg_name="MoTE", model_name="m", layers=[1, 2], device="cpu")
    MoTEHyperParams(**base)  # valid
    with pytest.raises(ValueError, match=match):
        MoTEHyperParams(**{**base, field: value})


def test_device_forms():
    for device in ("cpu", "cuda", "cuda:1", 0, 3):
        assert MoTEHyperParams(alg_name="MoTE", model_name="m", layers=[0], device=device).device == device
