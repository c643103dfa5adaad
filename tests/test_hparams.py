"""MoTEHyperParams: YAML loading, quoted numbers read as EasyEdit reads them, unknown/missing keys, value validation,
and the checks against a model (module names, v_loss_layer, loading flags)."""

from dataclasses import fields

import pytest
import torch

from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote.mote_main import apply_mote_to_model
from test_mote_main import tok  # noqa: F401 (the fixture)

YAML = """\
alg_name: MoTE
model_name: Qwen/Qwen3-30B-A3B
layers: [3, 4, 5, 6, 7]
device: 0
mote_lambda: 1
eps_whitening: 1e-5
nullspace_rule: absolute
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
        ("v_objective", "adam", "v_objective must be one of \\('memit', 'memit_host'\\), got 'adam'"),
        ("v_objective", "squared", "v_objective 'squared' was removed: use 'memit'"),
        ("v_loss_layer", 1.0, "v_loss_layer"),
        ("v_loss_layer", 1, "v_loss_layer must be -1 .* max\\(layers\\) = 2; got 1"),
        ("v_loss_layer", -2, "v_loss_layer must be -1"),
        ("nullspace_threshold", 2.0, "relative nullspace_threshold"),
        ("mote_lambda", float("inf"), "mote_lambda must be a number > 0"),
        ("eps_whitening", float("nan"), "eps_whitening must be a number >= 0"),
        ("mlp_module_tmp", "model.layers.mlp", "mlp_module_tmp must be a module name with one {}"),
        ("layer_module_tmp", "model.layers.{}.{}", "layer_module_tmp must be a module name with one {}"),
        ("experts_module_tmp", "model.layers.{i}.mlp.experts", "experts_module_tmp must be a module name with one {}"),
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


def test_quoted_numbers_are_read_as_easyedit_reads_them(tmp_path):
    """EasyEdit's HyperParams.construct_float_from_scientific_notation turns every string `float()` accepts into a
    float; MoTE does the same for its numeric keys, keeps whole numbers whole for integer keys, and refuses the rest."""
    text = YAML + 'v_lr: "0.5"\nclamp_norm_factor: " 4 "\nv_num_grad_steps: "25"\npreservation_tokens: "20_000"\n'
    text += 'v_loss_layer: "7"\nstats_dir: "1234"\nv_weight_decay: "6E-1"\n'
    hp = MoTEHyperParams.from_hparams(write(tmp_path, text))
    assert hp.v_lr == 0.5 and hp.clamp_norm_factor == 4.0 and hp.v_weight_decay == 0.6
    assert hp.v_num_grad_steps == 25 and isinstance(hp.v_num_grad_steps, int) and hp.preservation_tokens == 20000
    assert hp.v_loss_layer == 7 and isinstance(hp.v_loss_layer, int)
    assert hp.stats_dir == str(tmp_path / "1234")  # string keys stay strings (a relative path: from the YAML's folder)
    assert MoTEHyperParams.from_hparams(write(tmp_path, YAML.replace("device: 0", 'device: "1"'))).device == 1
    for line, match in (('v_num_grad_steps: "2.5"', "v_num_grad_steps must be an int >= 0, got 2.5"),
                        ('mote_lambda: "inf"', "mote_lambda must be a number > 0, got inf"),
                        ('v_lr: "fast"', "v_lr must be a number > 0, got \'fast\'"),
                        ('nullspace: "true"', "nullspace must be true or false")):
        with pytest.raises(ValueError, match=match):
            MoTEHyperParams.from_hparams(write(tmp_path, YAML + line + "\n"))


def test_rank_forms(tmp_path):
    """A rank is an int (that many factors), a share of the mode's size in (0, 1), `full` or `auto`."""
    text = YAML.replace("r_e: 4\nr_out: 0.25\n", "r_e: 1\nr_out: full\nr_in: 0.25\n")
    hp = MoTEHyperParams.from_hparams(write(tmp_path, text))
    assert (hp.r_e, hp.r_out, hp.r_in) == (1, "full", 0.25) and hp.layer_ranks() == (1, 1.0, 0.25)
    assert hp.updated(r_e="auto").layer_ranks() == (1.0, 1.0, 0.25)  # an auto mode keeps the full factor
    assert MoTEHyperParams(alg_name="MoTE", model_name="m", layers=[0], device="cpu").r_e == "full"  # the default


@pytest.mark.parametrize("line, match", [
    ("r_e: 1.0", "r_e must be an int rank >= 1, a share of the mode's size in \\(0, 1\\), 'full' or 'auto', got 1.0: "
                 "write `r_e: full` for the mode's full size or `r_e: 1` for rank 1"),
    ("r_out: 16.0", "r_out must be .*, got 16.0: write `r_out: 16` for rank 16"),
    ('r_in: "1"', "r_in must be .*, got '1': a number in quotes is ambiguous"),
    ('r_in: "0.5"', "r_in must be .*, got '0.5': a number in quotes is ambiguous"),
    ("r_e: 1.5", "r_e must be .*, got 1.5$"),
    ("r_e: 0", "r_e must be .*, got 0$"),
    ("r_e: half", "r_e must be .*, got 'half'$"),
])
def test_rank_forms_that_could_be_misread_are_refused(tmp_path, line, match):
    with pytest.raises(ValueError, match=match):
        MoTEHyperParams.from_hparams(write(tmp_path, YAML.replace("r_e: 4\nr_out: 0.25\n", "") + line + "\n"))


def test_easyedit_reads_the_same_strings():
    """The reading mirrored above, checked against EasyEdit's own function where a host is importable."""
    try:
        from easyeditor.util.hparams import HyperParams
    except Exception:
        pytest.skip("no EasyEdit host importable")
    config = {"v_lr": "0.5", "eps": "1e-5", "steps": " 25 ", "big": "20_000", "name": "Qwen/Qwen3", "inf": "inf"}
    assert HyperParams.construct_float_from_scientific_notation(dict(config)) == {
        "v_lr": 0.5, "eps": 1e-5, "steps": 25.0, "big": 20000.0, "name": "Qwen/Qwen3", "inf": float("inf")}


def test_a_threshold_without_its_rule_is_refused(tmp_path):
    """AlphaEdit's `nullspace_threshold: 2e-2` is an absolute eigenvalue cut-off; under MoTE's default relative rule
    the same number would mean 'leave 2% of the energy unprotected'. A YAML must say which rule it means."""
    text = YAML.replace("nullspace_rule: absolute\n", "")
    with pytest.raises(ValueError, match="nullspace_threshold is set without nullspace_rule.*nullspace_rule: absolute"):
        MoTEHyperParams.from_hparams(write(tmp_path, text))
    hp = MoTEHyperParams.from_hparams(write(tmp_path, text.replace("nullspace_threshold: 2E-2\n", "")))
    assert (hp.nullspace_rule, hp.nullspace_threshold) == ("relative", 1e-2)  # neither given: the defaults
    assert hp.updated(nullspace_threshold=0.05).nullspace_threshold == 0.05  # a copy keeps its rule


def test_hparams_path(tmp_path):
    from mote_plugin.mote.hparams import hparams_path

    path = write(tmp_path, YAML)
    assert hparams_path(str(path)[: -len(".yaml")]) == path == hparams_path(path)
    with pytest.raises(FileNotFoundError, match="no such hparams file: .*nope \\(tried .*nope.yaml\\)"):
        hparams_path(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------------
# against a model
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    import transformers

    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=8, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=3,
                                         num_experts=4, num_experts_per_tok=2)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def model_hp(**kw):
    return MoTEHyperParams(**{**dict(alg_name="MoTE", model_name="m", layers=[0, 1], device="cpu"), **kw})


def test_checks_against_the_model(tiny):
    model_hp().check_against_model(tiny)
    model_hp(v_loss_layer=2, lm_head_module="model.embed_tokens").check_against_model(tiny)
    cases = [
        (dict(v_loss_layer=47), "v_loss_layer: 47 is outside this model's 3 decoder layers \\(use -1 for the last "
                                "layer, or a layer in \\[1, 2\\]\\)"),
        (dict(mlp_module_tmp="model.layers.{}.mlp.gate"), "mlp_module_tmp: 'model.layers.0.mlp.gate' is not the "
                                                           "Qwen3-MoE mlp module of layer 0 \\('model.layers.0.mlp'"),
        (dict(experts_module_tmp="model.layers.{}.mlp"), "experts_module_tmp: 'model.layers.0.mlp' is not the "
                                                         "Qwen3-MoE experts module of layer 0 "
                                                         "\\('model.layers.0.mlp.experts'"),
        (dict(experts_module_tmp="model.layers.{}.moe.experts"), "experts_module_tmp: the model has no module "
                                                                 "'model.layers.0.moe.experts'"),
        (dict(layer_module_tmp="model.layers.{}.self_attn"), "layer_module_tmp: 'model.layers.0.self_attn' is not"),
        (dict(ln_f_module="model.final_norm"), "ln_f_module: the model has no module 'model.final_norm'"),
        (dict(lm_head_module="head"), "lm_head_module: the model has no module 'head'"),
        (dict(lm_head_module="model.norm.act"), "lm_head_module: the model has no module"),
        (dict(lm_head_module="model.rotary_emb"), "lm_head_module: 'model.rotary_emb' has no weight"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match="do not fit this Qwen3MoeForCausalLM: " + match):
            model_hp(**kw).check_against_model(tiny)
    with pytest.raises(ValueError, match="mlp_module_tmp.*; ln_f_module"):  # every problem in one message
        model_hp(mlp_module_tmp="x.{}", ln_f_module="y").check_against_model(tiny)


def test_loading_flags_are_warned_about_once(tiny, caplog, monkeypatch):
    from mote_plugin.mote import hparams as hparams_module

    monkeypatch.setattr(hparams_module, "_WARNED", set())
    hp = model_hp(fp16=True, model_parallel=True)
    with caplog.at_level("WARNING", logger="mote_plugin.mote.hparams"):
        hp.check_against_model(tiny)
        hp.check_against_model(tiny)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("fp16: true has no effect here: the model is torch.float32")
    assert messages[1].startswith("model_parallel: true has no effect here")
    caplog.clear()
    with caplog.at_level("WARNING", logger="mote_plugin.mote.hparams"):
        model_hp().check_against_model(tiny)  # flags off: nothing to say
    assert not caplog.records


def test_an_edit_that_does_not_fit_is_refused_before_any_change(tok, tmp_path):
    """apply_mote_to_model runs the model checks before anything else: nothing computed, no weight changed."""
    from test_mote_main import REQUESTS, hparams, same, state, tiny_model

    model = tiny_model(tok)
    before = state(model)
    for kw, match in ((dict(v_loss_layer=47), "v_loss_layer: 47 is outside this model's 3 decoder layers"),
                      (dict(experts_module_tmp="model.layers.{}.mlp"),
                       "experts_module_tmp: 'model.layers.0.mlp' is not")):
        with pytest.raises(ValueError, match=match):
            apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path, **kw))
        assert same(model, before)
    assert not (tmp_path / "stats").exists(), "refused before the preservation statistics"


def test_dtype_key():
    base = dict(alg_name="MoTE", model_name="m", layers=[0], device="cpu")
    assert MoTEHyperParams(**base).torch_dtype() is torch.float32  # EasyEdit's rule without `dtype`
    assert MoTEHyperParams(**base, fp16=True).torch_dtype() is torch.float16
    assert MoTEHyperParams(**base, dtype="bfloat16").torch_dtype() is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be null or one of"):
        MoTEHyperParams(**base, dtype="bf16")
    with pytest.raises(ValueError, match="fp16: true loads float16, but dtype is 'bfloat16'"):
        MoTEHyperParams(**base, fp16=True, dtype="bfloat16")


def test_relative_paths_are_read_from_the_yaml_directory(tmp_path, monkeypatch):
    folder = tmp_path / "hparams" / "MoTE"
    folder.mkdir(parents=True)
    (tmp_path / "models" / "local").mkdir(parents=True)
    (folder / "a.yaml").write_text("alg_name: MoTE\nmodel_name: ../../models/local\nlayers: [0]\ndevice: cpu\n"
                                   "stats_dir: .cache/stats\npreservation_corpus: wikitext\n")
    (folder / "b.yaml").write_text("alg_name: MoTE\nmodel_name: Qwen/Qwen3-30B-A3B\nlayers: [0]\ndevice: cpu\n")
    monkeypatch.chdir(tmp_path / "models")  # anywhere else
    hp = MoTEHyperParams.from_hparams(folder / "a")
    assert hp.model_name == str(tmp_path / "models" / "local") and hp.stats_dir == str(folder / ".cache" / "stats")
    assert hp.preservation_corpus == "wikitext"  # a `datasets` name, nothing of that name next to the YAML
    hp = MoTEHyperParams.from_hparams(folder / "b")
    assert hp.model_name == "Qwen/Qwen3-30B-A3B" and hp.stats_dir == "./.cache/mote-stats"  # Hub name; default
    assert hp.updated(mote_lambda=1.0).model_name == "Qwen/Qwen3-30B-A3B"
