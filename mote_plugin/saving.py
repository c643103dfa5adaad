"""Saving an edited model as its source checkpoint with only the edited tensors rewritten (`mote edit --save-model`,
`mote apply`, `mote revert`, `save_model`).

`save_pretrained` writes the model as loaded, which is not always the checkpoint it came from: an image-text
checkpoint loaded as a causal LM (Qwen3.6-35B-A3B) loses its vision tower, its `mtp.*` tensors and its config, and
de-quantized MXFP4 experts (GPT-OSS-20B) are written in bf16 at 3-4x the size. Here the output is the source directory
file by file: every file, tensor and config entry as it was, except the tensors that hold the edited parameters,
written in the source's own names, layout and dtype (transformers' own reverse of its load-time conversions: packed
experts back to one tensor per expert, `model.` back to `model.language_model.`). A parameter the source stores
quantized (MXFP4 `*_blocks` / `*_scales`) cannot be written back in that form without losing the edit: its module is
written de-quantized, in the model's dtype, and named in the config's `quantization_config.modules_to_not_convert` so
that transformers loads it as such; every other module keeps its quantization. The result says what was written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"


class _Checkpoint:
    """A safetensors checkpoint directory: which file holds each tensor, and each tensor's dtype and shape."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        index = src / INDEX
        indexed = index.is_file()
        self.weight_map = dict(json.loads(index.read_text())["weight_map"]) if indexed else {}
        files = sorted(set(self.weight_map.values())) if indexed else sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{src}: no safetensors checkpoint (model.safetensors or {INDEX}); the edited model "
                             "can be written only over a safetensors checkpoint")
        self.src = src
        self.info = {}  # one read of each file's header: every tensor's dtype and shape (and its file, unindexed)
        for file in files:
            with safe_open(src / file, "pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    self.info[key] = (s.get_dtype(), list(s.get_shape()))
                    if not indexed:
                        self.weight_map[key] = file


def _metadata(file: Path) -> dict[str, str]:
    """The safetensors header metadata of `file` (transformers writes {"format": "pt"})."""
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return f.metadata() or {"format": "pt"}


def _disk_tensors(model, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parameter `name` of `model` as its checkpoint stores it: {on-disk name: tensor} (transformers' reverse of
    the conversions it applied on load)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, {name: value.detach().to("cpu")}))


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _nbytes(dtype: str, shape: list[int]) -> int:
    return _SAFETENSORS_BYTES.get(dtype, 1) * math.prod(shape)


def edited_tensors(model, ckpt: _Checkpoint, names: Iterable[str]) -> tuple[dict[str, torch.Tensor], set[str],
                                                                            list[str]]:
    """What writing `names` (parameters of `model`) into the checkpoint `ckpt` changes: (tensors to write by on-disk
    name, on-disk names to drop, modules written de-quantized). ValueError, before anything is written, for a
    parameter the checkpoint holds in no form this can write."""
    config = json.loads((ckpt.src / "config.json").read_text())
    quantized = (config.get("quantization_config") or {}).get("quant_method")
    params = dict(model.named_parameters())
    write, drop, dequantized = {}, set(), []
    for name in names:
        for key, value in _disk_tensors(model, name, params[name]).items():
            if key in ckpt.info:
                dtype, shape = ckpt.info[key]
                if list(value.shape) != shape or dtype not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{key}: the checkpoint stores {dtype} {shape}, the edited parameter {name} "
                                     f"gives {list(value.shape)}: cannot write the edit in the checkpoint's layout")
                write[key] = value.to(_SAFETENSORS_DTYPES[dtype])
            elif quantized == "mxfp4" and f"{key}_blocks" in ckpt.info:
                module = name.rpartition(".")[0]  # the experts module, in the model's names
                for pname, p in model.get_submodule(module).named_parameters():
                    write |= _disk_tensors(model, f"{module}.{pname}", p)
                disk_module = key.rpartition(".")[0]
                drop |= {k for k in ckpt.info if k.rpartition(".")[0] == disk_module and k.endswith(("_blocks",
                                                                                                     "_scales"))}
                dequantized.append(disk_module)
            else:
                raise ValueError(f"{name}: the source checkpoint has no tensor {key!r} (nor a quantized form of it), "
                                 "so the edit cannot be written in its layout")
    return write, drop, sorted(set(dequantized))


def save_model(model, src: str | Path, out: str | Path, names: Iterable[str]) -> dict:
    """Write into `out` (new, or an empty directory) the checkpoint at `src` with the parameters `names` of `model`
    (the edited ones) in place of their stored values: every other file, tensor and config entry of `src` as it was
    (module docstring). Written to a temporary directory beside `out` and renamed, so `out` is complete or absent.

    Returns {"written": on-disk names rewritten, "dropped": on-disk names removed (quantized forms), "dequantized":
    modules now stored de-quantized (added to `quantization_config.modules_to_not_convert`)}."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    ckpt = _Checkpoint(src)
    write, drop, dequantized = edited_tensors(model, ckpt, names)
    touched = {ckpt.weight_map[k] for k in (set(write) | drop) if k in ckpt.weight_map}
    new_keys = [k for k in write if k not in ckpt.weight_map]  # a de-quantized module's, beside its dropped blocks
    home = {k: ckpt.weight_map[min(drop)] for k in new_keys} if new_keys else {}
    touched |= set(home.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp"))
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in touched:
                shutil.copy2(f, tmp / f.name)
        weight_map = {k: v for k, v in ckpt.weight_map.items() if k not in drop} | home
        for file in sorted(touched):
            tensors = {k: v for k, v in load_file(src / file).items() if k not in drop}
            tensors |= {k: v.contiguous() for k, v in write.items() if weight_map.get(k) == file}
            save_file(tensors, tmp / file, metadata=_metadata(src / file))
        if (src / INDEX).is_file():
            index = json.loads((src / INDEX).read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            sizes = {k: v.numel() * v.element_size() for k, v in write.items()}
            index.setdefault("metadata", {})["total_size"] = sum(
                sizes[k] if k in sizes else _nbytes(*ckpt.info[k]) for k in weight_map)
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        if dequantized:
            config = json.loads((src / "config.json").read_text())
            kept = config["quantization_config"].setdefault("modules_to_not_convert", []) or []
            config["quantization_config"]["modules_to_not_convert"] = kept + [m for m in dequantized if m not in kept]
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"written": sorted(write), "dropped": sorted(drop), "dequantized": dequantized}
