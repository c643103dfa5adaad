"""Edit patches (mote_plugin.mote.patches.files) and the `mote` CLI on tiny random MoE models: save -> apply on a fresh
copy of the base is bit-exact, revert gives the base back bit-exactly, wrong or damaged patches are refused with the
weights untouched, an fp32 patch applies to a bf16 copy within the documented tolerance."""

import copy
import json
import logging

import pytest
import torch
import yaml

from mote_plugin import apply_edit, inspect_edit, revert_edit, save_edit
from mote_plugin.adapters import get_adapter
from mote_plugin.cli import main
from mote_plugin.mote.algebra.update import ExpertUpdate
from mote_plugin.mote.editor import EditState
from mote_plugin.mote.model.stats import corpus_texts
from mote_plugin.mote.mote_main import apply_mote_to_model
from mote_plugin.mote.patches.history import compact, record_call
from mote_plugin.testbed.tokenizer import train_tokenizer
from test_mote_main import REQUESTS, hparams, tiny_model

EDITED = ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def tok():
    texts = list(corpus_texts(None))[:400] + [r["prompt"] + " " + r["target_new"] for r in REQUESTS]
    return train_tokenizer(texts, 800)


def bits(model) -> dict:
    """The state dict as raw integers (compares signed zeros and NaNs bit by bit)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return {k: v.detach().reshape(-1).view(ints[v.element_size()]).clone() for k, v in model.state_dict().items()}


def same_bits(model, reference: dict) -> bool:
    return all(torch.equal(v, reference[k]) for k, v in bits(model).items())


@pytest.fixture(scope="module")
def edits(tok, tmp_path_factory):
    """dtype -> (base model, edited model, patch path): two sequential calls of two requests each. `middle[dtype]` holds
    the edited parameters after the first call."""
    made = {}

    def get(dtype):
        if dtype not in made:
            tmp = tmp_path_factory.mktemp(str(dtype).removeprefix("torch."))
            base = tiny_model(tok).to(dtype)
            edited = copy.deepcopy(base)
            apply_mote_to_model(edited, tok, REQUESTS[:2], hparams(tmp, preservation_tokens=1000))
            get.middle[dtype] = {n: edited.get_parameter(n).detach().clone() for n in EDITED}
            apply_mote_to_model(edited, tok, REQUESTS[2:], hparams(tmp, preservation_tokens=1000))
            made[dtype] = (base, edited, save_edit(edited, tmp / "edit.safetensors"))
        return made[dtype]

    get.middle = {}

    return get


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_and_revert_are_bit_exact(edits, dtype):
    base, edited, path = edits(dtype)
    model = copy.deepcopy(base)
    assert apply_edit(model, path)["exact"]
    assert same_bits(model, bits(edited)) and not same_bits(model, bits(base))
    assert revert_edit(model, path)["exact"]
    assert same_bits(model, bits(base))
    undone = copy.deepcopy(edited)  # reverting the edited model itself
    revert_edit(undone, path)
    assert same_bits(undone, bits(base))


def test_patch_holds_both_calls_and_is_smaller_than_the_dense_delta(edits):
    _, _, path = edits(torch.float32)
    s = inspect_edit(path)
    assert s["calls"] == 2 and [r["target_new"] for r in s["requests"]] == [r["target_new"] for r in REQUESTS]
    assert sorted(s["layers"]) == [0, 1] and [s["layers"][l]["param"] for l in (0, 1)] == EDITED
    assert all(info["ranks"] == [2, 2] and info["writes"] == 2 for info in s["layers"].values())  # rank = batch size
    b = s["bytes"]
    # fixups: the entries whose float32 rounding the factor replay does not reproduce; measured 4096 + 3180 + 1024 bytes
    # of factors + fixups + samples against a 24576-byte dense delta on this tiny model (the factors shrink with size)
    assert b["factors"] + b["fixups"] + b["samples"] < b["dense_delta"] / 2
    assert b["file"] < b["dense_delta"]


def test_another_model_is_refused_and_left_untouched(tok, edits):
    base, edited, path = edits(torch.float32)
    other = tiny_model(tok, seed=1)
    before = bits(other)
    for exact in (True, False):
        with pytest.raises(ValueError, match="fingerprint [0-9a-f]{64}.*fingerprint is [0-9a-f]{64}"):
            apply_edit(other, path, exact=exact)
        assert same_bits(other, before)
    unedited = copy.deepcopy(base)  # reverting needs the edited model
    with pytest.raises(ValueError, match="needs the edited model"):
        revert_edit(unedited, path)
    assert same_bits(unedited, bits(base))
    twice = copy.deepcopy(edited)  # applying twice: the edited model is not the base
    with pytest.raises(ValueError, match="needs the base model"):
        apply_edit(twice, path)


def test_damaged_patch_is_refused(edits, tmp_path):
    base, _, path = edits(torch.float32)
    model = copy.deepcopy(base)
    data = path.read_bytes()
    truncated, tampered = tmp_path / "truncated.safetensors", tmp_path / "tampered.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    tampered.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])  # one bit of the last tensor
    with pytest.raises(ValueError, match="not a readable"):
        apply_edit(model, truncated)
    with pytest.raises(ValueError, match="checksum"):
        apply_edit(model, tampered)
    with pytest.raises(FileNotFoundError):
        apply_edit(model, tmp_path / "missing.safetensors")
    assert same_bits(model, bits(base))


def test_a_failure_half_way_restores_the_weights(edits, monkeypatch):
    base, _, path = edits(torch.float32)
    model = copy.deepcopy(base)
    calls = []
    real = ExpertUpdate.write

    def failing(self, adapter, block):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        real(self, adapter, block)

    monkeypatch.setattr(ExpertUpdate, "write", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        apply_edit(model, path)
    assert same_bits(model, bits(base))


def test_fp32_patch_on_a_bf16_copy_is_within_the_documented_tolerance(edits):
    """docs/patches.md, for this two-call patch (x = the weights after the first call), u = 2^-8 (bf16):
    |applied - bf16(edited)| <= 2u |edited| + u (|base| + |x - base| + |edited - x| + |x|)."""
    base, edited, path = edits(torch.float32)
    model = copy.deepcopy(base).to(torch.bfloat16)
    before = bits(model)
    with pytest.raises(ValueError, match="bfloat16.*exact=False"):
        apply_edit(model, path)
    assert same_bits(model, before)
    assert not apply_edit(model, path, exact=False)["exact"]
    u = 2.0**-8
    for name in EDITED:
        b, e = base.get_parameter(name).detach(), edited.get_parameter(name).detach()
        x = edits.middle[torch.float32][name]
        got = model.get_parameter(name).detach().float()
        err = (got - e.bfloat16().float()).abs()
        assert (err <= 2 * u * e.abs() + u * (b.abs() + (x - b).abs() + (e - x).abs() + x.abs())).all()
    revert_edit(model, path, exact=False)
    for name in EDITED:  # back to the bf16 base within twice that (the calls undone in reverse order)
        b, e = base.get_parameter(name).detach(), edited.get_parameter(name).detach()
        x = edits.middle[torch.float32][name]
        err = (model.get_parameter(name).detach().float() - b.bfloat16().float()).abs()
        assert (err <= 2 * (2 * u * b.abs() + u * (e.abs() + (x - b).abs() + (e - x).abs() + x.abs()))).all()
    for name, value in model.state_dict().items():  # the other parameters are untouched
        if name not in EDITED:
            assert torch.equal(value.reshape(-1).view(torch.int16), before[name])


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_dense_and_listed_writes_round_trip(tok, tmp_path, arch):
    """A high-rank write is stored as its dense delta, a per-expert write with its expert list; both round-trip
    bit-exactly (GPT-OSS: the transposed [E, h, d] layout)."""
    base = tiny_model(tok, arch)
    model = copy.deepcopy(base)
    adapter = get_adapter(model)
    block = adapter.moe_block(model, 1)
    name = "model.layers.1.mlp.experts.down_proj"
    originals = {name: model.get_parameter(name).detach().clone()}
    torch.manual_seed(0)
    high = ExpertUpdate(left=torch.randn(32, 30) * 1e-2, right=torch.randn(4, 30, 24) * 1e-2)  # rank 30 > dense cost
    listed = ExpertUpdate(left=torch.randn(2, 32, 1), right=torch.randn(2, 1, 24) * 1e-2, experts=torch.tensor([3, 0]))
    assert compact(high)[1] and not compact(listed)[1]
    torch.testing.assert_close(compact(high)[0].right, high.dense(4), rtol=1e-5, atol=1e-7)
    for u in (high, listed):
        u.write(adapter, block)
    record_call(EditState.of(model).history, model, [], {}, [(1, high), (1, listed)], originals)
    path = save_edit(model, tmp_path / "p.safetensors")
    assert inspect_edit(path)["layers"][1]["ranks"] == ["dense", 1]
    fresh = copy.deepcopy(base)
    apply_edit(fresh, path)
    assert same_bits(fresh, bits(model))
    revert_edit(fresh, path)
    assert same_bits(fresh, bits(base))


def test_changes_outside_mote_end_the_history(tok, tmp_path, caplog):
    """A host restoring the weights after an edit: save_edit refuses, the next edit starts a new history."""
    caplog.set_level(logging.INFO, logger="mote_plugin.mote.patches.history")
    model = tiny_model(tok)
    adapter = get_adapter(model)
    block = adapter.moe_block(model, 1)
    name = "model.layers.1.mlp.experts.down_proj"
    update = ExpertUpdate(left=torch.randn(32, 1), right=torch.randn(4, 1, 24) * 1e-2)
    history = EditState.of(model).history
    for _ in range(2):
        originals = {name: model.get_parameter(name).detach().clone()}
        update.write(adapter, block)
        record_call(history, model, [], {}, [(1, update)], originals)
        with torch.no_grad():
            model.get_parameter(name).copy_(originals[name])  # the host's restore
    with pytest.raises(ValueError, match="changed outside MoTE"):
        save_edit(model, tmp_path / "p.safetensors")
    assert len(history.calls) == 1  # the second call restarted the history
    assert "restarts" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------------------


def load_dir(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def test_cli_edit_apply_revert_inspect(tok, tmp_path, capsys):
    base_dir, other_dir = tmp_path / "base", tmp_path / "other"
    for seed, d in ((0, base_dir), (1, other_dir)):
        tiny_model(tok, seed=seed).save_pretrained(d)
        tok.save_pretrained(d)
    hp = hparams(tmp_path, preservation_tokens=1000).to_dict()
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(hp))
    (tmp_path / "requests.json").write_text(json.dumps(REQUESTS[:2]))
    patch = tmp_path / "edit.safetensors"
    assert main(["edit", "--hparams", str(tmp_path / "hp.yaml"), "--requests", str(tmp_path / "requests.json"),
                 "--model", str(base_dir), "--out", str(patch), "--save-model", str(tmp_path / "edited")]) == 0
    assert main(["apply", "--model", str(base_dir), "--patch", str(patch), "--out", str(tmp_path / "applied")]) == 0
    assert (tmp_path / "applied" / "tokenizer.json").is_file()
    assert same_bits(load_dir(tmp_path / "applied"), bits(load_dir(tmp_path / "edited")))
    assert main(["revert", "--model", str(tmp_path / "applied"), "--patch", str(patch), "--out",
                 str(tmp_path / "reverted")]) == 0
    assert same_bits(load_dir(tmp_path / "reverted"), bits(load_dir(base_dir)))
    capsys.readouterr()
    assert main(["inspect", str(patch)]) == 0
    out = capsys.readouterr().out
    assert "layer 0: model.layers.0.mlp.experts.down_proj float32" in out and "'English'" in out

    def fails(*argv, match):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err  # transformers' "Loading weights" bar may come first
        last = err.rstrip("\n").split("\n")[-1]
        assert last.startswith(f"mote {argv[0]}: error: ") and match in last and "Traceback" not in err, err

    fails("apply", "--model", str(other_dir), "--patch", str(patch), "--out", str(tmp_path / "x"), match="fingerprint")
    fails("apply", "--model", str(base_dir), "--patch", str(tmp_path / "nope"), "--out", str(tmp_path / "x"),
          match="no such patch")
    fails("apply", "--model", str(tmp_path / "nope"), "--patch", str(patch), "--out", str(tmp_path / "x"),
          match="not a model directory")
    fails("apply", "--model", str(base_dir), "--patch", str(patch), "--out", str(tmp_path / "applied"),
          match="not an empty directory")
    fails("revert", "--model", str(base_dir), "--patch", str(patch), "--out", str(tmp_path / "x"),
          match="needs the edited model")
    fails("inspect", str(tmp_path / "requests.json"), match="not a readable")
    fails("edit", "--hparams", str(tmp_path / "nope.yaml"), "--requests", str(tmp_path / "requests.json"),
          "--model", str(base_dir), "--out", str(tmp_path / "p2"), match="no such hparams file")
    assert not (tmp_path / "x").exists()


def test_fixup_positions_are_stored_as_a_bitmask_or_as_indices_whichever_is_smaller():
    from mote_plugin.mote.patches.files import _fixup_tensors, _read_fixups
    from mote_plugin.mote.patches.history import FixUp

    params = {"w": {"shape": [3, 7, 5], "dtype": "bfloat16"}}  # 105 entries: a bitmask of 14 bytes
    for n, stored in ((3, "index"), (40, "mask")):
        index = torch.randperm(105)[:n].sort().values
        fixups = {"w": FixUp(index, torch.randn(n).bfloat16())}
        tensors = _fixup_tensors("call0.revert", fixups, {"w": 105})
        assert f"call0.revert.w.{stored}" in tensors
        back = _read_fixups(tensors, "call0.revert", ["w"], params)["w"]
        assert torch.equal(back.index, index) and torch.equal(back.values, fixups["w"].values)


def test_sampled_positions_stay_inside_a_real_size_parameter():
    """Qwen3-30B-A3B's down_proj has 128 * 2048 * 768 = 2^27.6 entries: float32 positions would round past the end."""
    from mote_plugin.mote.patches.history import SAMPLE, sample_values

    t = torch.arange(128 * 2048 * 768, dtype=torch.int32)  # [E * d * h], the values are their own positions
    samples = sample_values(t)
    assert samples.shape == (SAMPLE,) and samples[0] == 0 and samples[-1] == float(t.numel() - 1)
