"""Writing files a reader may open at the same time: atomically, or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """safetensors `save_file` to a temporary file in the same directory, then `os.replace`: a reader never sees a
    half-written file, and an interrupted write leaves no file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
