"""v*: the target hidden state z at the lookup token of the last edited layer (MEMIT's compute_z).

A vector delta is added to the output of decoder layer `layer` at the lookup token of the rewrite
prompt (behind a few context prefixes), and optimised with Adam so the model predicts `target_new`:

    loss = NLL(target_new | prompt, delta) + kl_factor * KL(P_orig || P_delta on "{subject} is a")
           + v_weight_decay * ||delta||^2 / ||h||^2,       ||delta|| <= clamp_norm_factor * ||h||

z = h + delta, with h the layer's original output at the lookup token. Used when no EasyEdit host is
importable (with a host, the host's compute_z is used instead), and by the fact model's probes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..metrics import target_token_ids
from .capture import input_device
from .lookup import encode_with_lookup, pad_right


@dataclass
class VStarConfig:
    layer_module_tmp: str = "model.layers.{}"
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    max_length: int | None = None


@dataclass
class VStar:
    z: torch.Tensor  # [d_model] target output of the layer at the lookup token
    delta: torch.Tensor  # [d_model] z - h
    nll: float  # final target NLL (per token)
    steps: int


def _add_at(positions: torch.Tensor, vector: torch.Tensor):
    """Forward hook adding `vector` [d] to the layer output at one position per row."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # [B, S, d]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden = hidden.clone()
        hidden[rows, positions.to(hidden.device)] += vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def compute_z(model, tok, request: dict, layer: int, cfg: VStarConfig, context_templates: list[str] = ("{}",)) -> VStar:
    """v* for one EasyEdit request (`prompt` containing `subject`, `target_new`)."""
    device = input_device(model)
    subject, target = request["subject"], request["target_new"]
    target_ids = target_token_ids(tok, target)
    prompts = [ctx.format(request["prompt"]) for ctx in context_templates]
    n = len(prompts)
    batch, lookup, _ = encode_with_lookup(tok, prompts + [f"{subject} is a"], [subject] * (n + 1), cfg.fact_token, cfg.max_length)
    # rewrite rows continue with the target's first tokens, so every target token is predicted once;
    # the last row is the KL prompt, whose next-token distribution should not move
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = [batch["input_ids"][i, : lengths[i]].tolist() + (target_ids[:-1] if i < n else []) for i in range(n + 1)]
    padded = pad_right(rows, tok.pad_token_id)
    ids, mask, lookup = padded["input_ids"].to(device), padded["attention_mask"].to(device), lookup.to(device)
    tgt = torch.tensor(target_ids, device=device)  # [t]
    # the logits at position len_i - 1 + j predict target token j of rewrite row i
    pos = torch.tensor([[lengths[i] - 1 + j for j in range(len(target_ids))] for i in range(n)], device=device)  # [n, t]
    kl_pos = lengths[n] - 1

    module = model.get_submodule(cfg.layer_module_tmp.format(layer))
    with torch.no_grad():
        captured = {}
        handle = module.register_forward_hook(lambda m, a, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o)))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        handle.remove()
        h = captured["h"][0, lookup[0]].float().detach()  # [d]
        kl_ref = torch.log_softmax(logits[n, kl_pos].float(), -1).detach()  # [V]

    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    max_norm = cfg.clamp_norm_factor * h.norm()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    nll = float("nan")
    step = 0
    try:
        for step in range(1, cfg.v_num_grad_steps + 1):
            handle = module.register_forward_hook(_add_at(lookup, delta))
            try:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # [B, S, V]
            finally:
                handle.remove()
            logp = torch.log_softmax(logits, -1)
            nll_t = -logp[torch.arange(n, device=device)[:, None], pos, tgt[None, :]].mean()
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits[n, kl_pos], -1), kl_ref, log_target=True, reduction="sum")
            loss = nll_t + cfg.kl_factor * kl + cfg.v_weight_decay * delta.norm() ** 2 / h.norm() ** 2
            nll = nll_t.item()
            if nll < 5e-2:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    delta = delta.detach()
    return VStar(z=h + delta, delta=delta, nll=nll, steps=step)


def add_vector_hook(model, layer_module_tmp: str, layer: int, positions: torch.Tensor, vector: torch.Tensor):
    """Install a hook adding `vector` at `positions` (one per row) of a layer's output; returns the remover."""
    handle = model.get_submodule(layer_module_tmp.format(layer)).register_forward_hook(_add_at(positions, vector))
    return handle.remove


class VStarCache:
    """v* targets on disk, one safetensors file per (model fingerprint, layer, request, v* settings, source) in
    `cache_dir` (YAML `vstar_cache_dir`). The key is stored in the file and compared on load: an entry computed for
    other weights (e.g. before an earlier edit) or other settings is never reused."""

    def __init__(self, cache_dir: str, model, layer: int, settings: dict):
        from .stats import model_fingerprint

        self.dir = Path(cache_dir)
        self.base = {"model": model_fingerprint(model), "layer": int(layer), "settings": settings}

    def _key(self, request: dict) -> tuple[str, Path]:
        key = json.dumps(self.base | {"request": [request["prompt"], request["subject"], request["target_new"]]}, sort_keys=True)
        return key, self.dir / f"vstar-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def load(self, request: dict) -> torch.Tensor | None:
        key, path = self._key(request)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                return f.get_tensor("z")
        except Exception:
            return None  # unreadable: recomputed and overwritten

    def save(self, request: dict, z: torch.Tensor) -> None:
        from .stats import atomic_save_file

        key, path = self._key(request)
        atomic_save_file({"z": z.detach().float().cpu().contiguous()}, path, {"key": key})
