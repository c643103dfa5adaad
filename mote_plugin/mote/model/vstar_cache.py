"""v* targets on disk (YAML `vstar_cache_dir`), so that a request's target is computed once per model and settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .fingerprint import model_fingerprint
from .storage import atomic_save_file


class VStarCache:
    """One safetensors file per (model fingerprint, layer, request, v* settings, source) in `cache_dir`. The key is
    stored in the file and compared on load: an entry computed for other weights (e.g. before an earlier edit) or other
    settings is never reused. Each entry holds z [d] and the final target NLL (NaN where the source does not report
    it)."""

    def __init__(self, cache_dir: str, model, layer: int, settings: dict):
        self.dir = Path(cache_dir)
        self.base = {"model": model_fingerprint(model), "layer": int(layer), "settings": settings}

    def _key(self, request: dict) -> tuple[str, Path]:
        key = json.dumps(self.base | {"request": [request["prompt"], request["subject"], request["target_new"]]},
                         sort_keys=True)
        return key, self.dir / f"vstar-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def load(self, request: dict) -> tuple[torch.Tensor, float] | None:
        key, path = self._key(request)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                return f.get_tensor("z"), float(f.get_tensor("nll"))
        except Exception:
            return None  # unreadable: recomputed and overwritten

    def save(self, request: dict, z: torch.Tensor, nll: float = float("nan")) -> None:
        key, path = self._key(request)
        atomic_save_file({"z": z.detach().float().cpu().contiguous(), "nll": torch.tensor(float(nll))}, path,
                         {"key": key})
