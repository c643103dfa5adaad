"""MoTE behind EasyEdit's editor contract: `apply_mote_to_model` (the host's `ALG_DICT["MoTE"]`), `last_timings` and
`last_coverage`.

Both are thin: the edit is `MoTEEditor.edit` (editor.py), and what is kept between calls on one model (bases,
sequential memory, timings, edit history) is that model's `EditState`, so sequential EasyEdit calls build on each other.
"""

from __future__ import annotations

import copy as copy_module

from .editor import EditState, MoTEEditor
from .hparams import MoTEHyperParams
from .model.requests import normalise_requests


def apply_mote_to_model(model, tok, requests, hparams: MoTEHyperParams, copy: bool = False,
                        return_orig_weights: bool = False, keep_original_weight: bool = False, **kwargs):
    """EasyEdit's apply function: edit `model` (in place, or a deep copy when `copy`) with MoTE.

    Returns (model, weights_copy): weights_copy maps the names of the parameters MoTE changes to their
    original tensors when `return_orig_weights` (the host restores them from it), else {}. All-or-nothing:
    if anything fails, every changed parameter is restored bit-exactly before the exception propagates.
    `precomputed_targets={request_key(r): z}` supplies v* targets (e.g. computed once on the unedited model, see
    `MoTEEditor.targets`). Other keyword arguments (the host passes e.g. `train_ds`) are ignored.
    """
    if not isinstance(hparams, MoTEHyperParams):
        alg = getattr(hparams, "alg_name", type(hparams).__name__)
        raise ValueError(f"apply_mote_to_model needs MoTEHyperParams, got hyper-parameters for {alg!r}")
    hparams.torch_device()  # a device this torch cannot use is bad input, refused before anything else
    requests = normalise_requests(requests)
    if not requests:
        return model, {}
    if copy:
        model = copy_module.deepcopy(model)
    result = MoTEEditor(model, tok, hparams).edit(requests, precomputed_targets=kwargs.get("precomputed_targets"))
    return model, (result.originals if return_orig_weights else {})


def last_timings(model) -> dict:
    """Seconds per stage of the last successful MoTE edit of `model`: statistics (one-time per layer and basis
    settings; ~0 when cached), vstar, capture, solve, writeback."""
    timings = EditState.of(model).timings
    if not timings:
        raise ValueError("no MoTE edit has been applied to this model yet")
    return dict(timings[-1])


def last_edited(model) -> int:
    """How many requests the last successful MoTE edit of `model` edited (those whose v* reached its target, unless
    `v_keep_failed`)."""
    state = EditState.of(model)
    if not state.timings:
        raise ValueError("no MoTE edit has been applied to this model yet")
    return state.last_edited


def last_coverage(model) -> list[dict]:
    """What each solve of the last successful MoTE edit of `model` could carry, one dict per solve (coverage.py): the
    solve `layer`, its `edits`, the `ranks` (r_e, r_out, r_in) solved in (None for the unstructured solvers), and the
    {mean, min} over the edits of `residual_in_U_out`, `keys_in_U_in`, `gates_in_U_e` and `reproduced` (the share of
    each residual the written update reproduces at that layer)."""
    state = EditState.of(model)
    if not state.timings:
        raise ValueError("no MoTE edit has been applied to this model yet")
    return [c.to_dict() for c in state.last_coverage]
