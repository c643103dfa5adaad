"""The three real models' on-disk layouts (tests/real_layouts.py: Qwen3-30B-A3B's per-expert tensors, GPT-OSS-20B's
MXFP4 experts, Qwen3.6-35B-A3B's image-text checkpoint with a vision tower and `mtp.*`), tiny and random, edited with
their shipped YAMLs (only size- and machine-forced keys changed) through the Python API, `mote edit | revert` and
EasyEdit's BaseEditor; a saved edited model is the source checkpoint with only the edited tensors changed; MXFP4
experts kept quantized are refused naming the fix and `dequantize` loads them de-quantized; device, loading-flag and
layout errors come before any load and name the key to change."""

import importlib
import json
import logging
import math

import pytest
import torch
import transformers
import yaml

import real_layouts as rl
from mote_plugin import apply_mote_to_model, last_coverage
from mote_plugin.cli import main
from mote_plugin.loading import load_model, load_tokenizer
from mote_plugin.mote import hparams as hparams_module
from test_register import fake_host  # noqa: F401  (a fixture)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (two threads of tiny matmuls on a busy machine run many times slower)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-layouts")
    return {name: rl.build(name, root) for name in rl.MODELS}


def _hp(name, checkpoints, tmp_path, **changes):
    return rl.shipped_hparams(name, checkpoints[name], tmp_path / "stats", **changes)


def _source_model(model_dir):
    """The checkpoint loaded with its own class (config.json's architecture): vision tower included."""
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(model_dir).eval()


def _changed(before: dict, after: dict) -> dict:
    """{name: max |after - before|} of the tensors that differ (same names required)."""
    assert set(before) == set(after)
    return {n: (after[n].float() - before[n].float()).abs().max().item() for n in before
            if not torch.equal(before[n], after[n])}


def _edited_down_projections(changes: dict, hp) -> None:
    """The edit changed exactly the edited layers' down-projections, by a non-zero, finite amount."""
    assert changes, "the edit wrote nothing"
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in changes} == set(hp.layers), changes
    assert all(n.endswith("experts.down_proj") for n in changes), changes
    assert all(0 < v and math.isfinite(v) for v in changes.values()), changes


# ---------------------------------------------------------------------------------------------------------------------
# the shipped YAMLs on the three layouts: Python API and CLI
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", rl.MODELS)
def test_shipped_yaml_edits_and_restores_through_the_api(name, checkpoints, tmp_path):
    hp = _hp(name, checkpoints, tmp_path)
    model = load_model(checkpoints[name], hp.torch_dtype(), dequantize=hp.dequantize)
    tok = load_tokenizer(checkpoints[name])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    model, originals = apply_mote_to_model(model, tok, rl.REQUESTS, hp, return_orig_weights=True)
    _edited_down_projections(_changed(before, model.state_dict()), hp)
    assert [c["layer"] for c in last_coverage(model)] == hp.layers
    with torch.no_grad():
        for n, value in originals.items():
            model.get_parameter(n).copy_(value)
    assert not _changed(before, model.state_dict())  # restored bit-exactly


@pytest.mark.parametrize("name", rl.MODELS)
def test_shipped_yaml_through_the_cli_saves_the_whole_checkpoint(name, checkpoints, tmp_path, capsys):
    """`mote edit --save-model`: the saved model is the source checkpoint with only the edited tensors changed (the
    vision tower, `mtp.*`, the MXFP4 of untouched layers and config.json kept); reloaded with the source's class it
    differs from the source in the edited down-projections only; `mote revert` gives the source's weights back."""
    src = checkpoints[name]
    hp = _hp(name, checkpoints, tmp_path)
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(hp.to_dict()))
    (tmp_path / "requests.json").write_text(json.dumps(rl.REQUESTS))
    patch, saved, reverted = tmp_path / "edit.safetensors", tmp_path / "saved", tmp_path / "reverted"
    assert main(["edit", "--hparams", str(tmp_path / "hp.yaml"), "--requests", str(tmp_path / "requests.json"),
                 "--model", str(src), "--out", str(patch), "--save-model", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "keys past the null space" in out and "every other file and tensor as in the source" in out

    on_disk, saved_disk = rl.checkpoint_tensors(src), rl.checkpoint_tensors(saved)
    source_config, saved_config = (json.loads((d / "config.json").read_text()) for d in (src, saved))
    assert {f.name for f in src.iterdir()} == {f.name for f in saved.iterdir()}  # tokenizer, processor, index
    if name == "gpt-oss-20b":  # the edited layers' experts de-quantized, every other layer still MXFP4
        edited = [f"model.layers.{l}.mlp.experts" for l in hp.layers]
        assert "de-quantized into torch.bfloat16" in out and all(m in out for m in edited)
        gone = {f"{m}.{p}_{part}" for m in edited for p in ("gate_up_proj", "down_proj")
                for part in ("blocks", "scales")}
        assert set(on_disk) - set(saved_disk) == gone
        assert set(saved_disk) - set(on_disk) == {f"{m}.{p}" for m in edited for p in ("gate_up_proj", "down_proj")}
        assert all(torch.equal(on_disk[k], saved_disk[k]) for k in set(on_disk) - gone)
        q = saved_config.pop("quantization_config")
        assert q == {"quant_method": "mxfp4", "modules_to_not_convert": rl.MXFP4_NOT_CONVERTED + edited}
        source_config.pop("quantization_config")
    else:
        assert set(on_disk) == set(saved_disk)
        changed = {k for k in on_disk if not torch.equal(on_disk[k], saved_disk[k])}
        assert changed and all(".mlp.experts." in k and "down_proj" in k for k in changed)
        if name == "qwen3.6-35b-a3b":
            assert any(k.startswith("mtp.") for k in saved_disk) and any(k.startswith("model.visual.") for k in
                                                                        saved_disk)
    assert saved_config == source_config

    source = _source_model(src).state_dict()
    reloaded = _source_model(saved).state_dict()
    _edited_down_projections(_changed(source, reloaded), hp)
    assert main(["revert", "--model", str(saved), "--patch", str(patch), "--out", str(reverted)]) == 0
    assert not _changed(source, _source_model(reverted).state_dict())


@pytest.mark.parametrize("name", rl.MODELS)
def test_shipped_yaml_through_base_editor(name, checkpoints, tmp_path, monkeypatch, easyedit_host):
    """EasyEdit's BaseEditor loads `model_name` (the plugin's loader: de-quantized GPT-OSS, the text model of the
    image-text checkpoint) and batch_edit() writes a non-zero, finite edit; its weights_copy restores exactly."""
    monkeypatch.chdir(tmp_path)  # the host writes logs/ into the working directory
    hp = _hp(name, checkpoints, tmp_path)
    editor = easyedit_host.BaseEditor.from_hparams(hp)
    before = {n: t.clone() for n, t in editor.model.state_dict().items()}
    _, edited, weights_copy = editor.batch_edit(
        prompts=[r["prompt"] for r in rl.REQUESTS], target_new=[r["target_new"] for r in rl.REQUESTS],
        subject=[r["subject"] for r in rl.REQUESTS], ground_truth=["unknown"] * len(rl.REQUESTS),
        sequential_edit=True, verbose=False)
    _edited_down_projections(_changed(before, edited.state_dict()), hp)
    with torch.no_grad():
        for n, value in weights_copy.items():
            edited.get_parameter(n).copy_(value)
    assert not _changed(before, edited.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# GPT-OSS's MXFP4 experts kept quantized (what transformers does on a GPU with triton and `kernels`)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mxfp4_kernels_available(monkeypatch):
    """Loading an MXFP4 checkpoint as on a GPU with triton and `kernels`: the quantizer keeps the experts quantized and
    swaps in transformers' MXFP4 classes. The kernels themselves are stubbed (no triton here): the experts' packed FP4
    bytes are put into their parameters as stored, not swizzled for the kernels."""
    from transformers.integrations import hub_kernels, mxfp4
    from transformers.quantizers import quantizer_mxfp4

    monkeypatch.setattr(quantizer_mxfp4.Mxfp4HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    monkeypatch.setattr(hub_kernels, "get_kernel", lambda *a, **k: object())

    def deserialize(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        module_name, _, proj = full_layer_name.rpartition(".")
        blocks = input_dict[f"{proj}_blocks"]
        blocks = blocks[0] if isinstance(blocks, list) else blocks  # [E, out, in / 32, 16]
        packed = blocks.reshape(*blocks.shape[:2], -1)  # [E, out, in / 2], the parameter's shape
        setattr(model.get_submodule(module_name), proj, torch.nn.Parameter(packed, requires_grad=False))
        missing_keys.discard(full_layer_name)
        return {}

    monkeypatch.setattr(mxfp4.Mxfp4Deserialize, "convert", deserialize)


def test_mxfp4_experts_are_refused_naming_the_fix(checkpoints, tmp_path, capsys, mxfp4_kernels_available):
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, Mxfp4GptOssMLP

    src = checkpoints["gpt-oss-20b"]
    hp = _hp("gpt-oss-20b", checkpoints, tmp_path, dequantize=False)
    model = load_model(src, hp.torch_dtype(), dequantize=hp.dequantize)
    assert isinstance(model.model.layers[3].mlp, Mxfp4GptOssMLP)
    assert isinstance(model.model.layers[3].mlp.experts, Mxfp4GptOssExperts)
    with pytest.raises(ValueError, match="layer 3: its experts are MXFP4-quantized") as e:
        apply_mote_to_model(model, load_tokenizer(src), rl.REQUESTS, hp)
    for fix in ("dequantize: true", "--dequantize", "Mxfp4Config(dequantize=True)"):
        assert fix in str(e.value)
    # the CLI loads the same way: refused without the flag, edited with it
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(hp.to_dict()))
    (tmp_path / "requests.json").write_text(json.dumps(rl.REQUESTS))
    argv = ["edit", "--hparams", str(tmp_path / "hp.yaml"), "--requests", str(tmp_path / "requests.json"), "--model",
            str(src), "--out", str(tmp_path / "edit.safetensors")]
    assert main(argv) == 2 and "--dequantize" in capsys.readouterr().err
    assert main([*argv, "--dequantize"]) == 0 and (tmp_path / "edit.safetensors").is_file()


def test_dequantize_loads_bf16_experts_that_edit(checkpoints, tmp_path, mxfp4_kernels_available):
    """`dequantize: true` (the shipped YAML's) through the loader (API and CLI) and BaseEditor's loading: the plain
    GPT-OSS block, de-quantized exactly as transformers de-quantizes on a machine without the kernels; the edit
    writes."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from mote_plugin.easyedit import load_model as host_load

    src = checkpoints["gpt-oss-20b"]
    hp = _hp("gpt-oss-20b", checkpoints, tmp_path)
    assert hp.dequantize  # as shipped
    model = load_model(src, hp.torch_dtype(), dequantize=hp.dequantize)
    assert all(type(layer.mlp) is GptOssMLP for layer in model.model.layers)
    assert model.model.layers[3].mlp.experts.down_proj.dtype == torch.bfloat16
    blocks = rl.checkpoint_tensors(src)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    expected = convert_moe_packed_tensors(blocks["model.layers.3.mlp.experts.down_proj_blocks"],
                                          blocks["model.layers.3.mlp.experts.down_proj_scales"])  # [E, h, d]
    assert torch.equal(model.model.layers[3].mlp.experts.down_proj.detach(), expected)
    hp.model_parallel = False
    host_model, _ = host_load(str(src), hp)  # BaseEditor's loading of model_name: the same
    assert all(type(layer.mlp) is GptOssMLP for layer in host_model.model.layers)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    model, _ = apply_mote_to_model(model, load_tokenizer(src), rl.REQUESTS, hp)
    _edited_down_projections(_changed(before, model.state_dict()), hp)


def test_saved_gpt_oss_keeps_mxfp4_where_it_was_not_edited(checkpoints, tmp_path, mxfp4_kernels_available):
    """The saved model's config, read where the kernels run: the untouched layers' experts load as MXFP4, the edited
    layers' as the plain block (their stored bf16)."""
    from transformers.integrations.mxfp4 import Mxfp4GptOssMLP
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from mote_plugin.mote.editor import EditState
    from mote_plugin.saving import save_model

    src = checkpoints["gpt-oss-20b"]
    hp = _hp("gpt-oss-20b", checkpoints, tmp_path)
    model = load_model(src, hp.torch_dtype(), dequantize=True)
    model, _ = apply_mote_to_model(model, load_tokenizer(src), rl.REQUESTS, hp)
    report = save_model(model, src, tmp_path / "saved", EditState.of(model).origin)
    assert report["dequantized"] == [f"model.layers.{l}.mlp.experts" for l in hp.layers]
    reloaded = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "saved")
    kinds = [type(layer.mlp) for layer in reloaded.model.layers]
    assert kinds == [Mxfp4GptOssMLP] * 3 + [GptOssMLP] * 3
    for l in hp.layers:
        assert torch.equal(reloaded.model.layers[l].mlp.experts.down_proj,
                           model.model.layers[l].mlp.experts.down_proj)


# ---------------------------------------------------------------------------------------------------------------------
# errors before loading, loading-flag warnings, the image-text layout
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: errors must come first."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    loading = importlib.import_module("mote_plugin.loading")
    monkeypatch.setattr(loading, "load_model", load)


@pytest.mark.skipif(torch.cuda.is_available(), reason="device: 0 is usable here")
@pytest.mark.parametrize("device_map", [[], ["--device-map", "auto"], ["--device-map", '{"": "cpu"}']])
def test_cuda_device_without_cuda_is_refused_before_loading_by_the_cli(checkpoints, tmp_path, capsys, no_load,
                                                                        device_map):
    hp = _hp("qwen3-30b-a3b", checkpoints, tmp_path, device=0)
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(hp.to_dict()))
    (tmp_path / "requests.json").write_text(json.dumps(rl.REQUESTS))
    argv = ["edit", "--hparams", str(tmp_path / "hp.yaml"), "--requests", str(tmp_path / "requests.json"), "--model",
            str(checkpoints["qwen3-30b-a3b"]), "--out", str(tmp_path / "p.safetensors"), *device_map]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "device 0 needs CUDA" in err and "set `device: cpu`" in err and "--set device=cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="device: 0 is usable here")
def test_cuda_device_without_cuda_is_refused_before_base_editor_loads(fake_host, checkpoints, tmp_path,  # noqa: F811
                                                                      no_load):
    fake_host("current")
    import mote_plugin

    assert mote_plugin.register()
    base_editor = importlib.import_module("easyeditor").BaseEditor
    hp = _hp("qwen3-30b-a3b", checkpoints, tmp_path, device=0)
    with pytest.raises(ValueError, match="device 0 needs CUDA.*set `device: cpu`"):
        base_editor.from_hparams(hp)


def test_model_parallel_warning_says_who_loaded_the_model(checkpoints, tmp_path, monkeypatch):
    """BaseEditor's MoTE loading with model_parallel on a machine with one device: the warning says the model was
    loaded with device_map='auto' (by the plugin), not that the caller loaded it."""
    from mote_plugin.easyedit import load_model as host_load

    messages = []
    monkeypatch.setattr(hparams_module, "_warn_once", lambda key, message: messages.append(message))
    hp = _hp("qwen3-30b-a3b", checkpoints, tmp_path, model_parallel=True)
    model, _ = host_load(str(checkpoints["qwen3-30b-a3b"]), hp)
    hp.check_against_model(model)
    (message,) = [m for m in messages if m.startswith("model_parallel")]
    assert "loaded with device_map='auto'" in message and "caller" not in message


def test_image_text_layout_names_the_templates_to_use(checkpoints, tmp_path, caplog):
    """Qwen3.6-35B-A3B loaded with its image-text class: the shipped YAML's `model.layers.{}` names no module; one
    message per key names the module MoTE would edit and the template to set, and with those the edit writes."""
    src = checkpoints["qwen3.6-35b-a3b"]
    model = _source_model(src)
    tok = load_tokenizer(src)
    hp = _hp("qwen3.6-35b-a3b", checkpoints, tmp_path)
    with pytest.raises(ValueError) as e:
        apply_mote_to_model(model, tok, rl.REQUESTS, hp)
    message = str(e.value)
    templates = {"layer_module_tmp": "model.language_model.layers.{}",
                 "mlp_module_tmp": "model.language_model.layers.{}.mlp",
                 "experts_module_tmp": "model.language_model.layers.{}.mlp.experts",
                 "ln_f_module": "model.language_model.norm"}
    for key, template in templates.items():
        assert message.count(f"{key}: the model has no module") == 1 and f"set `{key}: {template}`" in message
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with caplog.at_level(logging.ERROR):
        model, _ = apply_mote_to_model(model, tok, rl.REQUESTS, hp.updated("templates", **templates))
    changes = _changed(before, model.state_dict())
    assert changes and all(n.startswith("model.language_model.layers.") for n in changes)
