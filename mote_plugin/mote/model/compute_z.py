"""v*: the target output z of the last edited layer at each request's lookup token, a whole batch at once.

MEMIT's compute_z (EasyEdit `easyeditor/models/memit/compute_z.py`) with one delta per request, optimised together.
Request t gets a vector delta_t [d] added to the output of decoder layer `layer` at the lookup token of each of its
rows: the rewrite prompt behind each context template followed by the target's first tokens, and the KL prompt
"{subject} is a". Adam minimises, per request, EasyEdit's compute_z objective term for term:

    loss_t = NLL_t + kl_factor * KL(P_delta || P_0)  +  v_weight_decay * ||delta_t|| / ||h_t||^2

with the KL at the lookup token of "{subject} is a"; the request stops when loss_t < 5e-2.

NLL_t: the mean over the request's rewrite rows of the target's summed token NLL over its length, read from the
output of layer `loss_layer` (v_loss_layer; -1 = the last) through the final norm and the output head. At most
`v_num_grad_steps` evaluations, one Adam step after each but the last; after each step
||delta_t|| <= clamp_norm_factor * ||h_t||. h_t: the layer's output at the lookup token of the plain prompt;
z_t = h_t + delta_t.

Requests never interact (a row sees one delta, a token's computation only its own row) and Adam's update is
elementwise, so the batch gives each request the z it gets alone, up to float summation order; a stopped request keeps
its delta while the others go on. Speed: layers 0..layer do not depend on delta, so one clean forward records their
output and the inputs of the layers above, and each step replays only the layers above `layer`, then the norm and the
output head at the positions the loss reads (not at every token).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .capture import input_device
from .hooks import hidden_states, recorded
from .lookup import encode_with_lookup, pad_right, target_token_ids

STOP_LOSS = 5e-2  # MEMIT's early stop
FAILED_NLL = math.log(2)  # a v* whose final target NLL per token is above this left P(target token) below 1/2


@dataclass
class VStarConfig:
    layer_module_tmp: str = "model.layers.{}"
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_loss_layer: int = -1  # -1: the last decoder layer
    ln_f_module: str = "model.norm"
    lm_head_module: str = "lm_head"  # a module with `.weight` [V, d] (a tied head: the input embeddings)
    max_length: int | None = None


@dataclass
class VStarBatch:
    z: torch.Tensor  # [T, d] target output of the layer at each request's lookup token
    delta: torch.Tensor  # [T, d] z - h
    nll: torch.Tensor  # [T] target NLL per token at the last evaluation
    steps: torch.Tensor  # [T] Adam steps taken

    @property
    def failed(self) -> torch.Tensor:
        """[T] bool: the optimised delta still leaves P(target token) below 1/2 (the target is out of reach)."""
        return self.nll > FAILED_NLL


@dataclass
class VStar:
    z: torch.Tensor  # [d]
    delta: torch.Tensor  # [d]
    nll: float
    steps: int


def _find_cache(output):
    """The key/value cache object in a model output (its attribute is `cache` or `past_key_values` by version)."""
    from transformers.cache_utils import Cache

    return next((v for v in output.values() if isinstance(v, Cache)), None)


def _fresh(cache):
    """A copy of `cache` that later updates leave the original unchanged in: its layer objects are copied (updates
    rebind their key/value tensors by concatenation, never write into them)."""
    if not hasattr(cache, "layers"):
        return copy.deepcopy(cache)
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


class _Replay:
    """The decoder layers above `layer` on the batch's rows, replayed from what clean forwards recorded.

    `h` [B, S', d]: the output of `layer` at the replayed positions; `shift` [B]: position in a row minus its replayed
    position; `run(hidden, start, stop)` runs layers start..stop on `hidden` (the output of layer start - 1) and returns
    layer stop's output.

    Only the positions from a row's lookup token on depend on delta. So by default the rows are aligned at their lookup
    tokens (prefixes padded on the left, suffixes on the right): one forward computes the prefixes' key/value cache, a
    second the suffixes on top of it, and each step replays the layers above `layer` on the suffixes alone, attending to
    the cached prefixes. With `suffix=False` (layers with recurrent state, such as linear attention, or a model whose
    forward returns no cache) the whole rows are replayed, padded on the right.
    """

    def __init__(self, model, layer_module_tmp: str, layer: int, last: int, rows: list[list[int]], lookup: list[int],
                 pad_id: int | None, device, suffix: bool = True):
        self.first = layer + 1
        self.layers = [model.get_submodule(layer_module_tmp.format(l)) for l in range(self.first, last + 1)]
        self.inputs: list = [None] * len(self.layers)  # (other positional args, kwargs, hidden passed positionally)
        self.cache, self._step_cache = None, None
        pad = pad_id if pad_id is not None else 0
        width = max(len(r) - l for r, l in zip(rows, lookup))  # the longest suffix (from the lookup token on)
        if suffix and max(lookup) > 0:
            P = max(lookup)
            prefix = torch.tensor([[pad] * (P - l) + r[:l] for r, l in zip(rows, lookup)])  # [B, P]
            prefix_mask = torch.tensor([[0] * (P - l) + [1] * l for l in lookup])  # [B, P]
            prefix_pos = torch.tensor([[0] * (P - l) + list(range(l)) for l in lookup])  # [B, P]
            with torch.no_grad():
                out = model(input_ids=prefix.to(device), attention_mask=prefix_mask.to(device),
                            position_ids=prefix_pos.to(device), use_cache=True)
            self.cache = _find_cache(out)
        if self.cache is not None:
            ids = torch.tensor([r[l:] + [pad] * (width - len(r) + l) for r, l in zip(rows, lookup)])  # [B, width]
            mask = torch.tensor([[1] * (len(r) - l) + [0] * (width - len(r) + l) for r, l in zip(rows, lookup)])
            kwargs = dict(attention_mask=torch.cat([prefix_mask, mask], dim=1), use_cache=True,
                          position_ids=torch.tensor([list(range(l, l + width)) for l in lookup]))
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            kwargs[name] = _fresh(self.cache)
            self.shift = torch.tensor(lookup)
        else:
            padded = pad_right(rows, pad_id)
            ids, kwargs = padded["input_ids"], dict(attention_mask=padded["attention_mask"], use_cache=False)
            self.shift = torch.zeros(len(rows), dtype=torch.long)

        def record(i):  # the other arguments of each layer above: replayed as they were
            def hook(module, args, kwargs):
                self.inputs[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}, bool(args))

            return hook

        handles = [m.register_forward_pre_hook(record(i), with_kwargs=True) for i, m in enumerate(self.layers)]
        try:
            with recorded(model.get_submodule(layer_module_tmp.format(layer))) as seen, torch.no_grad():
                model(input_ids=ids.to(device),
                      **{k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()})
        finally:
            for h in handles:
                h.remove()
        self.h = seen[0]  # [B, S', d]

    def run(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.cache is not None and start == self.first:  # a new step: the suffixes' keys/values of the last one go
            self._step_cache = _fresh(self.cache)
        for i in range(start - self.first, stop - self.first + 1):
            args, kwargs, positional = self.inputs[i]
            if self.cache is not None:
                kwargs = {k: self._step_cache if v is not None and type(v) is type(self.cache) else v
                          for k, v in kwargs.items()}
            module = self.layers[i]
            output = module(hidden, *args, **kwargs) if positional else module(*args, hidden_states=hidden, **kwargs)
            hidden = hidden_states(output)
        return hidden


def _suffix_replay_applies(model) -> bool:
    """Whether every decoder layer is (full or sliding-window) attention, whose key/value cache the suffix replay
    uses."""
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
    return all(k in ("full_attention", "sliding_attention") for k in kinds)


def _head(model, cfg: VStarConfig):
    """(final norm, head) by the configured module names, each a callable [n, d] -> [n, d] / [n, V]. A Linear head runs
    as a module (so accelerate's offload hooks load its weight); another module with a 2-D `.weight` [V, d] (a head tied
    to the input embeddings) is applied as x @ weight^T (+ bias)."""
    try:
        norm = model.get_submodule(cfg.ln_f_module)
        head = model.get_submodule(cfg.lm_head_module)
    except AttributeError as e:
        raise ValueError(f"v*: {e} (check ln_f_module / lm_head_module)") from None
    if isinstance(head, torch.nn.Linear):
        return norm, head
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"v*: lm_head_module {cfg.lm_head_module!r} is neither a Linear nor has a 2-D weight [vocab, "
                         "d_model]")

    def tied(x: torch.Tensor) -> torch.Tensor:
        logits = x @ weight.to(x.device, x.dtype).T  # [n, V]
        return logits if bias is None else logits + bias.to(x.device, x.dtype)

    return norm, tied


def _rows(tok, requests: list[dict], templates: list[str], cfg: VStarConfig):
    """Token rows of the batch: per request, one rewrite row per context template, then its KL prompt.

    Returns the rows (B lists of token ids), each row's lookup position, owner [B] (the request of each row), the
    target-token reads (rows [M], positions [M], tokens [M], owner [M], weights [M]) and the KL reads (rows [T],
    positions [T]); positions are indices into the rows.
    """
    n = len(templates)
    prompts, subjects = [], []
    for r in requests:
        prompts += [ctx.format(r["prompt"]) for ctx in templates] + [f"{r['subject']} is a"]
        subjects += [r["subject"]] * (n + 1)
    batch, lookup, _ = encode_with_lookup(tok, prompts, subjects, cfg.fact_token, cfg.max_length)
    lengths = batch["attention_mask"].sum(1).tolist()
    rows, reads = [], {k: [] for k in ("row", "pos", "tok", "owner", "weight")}
    kl_rows, kl_pos = [], []
    for t, r in enumerate(requests):
        target = target_token_ids(tok, r["target_new"])
        for i in range(t * (n + 1), (t + 1) * (n + 1)):
            prompt = batch["input_ids"][i, : lengths[i]].tolist()
            if i < (t + 1) * (n + 1) - 1:  # a rewrite row continues with the target, so each target token is predicted
                rows.append(prompt + target[:-1])
                for j, token in enumerate(target):  # the logits at len - 1 + j predict target token j
                    for key, value in zip(reads, (i, lengths[i] - 1 + j, token, t, 1.0 / (len(target) * n))):
                        reads[key].append(value)
            else:
                rows.append(prompt)
                kl_rows.append(i)
                kl_pos.append(int(lookup[i]))
    owner = torch.arange(len(requests)).repeat_interleave(n + 1)
    reads = {k: torch.tensor(v, dtype=torch.float32 if k == "weight" else torch.long) for k, v in reads.items()}
    return rows, lookup.tolist(), owner, reads, torch.tensor(kl_rows), torch.tensor(kl_pos)


def compute_targets(model, tok, requests: list[dict], layer: int, cfg: VStarConfig, context_templates=("{}",),
                    progress: bool = False, suffix: bool = True) -> VStarBatch:
    """v* for a batch of EasyEdit requests (`prompt` containing `subject`, `target_new`), optimised together.
    `suffix=False` replays whole rows instead of the suffixes from the lookup tokens on (the same z; see `_Replay`)."""
    T, n = len(requests), len(context_templates)
    last = model.config.get_text_config().num_hidden_layers - 1
    loss_layer = last if cfg.v_loss_layer < 0 else max(cfg.v_loss_layer, layer)
    norm, head = _head(model, cfg)
    rows, lookup, owner, reads, kl_rows, kl_pos = _rows(tok, requests, list(context_templates), cfg)
    device = input_device(model)

    def logprobs(hidden: torch.Tensor, at_rows: torch.Tensor, at_pos: torch.Tensor) -> torch.Tensor:
        """[n, V] log-probabilities of the next token at (rows, positions) of a layer output [B, S, d]."""
        x = norm(hidden[at_rows.to(hidden.device), at_pos.to(hidden.device)])  # [n, d]
        return torch.log_softmax(head(x).float(), dim=-1)  # [n, V]

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        upper = _Replay(model, cfg.layer_module_tmp, layer, last if cfg.kl_factor > 0 else loss_layer, rows, lookup,
                        tok.pad_token_id, device, suffix=suffix and _suffix_replay_applies(model))
        h0 = upper.h  # [B, S', d]
        dev = h0.device  # the per-request tensors live beside the edited layer's output
        shift = upper.shift.to(dev)  # [B] row position - replayed position
        at = torch.arange(len(rows), device=dev), torch.tensor(lookup, device=dev) - shift  # each row's lookup token
        reads["pos"] = reads["pos"] - upper.shift[reads["row"]]
        kl_pos = kl_pos - upper.shift[kl_rows]
        owner = owner.to(dev)
        plain = torch.arange(T, device=dev) * (n + 1)  # each request's first row: the prompt behind "{}"
        h = h0[plain, at[1][plain]].float()  # [T, d]
        h_norm = h.norm(dim=1)  # [T]
        delta = torch.zeros_like(h, requires_grad=True)  # [T, d]
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        active = torch.ones(T, dtype=torch.bool, device=dev)
        steps = torch.zeros(T, dtype=torch.long, device=dev)
        nll = torch.full((T,), float("nan"), device=dev)
        kl_init = None
        bar = tqdm(range(cfg.v_num_grad_steps), desc=f"v* ({T} requests)", leave=False,
                   disable=None if progress else True)  # None: a bar on a terminal only
        for it in bar:
            hidden = h0.index_put(at, delta[owner].to(h0.dtype), accumulate=True)  # [B, S', d]
            at_loss = upper.run(hidden, layer + 1, loss_layer)  # [B, S, d]
            lp = logprobs(at_loss, reads["row"], reads["pos"])  # [M, V]
            token_nll = -lp.gather(1, reads["tok"].to(lp.device)[:, None])[:, 0] * reads["weight"].to(lp.device)  # [M]
            # [T]
            nll_t = torch.zeros(T, device=lp.device).index_add(0, reads["owner"].to(lp.device), token_nll).to(dev)
            loss = nll_t
            if cfg.kl_factor > 0:
                at_last = upper.run(at_loss, loss_layer + 1, last) if last > loss_layer else at_loss
                kl_lp = logprobs(at_last, kl_rows, kl_pos).to(dev)  # [T, V]
                if kl_init is None:  # delta = 0 at the first evaluation
                    kl_init = kl_lp.detach()
                # MEMIT's kl_div(kl_init, kl_lp, log_target=True): KL(P_delta || P_0)
                kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
                loss = loss + cfg.kl_factor * kl
            loss = loss + cfg.v_weight_decay * delta.norm(dim=1) / h_norm**2  # [T]
            with torch.no_grad():
                nll[active] = nll_t[active]
                active &= loss >= STOP_LOSS
            bar.set_postfix(active=int(active.sum()), nll=f"{float(nll.mean()):.3f}")
            if it == cfg.v_num_grad_steps - 1 or not active.any():
                break
            opt.zero_grad()
            loss[active].sum().backward()
            stopped = delta.detach()[~active].clone()
            opt.step()
            with torch.no_grad():
                delta[~active] = stopped  # Adam's momentum would still move a stopped request
                scale = cfg.clamp_norm_factor * h_norm / delta.norm(dim=1).clamp_min(1e-30)  # [T]
                delta.mul_(scale.clamp(max=1.0)[:, None])
            steps += active
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    delta = delta.detach()
    return VStarBatch(z=h + delta, delta=delta, nll=nll, steps=steps)


def compute_z(model, tok, request: dict, layer: int, cfg: VStarConfig, context_templates=("{}",)) -> VStar:
    """v* for one request (`compute_targets` with a batch of one)."""
    v = compute_targets(model, tok, [request], layer, cfg, context_templates)
    return VStar(z=v.z[0], delta=v.delta[0], nll=float(v.nll[0]), steps=int(v.steps[0]))


def _add_at(positions: torch.Tensor, vector: torch.Tensor):
    """Forward hook adding `vector` [d] to the layer output at one position per row."""

    def hook(module, args, output):
        hidden = hidden_states(output)  # [B, S, d]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden = hidden.clone()
        hidden[rows, positions.to(hidden.device)] += vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def add_vector_hook(model, layer_module_tmp: str, layer: int, positions: torch.Tensor, vector: torch.Tensor):
    """Install a hook adding `vector` at `positions` (one per row) of a layer's output; returns the remover."""
    handle = model.get_submodule(layer_module_tmp.format(layer)).register_forward_hook(_add_at(positions, vector))
    return handle.remove


class VStarCache:
    """v* targets on disk, one safetensors file per (model fingerprint, layer, request, v* settings, source) in
    `cache_dir` (YAML `vstar_cache_dir`). The key is stored in the file and compared on load: an entry computed for
    other weights (e.g. before an earlier edit) or other settings is never reused. Each entry holds z [d] and the
    final target NLL (NaN where the source does not report it)."""

    def __init__(self, cache_dir: str, model, layer: int, settings: dict):
        from .stats import model_fingerprint

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
        from .stats import atomic_save_file

        key, path = self._key(request)
        atomic_save_file({"z": z.detach().float().cpu().contiguous(), "nll": torch.tensor(float(nll))}, path,
                         {"key": key})
