"""Models dispatched by accelerate with disk or CPU offload (mote/model/offload.py, docs/large-models.md): the edit is
the same as on the model in memory, only the edited blocks are loaded, nothing on disk is written, all-or-nothing
holds, sequential edits and patches work."""

import hashlib

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from mote_plugin import apply_edit, revert_edit, save_edit  # noqa: E402
from mote_plugin.mote import editor  # noqa: E402
from mote_plugin.mote.algebra.update import ExpertUpdate  # noqa: E402
from mote_plugin.mote.model import offload  # noqa: E402
from mote_plugin.mote.model.fingerprint import model_fingerprint  # noqa: E402
from mote_plugin.mote.mote_main import apply_mote_to_model  # noqa: E402
from test_all_or_nothing import Injected, failing_after  # noqa: E402
from test_mote_main import REQUESTS, hparams, tiny_model, tok  # noqa: E402, F401 (tok: the fixture)

EDITED = "model.layers.1.mlp.experts.down_proj"  # hparams() edits layers 0 and 1; layer 2 is never edited


def device_map(layers: str) -> dict:
    """Embeddings, norm and head on the CPU; every decoder layer on `layers` ("disk" or "cpu")."""
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
            **{f"model.layers.{i}": layers for i in range(3)}}


def disk_offloaded(tok, folder, arch="qwen3_moe"):
    return accelerate.dispatch_model(tiny_model(tok, arch), device_map("disk"), offload_dir=str(folder))


def stored(model) -> dict:
    """Every state-dict entry's value, read from accelerate's weights maps where offloaded (CPU clones)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in offload.state_items(model)}


def files_digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_disk_offloaded_edit_equals_the_edit_in_memory(tok, tmp_path, arch):
    reference = tiny_model(tok, arch)
    model = disk_offloaded(tok, tmp_path / "offload", arch)
    assert model.get_parameter(EDITED).device.type == "meta"
    assert model_fingerprint(model) == model_fingerprint(reference)
    on_disk = files_digest(tmp_path / "offload")

    apply_mote_to_model(reference, tok, REQUESTS, hparams(tmp_path / "a"))
    apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path / "b"))

    assert same(stored(model), stored(reference))  # bit-identical weights, the edited ones included
    assert model.get_parameter(EDITED).device.type == "meta"  # offloaded again
    assert files_digest(tmp_path / "offload") == on_disk  # the offload folder is never written
    ids = tok(REQUESTS[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_only_the_edited_blocks_are_loaded(tok, tmp_path, monkeypatch):
    model = disk_offloaded(tok, tmp_path / "offload")
    seen = {}
    real = editor.solve_batch

    def spy(*args, **kwargs):
        seen.update({name: model.get_parameter(name).device.type for name in
                     (EDITED, "model.layers.1.mlp.gate.weight", "model.layers.2.mlp.experts.down_proj",
                      "model.layers.1.self_attn.q_proj.weight")})
        return real(*args, **kwargs)

    monkeypatch.setattr(editor, "solve_batch", spy)
    apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path))
    assert seen == {EDITED: "cpu", "model.layers.1.mlp.gate.weight": "cpu",
                    "model.layers.2.mlp.experts.down_proj": "meta", "model.layers.1.self_attn.q_proj.weight": "meta"}


def test_checkpoint_loaded_with_disk_offload_is_never_written(tok, tmp_path):
    """from_pretrained(device_map=..., offload_folder=...) reads offloaded weights from the checkpoint itself."""
    from transformers import AutoModelForCausalLM

    reference = tiny_model(tok)
    reference.save_pretrained(tmp_path / "checkpoint")
    before = files_digest(tmp_path / "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", device_map=device_map("disk"),
                                                 offload_folder=str(tmp_path / "offload"))
    assert model.get_parameter(EDITED).device.type == "meta"
    offloaded = files_digest(tmp_path / "offload")  # the packed experts, re-saved there by transformers

    apply_mote_to_model(reference, tok, REQUESTS, hparams(tmp_path / "a"))
    apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path / "b"))

    assert same(stored(model), stored(reference))
    assert files_digest(tmp_path / "checkpoint") == before
    assert files_digest(tmp_path / "offload") == offloaded


def test_cpu_offload_and_sequential_edits(tok, tmp_path):
    """accelerate.cpu_offload keeps the weights in a CPU dict (execution device CPU: loaded weights alias it)."""
    reference = tiny_model(tok)
    model = accelerate.cpu_offload(tiny_model(tok), execution_device="cpu")
    assert model.get_parameter(EDITED).device.type == "meta"
    for i, batch in enumerate((REQUESTS[:2], REQUESTS[2:])):
        apply_mote_to_model(reference, tok, batch, hparams(tmp_path / f"a{i}", sequential_memory=True))
        apply_mote_to_model(model, tok, batch, hparams(tmp_path / f"b{i}", sequential_memory=True))
        assert same(stored(model), stored(reference))


STAGES = [("writeback, second layer", ExpertUpdate, "write", 1), ("storing", offload, "store", 0)]


@pytest.mark.parametrize("error", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("dispatch", ["disk", "cpu_offload"])
@pytest.mark.parametrize("stage,owner,name,ok_calls", STAGES, ids=[s[0] for s in STAGES])
def test_failure_leaves_the_offloaded_weights_as_they_were(tok, tmp_path, monkeypatch, stage, owner, name, ok_calls,
                                                           dispatch, error):
    model = disk_offloaded(tok, tmp_path / "offload") if dispatch == "disk" else \
        accelerate.cpu_offload(tiny_model(tok), execution_device="cpu")
    before = stored(model)
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, failing_after(getattr(owner, name), ok_calls, error))
        with pytest.raises(error):
            apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path))
    assert same(stored(model), before)
    assert model.get_parameter(EDITED).device.type == "meta"
    apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path))  # and the next edit works
    assert not torch.equal(stored(model)[EDITED], before[EDITED])


def test_patch_from_an_offloaded_model_applies_and_reverts_on_another(tok, tmp_path):
    edited = disk_offloaded(tok, tmp_path / "offload-a")
    apply_mote_to_model(edited, tok, REQUESTS, hparams(tmp_path))
    save_edit(edited, tmp_path / "edit.safetensors")

    model = disk_offloaded(tok, tmp_path / "offload-b")
    base = stored(model)
    assert apply_edit(model, tmp_path / "edit.safetensors")["exact"]
    assert same(stored(model), stored(edited))
    assert revert_edit(model, tmp_path / "edit.safetensors")["exact"]
    assert same(stored(model), base)
    assert model.get_parameter(EDITED).device.type == "meta"


def test_unsupported_weights_map_is_refused_before_any_change(tok, tmp_path):
    model = disk_offloaded(tok, tmp_path / "offload")
    hook = offload.offload_hook(model.get_submodule("model.layers.1.mlp.experts"))
    hook.weights_map = type("ReadOnlyMap", (), {"__getitem__": hook.weights_map.__getitem__})()
    before = stored(model)
    with pytest.raises(ValueError, match="unsupported accelerate weights map ReadOnlyMap"):
        apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path))
    assert same(stored(model), before)


def test_cli_edits_a_disk_offloaded_model_into_the_same_patch(tok, tmp_path, capsys):
    import json

    import yaml

    from mote_plugin.cli import main
    from mote_plugin.mote.patches.files import load_patch

    tiny_model(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(hparams(tmp_path, preservation_tokens=1000).to_dict()))
    (tmp_path / "requests.json").write_text(json.dumps(REQUESTS[:2]))
    edit = ["edit", "--hparams", str(tmp_path / "hp.yaml"), "--requests", str(tmp_path / "requests.json"),
            "--model", str(tmp_path / "base")]
    assert main([*edit, "--out", str(tmp_path / "in-memory.safetensors")]) == 0
    assert main([*edit, "--out", str(tmp_path / "offloaded.safetensors"), "--device-map",
                 json.dumps(device_map("disk")),
                 "--offload-folder", str(tmp_path / "offload")]) == 0
    a, b = load_patch(tmp_path / "in-memory.safetensors"), load_patch(tmp_path / "offloaded.safetensors")
    assert a.meta["edited_fingerprint"] == b.meta["edited_fingerprint"] != a.meta["base_fingerprint"]

    capsys.readouterr()
    assert main([*edit, "--out", str(tmp_path / "x"), "--device-map", "auto", "--save-model", str(tmp_path / "m")]) == 2
    assert "--save-model needs the whole model in memory" in capsys.readouterr().err
    assert main([*edit, "--out", str(tmp_path / "x"), "--device-map", "{not json"]) == 2
    assert "--device-map: not a JSON object" in capsys.readouterr().err
