"""Every YAML in hparams/ loads and validates."""

from pathlib import Path

import pytest
import torch
import yaml

from mote_plugin.mote.hparams import MoTEHyperParams

HPARAMS = Path(__file__).resolve().parent.parent / "hparams"
YAMLS = sorted(HPARAMS.rglob("*.yaml"))
MOTE_YAMLS = [p for p in YAMLS if p.parent.name == "MoTE"]
HOST_YAMLS = [p for p in YAMLS if p.parent.name != "MoTE"]  # baselines, in the EasyEdit host's own format


def test_there_are_yaml_files():
    assert len(MOTE_YAMLS) >= 6
    assert {p.parent.name for p in HOST_YAMLS} == {"ROME", "MEMIT", "AlphaEdit", "FT", "LoRA", "UnKE"}
    for alg in ("ROME", "MEMIT", "AlphaEdit"):  # every fact model
        assert {f"testbed-{arch}.yaml" for arch in ("qwen3_moe", "gpt_oss", "qwen3_5_moe")} <= {
            p.name for p in HOST_YAMLS if p.parent.name == alg}


# the keys each host algorithm's hyper-parameter class requires
HOST_REQUIRED = {
    "locate": {"layers", "fact_token", "rewrite_module_tmp", "layer_module_tmp", "ln_f_module", "lm_head_module",
               "mom2_dataset", "mom2_n_samples", "mom2_dtype", "stats_dir", "device", "model_name", "v_loss_layer"},
    "FT": {"layers", "num_steps", "lr", "weight_decay", "norm_constraint", "objective_optimization",
           "rewrite_module_tmp", "device", "model_name"},
    "LoRA": {"lora_type", "layers", "num_steps", "lr", "target_modules", "rank", "lora_alpha", "lora_dropout",
             "device", "model_name"},
    "UnKE": {"layers", "fact_token", "lr", "optim_num_step", "ex_data_num", "layer_module_tmp", "v_loss_layer"},
}


@pytest.mark.parametrize("path", MOTE_YAMLS, ids=lambda p: p.name)
def test_yaml_loads(path):
    hp = MoTEHyperParams.from_hparams(str(path.with_suffix("")))  # '.yaml' is optional
    assert hp.alg_name == "MoTE" and hp.layers
    assert isinstance(hp.eps_whitening, float)
    # edit() reads 1 for MoTE whatever the YAML says (mote_plugin.easyedit); the real YAMLs batch 50, as the paper
    assert hp.batch_size == (50 if hp.model_name.startswith(("Qwen/", "openai/")) or "demo" in path.name else 1)
    if hp.model_name.startswith(("Qwen/", "openai/")):
        assert hp.dtype == "bfloat16" and hp.torch_dtype() is torch.bfloat16
    assert Path(hp.stats_dir).is_absolute(), "relative paths are read from the YAML's directory"


@pytest.mark.parametrize("path", HOST_YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_baseline_yaml_loads(path):
    """Baseline YAMLs name their algorithm by folder; with a host they load with its own class (else the keys the
    host's classes require are checked)."""
    cfg = yaml.safe_load(path.read_text())
    assert cfg["alg_name"] == path.parent.name
    assert HOST_REQUIRED.get(cfg["alg_name"], HOST_REQUIRED["locate"]) <= set(cfg)
    try:
        import easyeditor  # noqa: F401  (only when a host is importable)
    except Exception:
        return
    from mote_plugin.experiments.host_edit import host_hparams

    hp = host_hparams(easyeditor, path.parent.name, str(path))
    assert hp.alg_name == path.parent.name


def _tiny_fact_model(arch: str):
    from mote_plugin.testbed.model import ModelSize, make_config, make_model

    size = ModelSize(d_model=16, layers=6, heads=2, experts=4, top_k=2, expert_hidden=8, max_positions=32)
    return make_model(make_config(arch, 64, size, {}))


@pytest.mark.parametrize("path", [p for p in HOST_YAMLS if p.parent.name in ("ROME", "MEMIT", "AlphaEdit")],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_host_yaml_computes_its_target_where_it_writes(path):
    """A testbed ROME / MEMIT / AlphaEdit YAML writes a 2-D nn.Linear of its fact model, and computes its target at the
    module it writes (ROME: v* at `mlp_module_tmp` = `rewrite_module_tmp`) or in the residual stream, the output of
    the decoder layer (MEMIT, AlphaEdit: z at `layer_module_tmp`), that module feeds."""
    from torch import nn

    cfg = yaml.safe_load(path.read_text())
    arch = path.stem.removeprefix("testbed-").removesuffix("-shared_expert")
    model = _tiny_fact_model(arch)
    for layer in cfg["layers"]:
        written = model.get_submodule(cfg["rewrite_module_tmp"].format(layer))
        assert isinstance(written, nn.Linear) and written.weight.ndim == 2
        decoder_layer = model.get_submodule(cfg["layer_module_tmp"].format(layer))
        assert decoder_layer is model.model.layers[layer]
        assert cfg["rewrite_module_tmp"].format(layer).startswith(cfg["layer_module_tmp"].format(layer) + ".")
    if cfg["alg_name"] == "ROME":
        assert cfg["mlp_module_tmp"] == cfg["rewrite_module_tmp"]
    assert cfg["v_loss_layer"] == model.config.num_hidden_layers - 1
    model.get_submodule(cfg["ln_f_module"])
    model.get_submodule(cfg["lm_head_module"])


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "qwen3_5_moe"])
@pytest.mark.parametrize("path", [p for p in HOST_YAMLS if p.parent.name in ("FT", "LoRA")],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_ft_and_lora_yamls_fit_every_fact_model(path, arch):
    """FT selects parameters by name: the routed experts' packed down-projections (3-D) or o_proj, only at its layers;
    LoRA's target modules are nn.Linear modules of every fact model."""
    from mote_plugin.experiments.host_edit import problem, written_parameters

    cfg = yaml.safe_load(path.read_text())
    model = _tiny_fact_model(arch)
    hp = type("HP", (), cfg)()
    assert problem(model, hp) is None
    names = written_parameters(model, hp)
    if cfg["alg_name"] == "FT":
        assert {n.split(".")[2] for n in names} == {str(layer) for layer in cfg["layers"]}
        params = dict(model.named_parameters())
        main = {f"{cfg['rewrite_module_tmp'].format(layer)}{'' if 'experts' in path.stem else '.weight'}"
                for layer in cfg["layers"]}
        assert main <= set(names)  # the weight itself; GPT-OSS adds its bias (the name holds the template too)
        assert {params[n].ndim for n in main} == ({3} if "experts" in path.stem else {2})


# the real checkpoints' decoder-layer counts and transformers-5 architectures (config.json of each model)
REAL_MODELS = {"qwen3-30b-a3b": ("qwen3_moe", 48), "gpt-oss-20b": ("gpt_oss", 24),
               "qwen3.6-35b-a3b": ("qwen3_5_moe", 40)}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_yaml_module_names(name):
    """The module templates of each real-model YAML resolve on a tiny model of the same transformers class with the
    checkpoint's layer count; every edited layer is an MoE layer and v* reads the last layer."""
    from mote_plugin.adapters import get_adapter
    from mote_plugin.mote.model.blocks import moe_blocks
    from mote_plugin.testbed.model import ModelSize, make_config, make_model

    arch, n_layers = REAL_MODELS[name]
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / "MoTE" / name))
    size = ModelSize(d_model=16, layers=n_layers, heads=2, experts=4, top_k=2, expert_hidden=8, max_positions=32)
    model = make_model(make_config(arch, 64, size, {}))
    hp.check_against_model(model)  # what an edit checks first: module names, v_loss_layer
    for l in hp.layers:
        for tmp in (hp.layer_module_tmp, hp.mlp_module_tmp, hp.experts_module_tmp):
            model.get_submodule(tmp.format(l))
    model.get_submodule(hp.ln_f_module)
    model.get_submodule(hp.lm_head_module)
    assert hp.v_loss_layer == n_layers - 1
    adapter = get_adapter(model)
    assert set(moe_blocks(model, adapter, hp.layers)) == set(hp.layers)
    for l in hp.layers:
        assert model.get_submodule(hp.experts_module_tmp.format(l)) is adapter.experts(adapter.moe_block(model, l))


@pytest.mark.parametrize("path", [p for p in MOTE_YAMLS if p.stem.startswith("testbed-")], ids=lambda p: p.name)
def test_testbed_yaml_fits_its_architecture(path):
    """A testbed YAML's module names and v_loss_layer fit a (tiny) fact model of its architecture."""
    from mote_plugin.testbed.model import ModelSize, make_config, make_model

    hp = MoTEHyperParams.from_hparams(path)
    size = ModelSize(d_model=16, layers=4, heads=2, experts=4, top_k=2, expert_hidden=8, max_positions=32)
    hp.check_against_model(make_model(make_config(path.stem.removeprefix("testbed-").removesuffix("-fullrank"), 64,
                                                  size, {})))
