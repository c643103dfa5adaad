"""`apply_mote_to_model`: MoTE behind EasyEdit's editor contract.

One batch of edits, step by step (method.md):
  1. check everything that can be checked before a weight changes (requests, layers, MoE blocks);
  2. per edited layer, once per model: preservation statistics -> null-space projectors P_j and Tucker
     factors (`LayerBasis`, cached on the model, so sequential batches share one basis);
  3. v*: the target z of every request at the last edited layer L (compute_z.py: MEMIT's objective, the whole batch
     at once; `v_objective: memit_host` asks the EasyEdit host's own compute_z); residual r = z - h_L; a request whose
     v* fails is warned about and left out;
  4. `core` spread: capture keys at L, solve the core there, write G / (L - l + 1) into every layer l with
     its own basis; `residual` spread: for each layer l in order, re-capture keys at l, re-measure the
     residual at L and solve with r / (L - l + 1);
  5. any failure (KeyboardInterrupt included) restores every written parameter bit-exactly.
"""

from __future__ import annotations

import copy as copy_module
import logging
import math
import time
import weakref
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..adapters import get_adapter
from . import host, offload
from .capture import capture, input_device, moe_blocks
from .compute_z import FAILED_NLL, VStarCache, VStarConfig, compute_targets
from .history import EditHistory, copy_into, down_param_names, record_call
from .hparams import MoTEHyperParams
from .lookup import encode_with_lookup
from .nullspace import nullspace_projectors
from .requests import normalise_requests
from .solve import uint_p
from .solvers import solve_layer
from .stats import preservation_stats
from .tucker import TuckerFactors, tucker_factors

log = logging.getLogger(__name__)


@dataclass
class LayerBasis:
    """What the solve needs of one layer, fixed for a model: projectors, factors, U_in^T P_j."""

    P: torch.Tensor  # [E, h, h] null-space projectors (identity when the null space is off)
    factors: TuckerFactors | None  # U_e [E, r_e], U_out [d, r_out], U_in [h, r_in] (None: solver without factors)
    UinT_P: torch.Tensor | None  # [E, r_in, h]


@dataclass
class EditorState:
    """Per-model state kept between calls: layer bases and the sequential-editing memory."""

    bases: dict = field(default_factory=dict)  # (layer, basis settings) -> LayerBasis
    memory: dict = field(default_factory=dict)  # layer -> [r_e*r_in, r_e*r_in] sum of past phi phi^T
    context_templates: list[str] | None = None
    timings: list[dict] = field(default_factory=list)  # seconds per stage, one dict per successful call
    edits: int = 0  # requests edited so far (lambda growth)
    last_writes: list = field(default_factory=list)  # (layer, ExpertUpdate) written by the last successful call
    history: EditHistory = field(default_factory=EditHistory)  # successful calls, for edit patches (`save_edit`)
    record_history: bool = True  # False: keep no history (e.g. long benchmark runs); `save_edit` then has nothing


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, EditorState]" = weakref.WeakKeyDictionary()


def editor_state(model) -> EditorState:
    return _STATES.setdefault(model, EditorState())


def reset_state(model) -> None:
    """Forget the bases and the sequential memory of `model` (e.g. after restoring its weights by hand)."""
    _STATES.pop(model, None)


# ---------------------------------------------------------------------------------------------------------
# 1. checks
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# 2. per-layer basis (statistics -> projectors + factors)
# ---------------------------------------------------------------------------------------------------------


def _basis_key(layer: int, hp: MoTEHyperParams) -> tuple:
    return (layer, hp.solver == "mote", hp.r_e, hp.r_out, hp.r_in, hp.whitening, hp.eps_whitening, hp.hooi_sweeps, hp.nullspace,
            hp.nullspace_rule, hp.nullspace_threshold, hp.nullspace_min_tokens, hp.nullspace_fallback,
            hp.preservation_corpus, hp.preservation_tokens)


def layer_bases(model, tok, adapter, blocks: dict, hp: MoTEHyperParams) -> dict[int, LayerBasis]:
    state = editor_state(model)
    todo = [l for l in blocks if _basis_key(l, hp) not in state.bases]
    if todo:
        stats = preservation_stats(model, tok, adapter, todo, corpus=hp.preservation_corpus, n_tokens=hp.preservation_tokens,
                                   max_length=hp.max_length, stats_dir=hp.stats_dir)
        for l in todo:
            block = blocks[l]
            W = adapter.down_weight(block, dtype=None)  # [E, d, h] view, the model's dtype (tucker_factors copies it once)
            s = stats[l]
            if hp.nullspace:
                P = nullspace_projectors(s.moments, s.counts, rule=hp.nullspace_rule, threshold=hp.nullspace_threshold,
                                         min_tokens=hp.nullspace_min_tokens, fallback=hp.nullspace_fallback)  # [E, h, h]
            else:
                P = torch.eye(W.shape[2]).expand(W.shape[0], -1, -1).clone()
            P = P.to(W.device)
            if hp.solver != "mote":  # the unstructured solvers need only the projectors
                state.bases[_basis_key(l, hp)] = LayerBasis(P=P, factors=None, UinT_P=None)
                continue
            factors = tucker_factors(W, (hp.r_e, hp.r_out, hp.r_in), whitening=hp.whitening, cov_in=s.cov_in,
                                     cov_out=s.cov_out, eps=hp.eps_whitening, hooi_sweeps=hp.hooi_sweeps)
            factors = TuckerFactors(*(u.to(W.device) for u in factors))
            state.bases[_basis_key(l, hp)] = LayerBasis(P=P, factors=factors, UinT_P=uint_p(factors, P))
    return {l: state.bases[_basis_key(l, hp)] for l in blocks}


# ---------------------------------------------------------------------------------------------------------
# 3. targets
# ---------------------------------------------------------------------------------------------------------


def vstar_config(hp: MoTEHyperParams) -> VStarConfig:
    return VStarConfig(layer_module_tmp=hp.layer_module_tmp, fact_token=hp.fact_token, v_num_grad_steps=hp.v_num_grad_steps,
                       v_lr=hp.v_lr, v_weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
                       kl_factor=hp.kl_factor, v_loss_layer=hp.v_loss_layer, ln_f_module=hp.ln_f_module,
                       lm_head_module=hp.lm_head_module, objective=hp.v_objective, max_length=hp.max_length)


def context_templates(model, tok, state: EditorState, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """MEMIT's context templates: "{}" plus short texts sampled from the model itself, each followed by the prompt."""
    if state.context_templates is None:
        gen = torch.Generator().manual_seed(seed)
        device = input_device(model)
        out = ["{}"]
        for start in ("The", "Therefore", "Because", "I", "You")[:n]:
            ids = tok(start, return_tensors="pt")["input_ids"].to(device)
            with torch.no_grad():
                for _ in range(length):
                    probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1).cpu()
                    top = torch.topk(probs, 5)
                    nxt = top.indices[torch.multinomial(top.values / top.values.sum(), 1, generator=gen)]
                    ids = torch.cat([ids, nxt.view(1, 1).to(device)], dim=1)
            text = tok.decode(ids[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            out.append(text + ". {}")
        state.context_templates = out
    return state.context_templates


def layer_outputs(model, tok, requests: list[dict], layer_module: str, fact_token: str, max_length: int | None) -> torch.Tensor:
    """[T, d] output of a decoder layer at each request's lookup token (one batched forward)."""
    batch, lookup, _ = encode_with_lookup(tok, [r["prompt"] for r in requests], [r["subject"] for r in requests], fact_token, max_length)
    device = input_device(model)
    grabbed = {}
    handle = model.get_submodule(layer_module).register_forward_hook(
        lambda m, a, o: grabbed.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        handle.remove()
    h = grabbed["h"]  # [B, S, d], on the layer's device
    return h[torch.arange(len(requests), device=h.device), lookup.to(h.device)].float()


def request_key(r: dict) -> tuple[str, str, str]:
    """What identifies a request's v* target: (prompt, subject, target_new)."""
    return r["prompt"], r["subject"], r["target_new"]


def targets(model, tok, requests: list[dict], hp: MoTEHyperParams, state: EditorState, progress: bool = True,
            precomputed: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v* targets at the last edited layer L: (z [T, d], final target NLL per token [T], NaN where not reported).

    precomputed: {request_key(r): z [d] or (z, nll)} used as given (e.g. v* of the unedited model in benchmarks,
    MoEEdit's protocol); the rest are read from `hp.vstar_cache_dir` when set, else computed, `hp.v_batch_size` requests
    at a time (all together by default), and then cached. `v_objective: memit_host` computes them one at a time with
    the EasyEdit host's own compute_z, which reports no NLL.
    """
    L = max(hp.layers)
    if hp.v_objective == "memit_host" and host.compute_z_fn() is None:
        raise ValueError(f"v_objective 'memit_host' needs an importable EasyEdit host ({host.host_status()}); "
                         "use v_objective 'memit', the same objective computed by the plugin")
    # MEMIT's context templates, generated once per model; also given to the host's compute_z (its own
    # get_context_templates keeps one list per process, from whichever model asked first)
    templates = context_templates(model, tok, state)
    cache = None
    if hp.vstar_cache_dir is not None:
        cache = VStarCache(hp.vstar_cache_dir, model, L, vars(vstar_config(hp)) | {"templates": templates})
    z: list = [None] * len(requests)
    nll = torch.full((len(requests),), float("nan"))
    for i, r in enumerate(requests):
        given = (precomputed or {}).get(request_key(r))
        if given is None and cache is not None:
            given = cache.load(r)
        if given is not None:
            z[i], nll[i] = given if isinstance(given, tuple) else (given, float("nan"))
    todo = [i for i in range(len(requests)) if z[i] is None]
    chunk = hp.v_batch_size or max(len(todo), 1)
    for start in tqdm(range(0, len(todo), chunk), desc="v* batches", disable=None if progress and len(todo) > chunk else True, leave=False):
        part = todo[start : start + chunk]
        if hp.v_objective == "memit_host":
            found = [(host.compute_z_fn()(model, tok, requests[i], hp, L, [templates]), float("nan")) for i in part]
        else:
            v = compute_targets(model, tok, [requests[i] for i in part], L, vstar_config(hp), templates, progress=progress)
            found = list(zip(v.z, v.nll.tolist()))
        for i, (zi, nli) in zip(part, found):
            z[i], nll[i] = zi, nli
            if cache is not None:
                cache.save(requests[i], zi, nli)
    # detached: the host's MEMIT returns target_init + delta still attached to its graph, and precomputed targets may be
    return torch.stack([zi.detach().float().to(input_device(model)) for zi in z]), nll


def drop_failed_targets(requests: list[dict], z: torch.Tensor, nll: torch.Tensor, L: int, keep: bool):
    """Warn for each request whose v* left P(target token) below 1/2 (e.g. a multi-token answer the model cannot
    produce); unless `keep`, leave those requests out of the edit. Returns (requests, z) to edit."""
    failed = (nll > FAILED_NLL).tolist()
    for r, bad, value in zip(requests, failed, nll.tolist()):
        if bad:
            log.warning("v* at layer %d did not reach %r for %r (target NLL per token %.2f > ln 2): %s", L, r["target_new"],
                        r["prompt"], value, "edited anyway (v_keep_failed)" if keep else "left out of this edit")
    if keep or not any(failed):
        return requests, z
    kept = [i for i, bad in enumerate(failed) if not bad]
    return [requests[i] for i in kept], z[kept]


# ---------------------------------------------------------------------------------------------------------
# 4. solve and write back
# ---------------------------------------------------------------------------------------------------------


def _solve_and_write(model, tok, adapter, blocks, bases, requests, z, hp, state, timings, writes) -> None:
    """Solve and write every edited layer with the configured spread (module docstring, step 4)."""
    L = max(hp.layers)
    layers = sorted(hp.layers)
    lam = hp.mote_lambda * (1.0 + hp.lambda_growth * state.edits)  # MoEEdit's lambda growth in sequential runs

    def residual_at(layer: int) -> torch.Tensor:  # [T, d] z minus the output of `layer` at the lookup tokens
        t = time.time()
        h = layer_outputs(model, tok, requests, hp.layer_module_tmp.format(layer), hp.fact_token, hp.max_length)
        timings["capture"] += time.time() - t
        return z.to(h.device) - h

    for i, l in enumerate([L] if hp.spread == "core" else layers):
        t = time.time()
        cap = capture(model, tok, adapter, requests, [l], hp.fact_token, max_length=hp.max_length)[l]
        timings["capture"] += time.time() - t
        if hp.spread == "layerwise":  # MoEEdit: residual at the layer's own output, weight 1/sqrt(n - i)
            R = residual_at(l) / math.sqrt(len(layers) - i)
        else:  # core: all at L; residual: re-measured at L, this layer's share 1/(L - l + 1)
            R = residual_at(L) * (1.0 if hp.spread == "core" else 1.0 / (L - l + 1))
        t = time.time()
        memory = state.memory.get(l) if hp.sequential_memory else None
        sol, memory = solve_layer(hp.solver, l, bases[l], cap, R, lam, memory, keep_memory=hp.sequential_memory,
                                  bcd_passes=hp.bcd_passes, bcd_seed=hp.bcd_seed)
        if hp.sequential_memory:
            state.memory[l] = memory
        timings["solve"] += time.time() - t
        t = time.time()
        for target in (layers if hp.spread == "core" else [l]):
            update = sol.update(bases[target], target, 1.0 / (L - target + 1) if hp.spread == "core" else 1.0)
            update.write(adapter, blocks[target])
            writes.append((target, update))
        timings["writeback"] += time.time() - t


def execute_mote(model, tok, requests: list[dict], hp: MoTEHyperParams, writes: list, progress: bool = True,
                 precomputed: dict | None = None) -> tuple[dict, list[dict]]:
    """Edit `model` in place (no restore on failure: `apply_mote_to_model` does that). Returns the timings and the
    requests edited (those whose v* reached its target, see `drop_failed_targets`); every update written is appended to
    `writes` as (layer, ExpertUpdate), in order."""
    adapter = get_adapter(model)
    blocks = moe_blocks(model, adapter, hp.layers)
    state = editor_state(model)
    timings = {"statistics": 0.0, "vstar": 0.0, "capture": 0.0, "solve": 0.0, "writeback": 0.0}
    t = time.time()
    bases = layer_bases(model, tok, adapter, blocks, hp)
    timings["statistics"] = time.time() - t
    t = time.time()
    z, nll = targets(model, tok, requests, hp, state, progress, precomputed)  # [T, d], [T]
    timings["vstar"] = time.time() - t
    requests, z = drop_failed_targets(requests, z, nll, max(hp.layers), hp.v_keep_failed)
    if requests:
        _solve_and_write(model, tok, adapter, blocks, bases, requests, z, hp, state, timings, writes)
    timings["edits"] = len(requests)
    return timings, requests


def apply_mote_to_model(model, tok, requests, hparams: MoTEHyperParams, copy: bool = False, return_orig_weights: bool = False,
                        keep_original_weight: bool = False, **kwargs):
    """EasyEdit's apply function: edit `model` (in place, or a deep copy when `copy`) with MoTE.

    Returns (model, weights_copy): weights_copy maps the names of the parameters MoTE changes to their
    original tensors when `return_orig_weights` (the host restores them from it), else {}. All-or-nothing:
    if anything fails, every changed parameter is restored bit-exactly before the exception propagates.
    `precomputed_targets={request_key(r): z}` supplies v* targets (e.g. computed once on the unedited model, see
    `targets`). Other keyword arguments (the host passes e.g. `train_ds`) are ignored.
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
    adapter = get_adapter(model)
    blocks = moe_blocks(model, adapter, hparams.layers)
    _check_materialised(adapter, blocks)
    hparams.check_against_model(model)
    state = editor_state(model)
    memory = dict(state.memory)
    padding_side, pad_token = getattr(tok, "padding_side", None), getattr(tok, "pad_token", None)
    with offload.resident(blocks.values()):  # offloaded edited blocks: weights loaded for the whole call
        params = {name: adapter.down_param(blocks[layer]) for layer, name in down_param_names(model, adapter, blocks).items()}
        originals = {n: p.detach().clone() for n, p in params.items()}
        try:
            tok.padding_side = "right"
            _usable_pad_token(model, tok)
            writes = []
            timings, edited = execute_mote(model, tok, requests, hparams, writes, precomputed=kwargs.get("precomputed_targets"))
            if state.record_history and edited:
                record_call(state.history, model, edited, hparams.to_dict(), writes, originals)
            offload.store(model, params)  # last: nothing after it can fail
        except BaseException:
            copy_into(params, originals)
            state.memory = memory
            raise
        finally:
            if padding_side is not None:
                tok.padding_side = padding_side
            if pad_token != getattr(tok, "pad_token", None):
                tok.pad_token = pad_token
    state.timings.append(timings)
    state.edits += timings["edits"]
    state.last_writes = writes
    log.info("MoTE: %d edits, %s", timings["edits"], ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if k != "edits"))
    return model, (originals if return_orig_weights else {})


def _check_materialised(adapter, blocks: dict) -> None:
    """The edited blocks' weights must exist: real tensors, or on the `meta` device with accelerate's offload hook
    holding their values (`offload.resident` loads those). A bare meta tensor would make every write a no-op."""
    for layer, block in blocks.items():
        meta = [f"{mn}.{n}".lstrip(".") for mn, m in block.named_modules() for n, p in m.named_parameters(recurse=False)
                if p.device.type == "meta" and offload.offload_hook(m) is None]
        if meta:
            raise ValueError(f"layer {layer}: the weights {', '.join(meta)} are on the meta device and not offloaded by "
                             "accelerate (no weights map holds them): load the model's weights first (docs/large-models.md)")


def _usable_pad_token(model, tok) -> None:
    """Padding needs an id inside the model's vocabulary. EasyEdit sets Qwen tokenizers' pad token to
    "<|endoftext|>", which a tokenizer without it appends as a new id past the embeddings: pad with EOS (or id 0)
    during the edit then (padded positions are masked; the caller restores the tokenizer)."""
    vocab = model.get_input_embeddings().num_embeddings
    if tok.pad_token_id is None or not 0 <= tok.pad_token_id < vocab:
        eos = tok.eos_token_id
        tok.pad_token_id = eos if isinstance(eos, int) and 0 <= eos < vocab else 0


def last_timings(model) -> dict:
    """Seconds per stage of the last successful `apply_mote_to_model` call on `model`: statistics (one-time per
    layer and basis settings; ~0 when cached), vstar, capture, solve, writeback, and `edits`."""
    timings = editor_state(model).timings
    if not timings:
        raise ValueError("no MoTE edit has been applied to this model yet")
    return dict(timings[-1])
