"""What MoTE changed in a model, kept per model so that it can be saved as an edit patch (`patches/files.py`).

Every successful edit (`MoTEEditor.edit`, `apply_mote_to_model`) appends an `EditRecord`: its requests and
hyper-parameters, its writes in order (layer, parameter name, `ExpertUpdate` on the CPU in float32) and two sparse
fix-ups per changed parameter:

    revert  entries where replaying the writes backwards (param - delta, last write first) misses the weights
            before the call, with those weights' values
    apply   entries where replaying the writes forwards onto the weights before the call misses the edited weights,
            with the edited values (normally none: the replay is the edit's own computation)

Replays go through `ExpertUpdate.write` (the adapter's `add_lowrank`: float32 delta, one cast, in-place add), so on
the machine and dtype that made the edit, replay + fix-up gives back each side bit-exactly by construction.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ...adapters import get_adapter
from ..algebra.update import ExpertUpdate
from ..model import offload
from ..model.blocks import moe_blocks
from ..model.fingerprint import tensors_fingerprint

log = logging.getLogger(__name__)

SAMPLE = 64  # values per changed parameter kept to recognise the base model in another dtype


@dataclass
class Write:
    layer: int
    param: str  # name of the layer's packed down-projection parameter
    update: ExpertUpdate  # CPU float32
    dense: bool = False  # update.right holds the dense delta [E or M, d, h], update.left is the identity [d, d]


@dataclass
class FixUp:
    index: torch.Tensor  # [n] flat positions in the parameter (int32 where it has fewer than 2^31 entries)
    values: torch.Tensor  # [n] the values to put there, in the parameter's dtype


@dataclass
class EditRecord:
    requests: list[dict]
    hparams: dict
    writes: list[Write]
    revert: dict[str, FixUp]  # parameter name -> fix-up after the backward replay (only where needed)
    apply: dict[str, FixUp]  # parameter name -> fix-up after the forward replay (only where needed)


@dataclass
class EditHistory:
    """The successful calls on one model since it was loaded (or since `MoTEEditor.reset`)."""

    calls: list[EditRecord] = field(default_factory=list)
    base_fingerprint: str | None = None  # `model_fingerprint` before the first call
    base_samples: dict[str, torch.Tensor] = field(default_factory=dict)  # every changed parameter -> [SAMPLE] float32
    after: str | None = None  # fingerprint of the changed parameters after the last call (to notice outside changes)


# ---------------------------------------------------------------------------------------------------------
# helpers shared with the patch files
# ---------------------------------------------------------------------------------------------------------


def down_param_names(model: nn.Module, adapter, blocks: dict[int, nn.Module]) -> dict[int, str]:
    """{layer: name of the block's packed down-projection parameter}."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {layer: names[id(adapter.down_param(block))] for layer, block in blocks.items()}


def sample_values(t: torch.Tensor, k: int = SAMPLE) -> torch.Tensor:
    """[min(k, numel)] float32 CPU values of t at k evenly spaced flat positions (fixed by t's size)."""
    flat = t.detach().reshape(-1)
    # float64: float32 positions round past the end beyond 2^24 elements (a real layer's down_proj has 2^27-2^28)
    index = torch.linspace(0, flat.numel() - 1, min(k, flat.numel()), dtype=torch.float64).round().long()
    return flat[index.to(flat.device)].to("cpu", torch.float32)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """`model_fingerprint` of some named tensors (order-independent)."""
    return tensors_fingerprint(sorted(tensors.items()))


def replay(adapter, blocks: dict[int, nn.Module], writes: list[Write], reverse: bool = False) -> None:
    """Add the writes in order, or (`reverse`) subtract them last first, through `ExpertUpdate.write`."""
    for w in reversed(writes) if reverse else writes:
        (w.update.scaled(-1.0) if reverse else w.update).write(adapter, blocks[w.layer])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t flattened and viewed as integers of its width: compares signed zeros and NaNs bit by bit."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().reshape(-1).view(ints[t.element_size()])


def fixup(current: torch.Tensor, wanted: torch.Tensor) -> FixUp | None:
    """Where `current` differs bitwise from `wanted`, with wanted's values (CPU), or None where nothing differs."""
    index = (_bits(current) != _bits(wanted)).nonzero().squeeze(1)  # [n]
    if index.numel() == 0:
        return None
    values = wanted.detach().reshape(-1)[index].cpu()
    return FixUp(index=index.to("cpu", torch.int32 if current.numel() < 2**31 else torch.int64), values=values)


def apply_fixups(params: dict[str, nn.Parameter], fixups: dict[str, FixUp]) -> None:
    with torch.no_grad():
        for name, f in fixups.items():
            p = params[name]
            p.view(-1)[f.index.to(p.device)] = f.values.to(p.device, p.dtype)


def copy_into(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])


# ---------------------------------------------------------------------------------------------------------
# recording a call
# ---------------------------------------------------------------------------------------------------------


def compact(update: ExpertUpdate) -> tuple[ExpertUpdate, bool]:
    """A CPU float32 copy of the update as factors or, where fewer numbers, as its dense delta; returns (update, dense).

    Dense: right [n, d, h] = left @ right (n = E, or M listed experts) and left the identity [d, d].
    """
    left = update.left.detach().to("cpu", torch.float32, copy=True)  # [d, r] or [M, d, r]
    right = update.right.detach().to("cpu", torch.float32, copy=True)  # [n, r, h]
    experts = None if update.experts is None else update.experts.detach().to("cpu", torch.long, copy=True)  # [M]
    n, _, h = right.shape
    d = left.shape[-2]
    if left.numel() + right.numel() <= n * d * h:
        return ExpertUpdate(left=left, right=right, experts=experts), False
    return ExpertUpdate(left=torch.eye(d), right=torch.matmul(left, right), experts=experts), True  # right [n, d, h]


def _fixups(adapter, blocks, params, originals, writes) -> tuple[dict[str, FixUp], dict[str, FixUp]]:
    """Replay the writes backwards from the edited weights and forwards from the originals, on the parameters
    themselves, and return the (revert, apply) fix-ups; the parameters end as edited, bit-exactly."""
    edited = {n: p.detach().clone() for n, p in params.items()}
    try:
        replay(adapter, blocks, writes, reverse=True)
        revert = {n: f for n, p in params.items() if (f := fixup(p, originals[n])) is not None}
        copy_into(params, originals)
        replay(adapter, blocks, writes)
        apply = {n: f for n, p in params.items() if (f := fixup(p, edited[n])) is not None}
    finally:
        copy_into(params, edited)
    return revert, apply


def _jsonable(obj):
    """obj as JSON data; what JSON cannot hold (a model object in `model_name`) becomes "<TypeName>"."""
    return json.loads(json.dumps(obj, default=lambda o: f"<{type(o).__name__}>"))


def record_call(history: EditHistory, model: nn.Module, requests: list[dict], hparams: dict,
                writes: list[tuple[int, ExpertUpdate]], originals: dict[str, torch.Tensor], adapter=None,
                blocks: dict[int, nn.Module] | None = None) -> None:
    """Append a successful call to `history`: `writes` as written (layer, ExpertUpdate), `originals` the changed
    parameters before the call; `adapter` and `blocks` (layer -> MoE block) those of the edit, looked up when not
    given. If the changed parameters were modified outside MoTE since the last recorded call (e.g. a host restored
    them), the history restarts with this call. History is only changed at the end."""
    if not writes:
        return
    if adapter is None or blocks is None:
        adapter = get_adapter(model)
        blocks = moe_blocks(model, adapter, sorted({layer for layer, _ in writes}))
    names = down_param_names(model, adapter, blocks)
    params = {n: model.get_parameter(n) for n in originals}
    fresh = not history.calls
    before = offload.values(model, set(history.base_samples) - set(originals)) | originals
    if not fresh and digest({n: before[n] for n in history.base_samples}) != history.after:
        log.info("MoTE: the edited weights were changed outside MoTE since the last edit (e.g. restored by a host); "
                 "the edit history (what save_edit writes) restarts with this call")
        fresh = True
    recorded = [Write(layer, names[layer], *compact(u)) for layer, u in writes]
    revert, apply = _fixups(adapter, blocks, params, originals, recorded)
    base_fingerprint = history.base_fingerprint
    if fresh:
        base_fingerprint = tensors_fingerprint((n, originals.get(n, t)) for n, t in offload.state_items(model))
    samples = {} if fresh else dict(history.base_samples)
    samples.update({w.param: sample_values(originals[w.param]) for w in recorded if w.param not in samples})
    record = EditRecord(_jsonable(requests), _jsonable(hparams), recorded, revert, apply)
    after = digest(offload.values(model, samples))
    if fresh:
        history.calls.clear()
    history.calls.append(record)
    history.base_fingerprint, history.base_samples, history.after = base_fingerprint, samples, after
