"""All-or-nothing: a failure (exception or KeyboardInterrupt) injected at every stage of an edit leaves the weights
bit-identical, the sequential memory and history as they were, no half-written cache file, and the next edit works."""

import pytest
import torch

from mote_plugin.mote import editor
from mote_plugin.mote.algebra import solvers
from mote_plugin.mote.algebra.update import ExpertUpdate
from mote_plugin.mote.editor import MoTEEditor
from mote_plugin.mote.model import stats, storage
from mote_plugin.mote.mote_main import apply_mote_to_model
from test_mote_main import REQUESTS, hparams, same, state, tiny_model, tok  # noqa: F401 (tok: the fixture)


class Injected(Exception):
    pass


def failing_after(real, calls_before_failure: int, error: type[BaseException]):
    """`real`, except that call number `calls_before_failure + 1` raises `error`."""
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls_before_failure:
            raise error("injected")
        return real(*args, **kwargs)

    return wrapper


# (stage, module, attribute, calls that succeed before the failure)
STAGES = [
    ("statistics", stats, "layer_statistics", 0),
    ("statistics cache write", storage, "save_file", 0),
    ("capture", editor, "capture", 0),
    ("v*", editor, "compute_targets", 0),
    ("solve", solvers, "solve_core", 0),
    ("writeback, first layer", ExpertUpdate, "write", 0),
    ("writeback, second layer", ExpertUpdate, "write", 1),
    ("edit history", editor, "record_call", 0),
]


@pytest.mark.parametrize("error", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("spread", ["core", "residual"])
@pytest.mark.parametrize("stage,module,name,ok_calls", STAGES, ids=[s[0] for s in STAGES])
def test_failure_at_every_stage_changes_nothing(tok, tmp_path, monkeypatch, stage, module, name, ok_calls, spread,
                                                error):
    model = tiny_model(tok)
    hp = hparams(tmp_path, spread=spread, sequential_memory=True)
    apply_mote_to_model(model, tok, REQUESTS[:2], hp)  # a first, successful edit: memory and history exist
    st = MoTEEditor(model)
    before, memory, calls = state(model), {k: v.clone() for k, v in st.memory.items()}, len(st.history.calls)
    if stage.startswith("statistics"):
        hp = hparams(tmp_path, spread=spread, sequential_memory=True, preservation_tokens=2000)  # new stats needed
    real = getattr(module, name)
    monkeypatch.setattr(module, name, failing_after(real, ok_calls, error))
    with pytest.raises(error):
        apply_mote_to_model(model, tok, REQUESTS[2:], hp)
    monkeypatch.setattr(module, name, real)
    assert same(model, before), f"weights changed by a failure at {stage}"
    assert st.memory.keys() == memory.keys() and all(torch.equal(st.memory[k], memory[k]) for k in memory)
    assert len(st.history.calls) == calls
    assert not [p.name for p in (tmp_path / "stats").iterdir() if p.suffix == ".tmp" or ".tmp" in p.name]
    apply_mote_to_model(model, tok, REQUESTS[2:], hp)  # and the next edit works
    assert not same(model, before)


def test_each_solver_fails_cleanly(tok, tmp_path, monkeypatch):
    for solver, name in (("global", "global_solve"), ("bcd", "bcd_solve")):
        model = tiny_model(tok)
        before = state(model)
        monkeypatch.setattr(solvers, name, failing_after(getattr(solvers, name), 0, KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            apply_mote_to_model(model, tok, REQUESTS, hparams(tmp_path, solver=solver, spread="layerwise"))
        monkeypatch.undo()
        assert same(model, before), solver


def test_interrupted_cache_write_leaves_no_file(tmp_path, monkeypatch):
    """The atomic writer: a failure inside safetensors' save leaves neither the target nor a temporary file."""
    monkeypatch.setattr(storage, "save_file", failing_after(storage.save_file, 0, KeyboardInterrupt))
    target = tmp_path / "cache" / "layer0.safetensors"
    with pytest.raises(KeyboardInterrupt):
        storage.atomic_save_file({"x": torch.ones(3)}, target, {"key": "k"})
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    storage.atomic_save_file({"x": torch.ones(3)}, target, {"key": "k"})
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["layer0.safetensors"]
