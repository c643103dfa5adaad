"""The edit state follows the weights: when the weights MoTE last wrote are restored (EasyEdit's edit() restores them
after every request) or replaced (`load_state_dict`), what was built on them is dropped before the next edit, so an
edit after a restore is the edit of a fresh model; edits that stay (sequential editing) still accumulate."""

import copy
import logging

import pytest
import torch

from mote_plugin.mote.editor import MoTEEditor
from mote_plugin.mote.mote_main import apply_mote_to_model, last_edited
from test_mote_main import REQUESTS, hparams, state, tiny_model, tok  # noqa: F401  (tok: a fixture)

A, B = REQUESTS[:2], REQUESTS[2:]


def restore(model, weights_copy):
    """As EasyEdit's restore_after_edit does: copy each original into its parameter by name."""
    with torch.no_grad():
        for name, value in weights_copy.items():
            model.get_parameter(name)[...] = value


def edited(model, before):
    return {k: v for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("memory", [False, True])
def test_edit_after_a_restore_is_the_edit_of_a_fresh_model(tok, tmp_path, memory, caplog):
    hp = hparams(tmp_path, sequential_memory=memory, lambda_growth=0.5)  # the edit count would change lambda
    model = tiny_model(tok)
    fresh = copy.deepcopy(model)  # a copy starts without edit state
    before = state(model)
    _, weights_copy = apply_mote_to_model(model, tok, A, hp, return_orig_weights=True)
    assert MoTEEditor(model).state.edits == 2 and (MoTEEditor(model).memory != {}) == memory
    restore(model, weights_copy)
    with caplog.at_level(logging.INFO, logger="mote_plugin.mote.editor"):
        apply_mote_to_model(model, tok, B, hp)
    assert sum("changed outside it (restored)" in r.getMessage() for r in caplog.records) == 1
    apply_mote_to_model(fresh, tok, B, hp)
    after, expected = edited(model, before), edited(fresh, before)
    assert after.keys() == expected.keys() and after
    for name, value in after.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    state_ = MoTEEditor(model).state
    assert state_.edits == 2 and len(state_.timings) == 1 and len(state_.history.calls) == 1
    assert last_edited(model) == 2


def test_sequential_edits_still_accumulate(tok, tmp_path, caplog):
    hp = hparams(tmp_path, sequential_memory=True)
    model = tiny_model(tok)
    fresh = copy.deepcopy(model)
    before = state(model)
    with caplog.at_level(logging.INFO, logger="mote_plugin.mote.editor"):
        apply_mote_to_model(model, tok, A, hp)
        apply_mote_to_model(model, tok, B, hp)
    assert not any("changed outside it" in r.getMessage() for r in caplog.records)
    editor = MoTEEditor(model)
    assert editor.state.edits == 4 and len(editor.timings) == 2 and len(editor.history.calls) == 2
    apply_mote_to_model(fresh, tok, B, hp)
    # B after A (memory of A's keys in the solve, on A's weights) is not B on the fresh model
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in edited(model, before).items())


def test_other_weights_loaded_drop_the_bases_too(tok, tmp_path, caplog):
    hp = hparams(tmp_path, sequential_memory=True)
    model, other = tiny_model(tok), tiny_model(tok, seed=1)
    apply_mote_to_model(model, tok, A, hp)
    model.load_state_dict(other.state_dict())
    with caplog.at_level(logging.INFO, logger="mote_plugin.mote.editor"):
        apply_mote_to_model(model, tok, B, hp)
    assert sum("changed outside it (other values)" in r.getMessage() for r in caplog.records) == 1
    before = state(other)
    apply_mote_to_model(other, tok, B, hp)  # bases, templates and memory of `other` itself
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, other.state_dict()[name], rtol=0, atol=1e-6)
    assert edited(other, before)
