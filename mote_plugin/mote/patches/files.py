"""Edit patches: what MoTE changed in a model, as one safetensors file (format in docs/patches.md).

    save_edit(model, path)      every MoTE call on `model` since it was loaded (or since `MoTEEditor.reset`)
    apply_edit(model, path)     the same base model -> the edited weights, bit-exactly (same machine and dtype)
    revert_edit(model, path)    the edited model -> the base weights, bit-exactly
    inspect_edit(path)          a summary: layers, experts, ranks, sizes, requests

A patch holds per call the writes (`ExpertUpdate` factors, or a dense delta where that is smaller) and the sparse
fix-ups of `history.py`, plus JSON metadata: the base and edited fingerprints, the changed parameters, hparams and
requests, and a sha256 over all of it. `exact=False` applies or reverts a patch on the same model in another dtype
(or whose replay is not bit-exact on this machine), checked within the dtype's rounding on sampled weights.
Every apply / revert is all-or-nothing: on any failure the parameters are restored before the exception propagates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..._version import __version__
from ...adapters import get_adapter
from ..algebra.update import ExpertUpdate
from ..editor import EditState
from ..model import offload
from ..model.blocks import moe_blocks
from ..model.fingerprint import model_fingerprint
from ..model.storage import atomic_save_file
from .history import EditRecord, FixUp, Write, apply_fixups, copy_into, digest, down_param_names, replay, sample_values

log = logging.getLogger(__name__)

FORMAT = "mote-patch"
VERSION = 2  # 2: fingerprints sum each tensor in float64 chunk by chunk (version 1 summed it whole)


@dataclass
class Patch:
    path: Path
    meta: dict  # the JSON metadata (docs/patches.md)
    tensors: dict[str, torch.Tensor]
    calls: list[EditRecord]


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _structure(model: nn.Module) -> str:
    """sha256 of the state dict's names and shapes (not dtypes, not values)."""
    text = "\n".join(f"{n}|{tuple(t.shape)}" for n, t in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()


def _model_summary(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    keys = ("num_hidden_layers", "hidden_size", "num_experts", "num_local_experts", "n_routed_experts",
            "num_experts_per_tok", "moe_intermediate_size", "intermediate_size")
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "name_or_path": getattr(config, "_name_or_path", None),
            **{k: getattr(text, k) for k in keys if isinstance(getattr(text, k, None), int)}}


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(index: torch.Tensor, numel: int) -> torch.Tensor:
    """Positions [n] -> bitmask [ceil(numel / 8)] uint8, most significant bit first."""
    mask = torch.zeros(-(-numel // 8) * 8, dtype=torch.uint8)
    mask[index] = 1
    return (mask.view(-1, 8) * _BITS).sum(1).to(torch.uint8)


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Bitmask [ceil(numel / 8)] uint8 -> ascending positions [n] long."""
    return ((packed[:, None] & _BITS) != 0).reshape(-1)[:numel].nonzero().squeeze(1)


def _fixup_tensors(prefix: str, fixups: dict[str, FixUp], numel: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each fix-up under `<prefix>.<param>.*`: `values`, and the positions as a bitmask `mask` (numel / 8 bytes) when
    that is smaller than `index` (int32 where the parameter allows, 4 bytes a position)."""
    out = {}
    for name, f in fixups.items():
        n = numel[name]
        if n < 32 * f.index.numel():
            out[f"{prefix}.{name}.mask"] = _pack(f.index, n)
        else:
            out[f"{prefix}.{name}.index"] = f.index.to(torch.int32 if n < 2**31 else torch.int64)
        out[f"{prefix}.{name}.values"] = f.values
    return out


def _write_tensors(prefix: str, w: Write) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.right": w.update.right}
    if not w.dense:
        out[f"{prefix}.left"] = w.update.left
    if w.update.experts is not None:
        out[f"{prefix}.experts"] = w.update.experts
    return out


def _checksum(meta: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_edit(model: nn.Module, path: str | Path) -> Path:
    """Write every MoTE call on `model` since it was loaded (or since `MoTEEditor.reset`) to `path` (atomically).

    ValueError when there is nothing to save, or when the edited weights changed outside MoTE since the last call."""
    history = EditState.of(model).history
    if not history.calls:
        raise ValueError("no MoTE edit recorded for this model since it was loaded (or since MoTEEditor.reset)")
    params = offload.values(model, history.base_samples)
    if digest(params) != history.after:
        raise ValueError("the edited weights changed outside MoTE since the last edit (restored by a host?); "
                         "the recorded edits no longer describe this model")
    layers = {w.param: w.layer for call in history.calls for w in call.writes}
    numel = {n: p.numel() for n, p in params.items()}
    tensors, calls = {}, []
    for i, call in enumerate(history.calls):
        for j, w in enumerate(call.writes):
            tensors |= _write_tensors(f"call{i}.write{j}", w)
        tensors |= _fixup_tensors(f"call{i}.revert", call.revert, numel)
        tensors |= _fixup_tensors(f"call{i}.apply", call.apply, numel)
        calls.append({"requests": call.requests, "hparams": call.hparams,
                      "writes": [{"layer": w.layer, "param": w.param, "dense": w.dense} for w in call.writes],
                      "revert": sorted(call.revert), "apply": sorted(call.apply)})
    for n, p in params.items():
        tensors[f"sample.base.{n}"] = history.base_samples[n]
        tensors[f"sample.edited.{n}"] = sample_values(p)
    meta = {"format": FORMAT, "version": VERSION, "mote_plugin": __version__, "torch": torch.__version__,
            "model": _model_summary(model), "structure": _structure(model),
            "base_fingerprint": history.base_fingerprint, "edited_fingerprint": model_fingerprint(model),
            "params": {n: {"layer": layers[n], "shape": list(p.shape), "dtype": _dtype_name(p.dtype)}
                       for n, p in params.items()},
            "calls": calls}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    text = json.dumps(meta)
    return atomic_save_file(tensors, Path(path), {"format": FORMAT, "meta": text, "checksum": _checksum(text, tensors)})


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------


def _read_write(tensors: dict, prefix: str, spec: dict) -> Write:
    right = tensors[f"{prefix}.right"]  # [n, r, h]
    left = torch.eye(right.shape[1]) if spec["dense"] else tensors[f"{prefix}.left"]  # [d, r] or [M, d, r]
    experts = tensors.get(f"{prefix}.experts")  # [M] or None
    return Write(int(spec["layer"]), spec["param"], ExpertUpdate(left=left, right=right, experts=experts),
                 bool(spec["dense"]))


def _read_fixups(tensors: dict, prefix: str, names: list[str], params: dict) -> dict[str, FixUp]:
    out = {}
    for n in names:
        numel = torch.Size(params[n]["shape"]).numel()
        mask = tensors.get(f"{prefix}.{n}.mask")
        index = _unpack(mask, numel) if mask is not None else tensors[f"{prefix}.{n}.index"].long()
        out[n] = FixUp(index, tensors[f"{prefix}.{n}.values"])
        fits = index.numel() == 0 or 0 <= int(index.min()) <= int(index.max()) < numel
        if not fits or index.numel() != out[n].values.numel() or _dtype_name(out[n].values.dtype) != params[n]["dtype"]:
            raise ValueError(f"fix-up {prefix}.{n} does not fit its parameter")
    return out


def load_patch(path: str | Path) -> Patch:
    """Read and check a patch file: FileNotFoundError, or ValueError for anything that is not an intact patch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such patch file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or not safetensors: the library raises several types
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if header.get("format") != FORMAT or "meta" not in header:
        raise ValueError(f"{path}: not a MoTE edit patch")
    if header.get("checksum") != _checksum(header["meta"], tensors):
        raise ValueError(f"{path}: checksum mismatch, the patch is damaged or was modified")
    try:
        meta = json.loads(header["meta"])
        if meta["version"] != VERSION:
            raise ValueError(f"format version {meta['version']}, this mote_plugin reads version {VERSION}")
        calls = [EditRecord(c["requests"], c["hparams"],
                            [_read_write(tensors, f"call{i}.write{j}", w) for j, w in enumerate(c["writes"])],
                            _read_fixups(tensors, f"call{i}.revert", c["revert"], meta["params"]),
                            _read_fixups(tensors, f"call{i}.apply", c["apply"], meta["params"]))
                 for i, c in enumerate(meta["calls"])]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: malformed MoTE patch ({type(e).__name__}: {e})") from None
    return Patch(path, meta, tensors, calls)


# ---------------------------------------------------------------------------------------------------------
# applying and reverting
# ---------------------------------------------------------------------------------------------------------


def _check_write(w: Write, num_experts: int, d: int, h: int) -> None:
    """Shapes of one write against its layer's canonical [E, d, h]."""
    left, right, experts = w.update.left, w.update.right, w.update.experts
    n = num_experts if experts is None else experts.numel()
    ok = (right.dim() == 3 and right.shape[0] == n and right.shape[2] == h and left.shape[-2] == d
          and left.shape[-1] == right.shape[1] and (left.dim() == 2 or (left.dim() == 3 and left.shape[0] == n)))
    if experts is not None:
        ok = ok and experts.dim() == 1 and bool(((experts >= 0) & (experts < num_experts)).all())
    if not ok:
        raise ValueError(f"write to layer {w.layer} does not fit its [E={num_experts}, d={d}, h={h}] experts: "
                         f"left {tuple(left.shape)}, right {tuple(right.shape)}")


def _resolve(model: nn.Module, patch: Patch):
    """(adapter, {layer: block}) for the patch's parameters; ValueError if `model` lacks them."""
    adapter = get_adapter(model)
    wanted = patch.meta["params"]
    blocks = moe_blocks(model, adapter, sorted({int(info["layer"]) for info in wanted.values()}))
    names = down_param_names(model, adapter, blocks)
    for name, info in wanted.items():
        layer = int(info["layer"])
        if names[layer] != name:
            raise ValueError(f"the patch edits {name} (layer {layer}); this model's is {names[layer]}")
        shape = list(model.get_parameter(name).shape)
        if shape != info["shape"]:
            raise ValueError(f"{name}: the patch is for shape {info['shape']}, this model's is {shape}")
    for call in patch.calls:
        for w in call.writes:
            block = blocks[w.layer]
            num_experts, rows, cols = adapter.down_param(block).shape  # [E, d, h], or [E, h, d] when transposed
            _check_write(w, num_experts, cols if adapter.is_transposed else rows, adapter.d_hidden(block))
    return adapter, blocks


def _close_to(params: dict[str, nn.Parameter], patch: Patch, side: str) -> bool:
    """Whether the sampled values of each parameter match the patch's `side` ("base" / "edited") within the rounding
    of the coarser of the two dtypes: |a - b| <= 2 eps |b| + eps max|b| (eps of the coarser dtype)."""
    for name, p in params.items():
        expected = patch.tensors[f"sample.{side}.{name}"]  # [k] float32
        patch_dtype = getattr(torch, patch.meta["params"][name]["dtype"])
        eps = max(torch.finfo(p.dtype).eps, torch.finfo(patch_dtype).eps)
        got = sample_values(p)
        if got.shape != expected.shape:
            return False
        tol = 2 * eps * expected.abs() + eps * expected.abs().max()
        if not bool(((got - expected).abs() <= tol).all()):
            return False
    return True


def _refusal(patch: Patch, params: dict, side: str, fingerprint: str) -> str:
    wanted = patch.meta[f"{side}_fingerprint"]
    msg = (f"{patch.path}: the patch needs the {side} model (fingerprint {wanted}); this model's fingerprint is "
           f"{fingerprint}")
    dtypes = {_dtype_name(p.dtype) for p in params.values()} - {i["dtype"] for i in patch.meta["params"].values()}
    if dtypes:
        msg += (f"; its edited parameters are {', '.join(sorted(dtypes))}: exact=False (--approximate) accepts another "
                "dtype")
    return msg


def _run(model: nn.Module, patch: Patch, forward: bool, exact: bool) -> dict:
    """Apply (forward) or revert the patch, all-or-nothing. Returns {"exact": bit-exact, "fingerprint": after}."""
    start, goal = ("base", "edited") if forward else ("edited", "base")
    adapter, blocks = _resolve(model, patch)
    with offload.resident(blocks.values()):  # offloaded layers: loaded for the replay, stored back at the end
        params = {n: model.get_parameter(n) for n in patch.meta["params"]}
        fingerprint = model_fingerprint(model)
        at_start = fingerprint == patch.meta[f"{start}_fingerprint"]
        if not at_start and (exact or patch.meta["structure"] != _structure(model)
                             or not _close_to(params, patch, start)):
            raise ValueError(_refusal(patch, params, start, fingerprint))
        backup = {n: p.detach().clone() for n, p in params.items()}
        try:
            for call in patch.calls if forward else reversed(patch.calls):
                replay(adapter, blocks, call.writes, reverse=not forward)
                if at_start:  # the fix-ups are exact values of the patch's own dtype and run
                    apply_fixups(params, call.apply if forward else call.revert)
            fingerprint = model_fingerprint(model)
            bit_exact = fingerprint == patch.meta[f"{goal}_fingerprint"]
            if at_start and not bit_exact:
                msg = (f"{patch.path}: replaying the patch did not give the {goal} weights bit-exactly (fingerprint "
                       f"{fingerprint}, expected {patch.meta[f'{goal}_fingerprint']}): another device or library "
                       "version?")
                if exact:
                    raise ValueError(msg + " exact=False (--approximate) accepts it within the rounding tolerance")
                log.warning(msg)
            offload.store(model, params)  # last: nothing after it can fail
        except BaseException:
            copy_into(params, backup)
            raise
    return {"exact": bit_exact, "fingerprint": fingerprint}


def apply_edit(model: nn.Module, path: str | Path, exact: bool = True) -> dict:
    """Apply the patch at `path` to `model` in place. The model must be the patch's base model (same fingerprint);
    the result is then the edited model bit-for-bit (ValueError otherwise). `exact=False` also accepts the base model
    in another dtype (names, shapes and sampled weights checked) and a replay that is not bit-exact here; the weights
    are then within the rounding tolerance of docs/patches.md. Returns {"exact": bool, "fingerprint": str}."""
    return _run(model, load_patch(path), forward=True, exact=exact)


def revert_edit(model: nn.Module, path: str | Path, exact: bool = True) -> dict:
    """Undo the patch at `path` on `model` in place: the model must be at the patch's edited fingerprint; the result
    is the base model bit-for-bit. `exact=False` as in `apply_edit`. Returns {"exact": bool, "fingerprint": str}."""
    return _run(model, load_patch(path), forward=False, exact=exact)


# ---------------------------------------------------------------------------------------------------------
# inspecting
# ---------------------------------------------------------------------------------------------------------


def _touched(w: Write) -> set[int]:
    """Experts a write changes: the listed ones, or those whose right factor is not zero."""
    if w.update.experts is not None:
        return set(w.update.experts.tolist())
    return set(torch.nonzero(w.update.right.flatten(1).abs().amax(1)).flatten().tolist())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def inspect_edit(path: str | Path) -> dict:
    """Summary of a patch: model, fingerprints, requests, per layer the experts touched and write ranks, and bytes
    (factors, fix-ups, file) next to the dense delta of the changed parameters in their dtype."""
    patch = load_patch(path)
    meta, tensors = patch.meta, patch.tensors
    layers = {}
    for name, info in meta["params"].items():
        writes = [w for call in patch.calls for w in call.writes if w.param == name]
        layers[int(info["layer"])] = {
            "param": name, "dtype": info["dtype"], "shape": info["shape"], "writes": len(writes),
            "ranks": [w.update.right.shape[1] if not w.dense else "dense" for w in writes],
            "experts_touched": sorted(set().union(*(_touched(w) for w in writes))),
        }
    dense = sum(torch.Size(i["shape"]).numel() * getattr(torch, i["dtype"]).itemsize for i in meta["params"].values())
    fixups = sum(_nbytes(t) for k, t in tensors.items() if ".revert." in k or ".apply." in k)
    samples = sum(_nbytes(t) for k, t in tensors.items() if k.startswith("sample."))
    return {
        "path": str(patch.path), "format_version": meta["version"], "model": meta["model"],
        "base_fingerprint": meta["base_fingerprint"], "edited_fingerprint": meta["edited_fingerprint"],
        "calls": len(patch.calls), "requests": [r for call in patch.calls for r in call.requests],
        "layers": dict(sorted(layers.items())),
        "bytes": {"file": patch.path.stat().st_size,
                  "factors": sum(_nbytes(t) for t in tensors.values()) - fixups - samples,
                  "fixups": fixups, "samples": samples, "dense_delta": dense},
    }
