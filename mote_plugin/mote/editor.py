"""`MoTEEditor`: MoTE's edits of one model, step by step (method.md).

    editor = MoTEEditor(model, tok, hparams)
    result = editor.edit(requests)       # result.requests (edited), result.timings, result.originals

One `edit`, in the order of this file:
  1. checks, before any weight changes: requests, layers and their MoE blocks (looked up once), weights present,
     hyper-parameters against the model;
  2. bases: per edited layer, once per model and basis settings, preservation statistics -> null-space projectors P_j
     and Tucker factors (`LayerBasis`, kept in the model's `EditState`, so sequential batches share one basis);
  3. v* targets: the target z of every request at the last edited layer L (model/vstar_objective.py: MEMIT's
     objective, the whole batch at once; `v_objective: memit_host` asks the EasyEdit host's own compute_z); a request
     whose v* fails is warned about and left out;
  4. keys, solve, write: for each solve of the spread (`spread_steps`), capture the keys at its layer, measure the
     residual z - h, solve (solvers.py) and write the update into its target layers;
  5. all-or-nothing: any failure (KeyboardInterrupt included) restores every written parameter bit-exactly.

What is kept between edits (bases, sequential memory, context templates, timings, the edit history behind patches)
is the model's `EditState`, stored on the model object itself: every editor of a model shares it, and it goes away
with the model (a copy of the model starts without one).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import MoEAdapter, get_adapter
from .algebra.core_solve import key_maps_of
from .algebra.coverage import Coverage
from .algebra.nullspace import nullspace_projectors
from .algebra.solvers import LayerBasis, solve_batch
from .algebra.tucker import TuckerFactors, tucker_factors
from .algebra.update import ExpertUpdate
from .hparams import MoTEHyperParams
from .model import host_compute_z, offload
from .model.blocks import input_device, moe_blocks
from .model.capture import capture, layer_outputs
from .model.lookup import pad_id_in_vocab
from .model.requests import normalise_requests
from .model.stats import LayerStats, preservation_stats
from .model.vstar_cache import VStarCache
from .model.vstar_objective import FAILED_NLL, compute_targets
from .patches.history import EditHistory, copy_into, digest, down_param_names, record_call

log = logging.getLogger(__name__)

STAGES = ("statistics", "vstar", "capture", "solve", "writeback")  # the seconds `edit` reports, in this order


# ---------------------------------------------------------------------------------------------------------
# state kept between edits, and what one edit returns
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EditState:
    """What MoTE keeps about one model between edits. It lives on the model (`EditState.of`)."""

    bases: dict = field(default_factory=dict)  # (layer, basis settings) -> LayerBasis
    memory: dict = field(default_factory=dict)  # layer -> [r_e*r_in, r_e*r_in] sum of past phi phi^T
    context_templates: list[str] | None = None  # MEMIT's, generated once per model
    timings: list[dict] = field(default_factory=list)  # seconds per stage, one dict per successful edit
    edits: int = 0  # requests edited so far (lambda growth)
    last_edited: int = 0  # requests the last successful edit edited
    last_writes: list = field(default_factory=list)  # (layer, ExpertUpdate) written by the last successful edit
    last_coverage: list = field(default_factory=list)  # Coverage of each solve of the last successful edit
    history: EditHistory = field(default_factory=EditHistory)  # successful edits, for edit patches (`save_edit`)
    record_history: bool = True  # False: keep no history (e.g. long benchmark runs); `save_edit` then has nothing
    # which weights the above describes (`follow_weights`): parameter name -> `digest` of its value
    origin: dict = field(default_factory=dict)  # before MoTE first wrote it
    written: dict = field(default_factory=dict)  # after MoTE's last successful write
    on_edited: set = field(default_factory=set)  # basis keys (and "templates") computed on weights MoTE had changed

    ATTRIBUTE = "_mote_edit_state"  # where it is kept on the model

    def __reduce__(self):
        """A copy or pickle of the model (`copy.deepcopy`, `apply_mote_to_model(copy=True)`) starts without edit state,
        as a freshly loaded model does."""
        return (EditState, ())

    @classmethod
    def of(cls, model: nn.Module) -> EditState:
        """The edit state of `model`, created empty on first use."""
        state = vars(model).get(cls.ATTRIBUTE)
        if state is None:
            state = cls()
            setattr(model, cls.ATTRIBUTE, state)  # a plain attribute (not a module, parameter or buffer)
        return state

    @classmethod
    def forget(cls, model: nn.Module) -> None:
        vars(model).pop(cls.ATTRIBUTE, None)

    def follow_weights(self, model: nn.Module) -> None:
        """Before an edit: when the weights MoTE last wrote are no longer what it wrote (EasyEdit's edit() restores them
        after every request, a user may `load_state_dict`), drop the sequential memory, edit count, timings and history
        built on them, with one log line. Bases and context templates are kept when the weights are back to those they
        were computed from (a restore), dropped otherwise."""
        if not self.written or _digests(model, self.written) == self.written:
            return
        restored = _digests(model, self.origin) == self.origin
        bases = {k: b for k, b in self.bases.items() if k not in self.on_edited} if restored else {}
        templates = self.context_templates if restored and "templates" not in self.on_edited else None
        log.info("MoTE: the weights it last wrote were changed outside it (%s): the sequential memory, edit history "
                 "and timings of its %d edit(s) are dropped%s", "restored" if restored else "other values", self.edits,
                 "" if restored else ", and the bases")
        vars(self).update(vars(EditState(bases=bases, context_templates=templates, record_history=self.record_history)))

    def wrote(self, model: nn.Module, originals: dict[str, torch.Tensor], derived: set) -> None:
        """After a successful edit that changed `originals` (name -> value before it): which weights the state now
        describes. `derived`: basis keys (and "templates") this edit computed, on weights MoTE had changed if any of
        its earlier writes was live."""
        if self.origin:
            self.on_edited |= derived
        for name, value in originals.items():
            self.origin.setdefault(name, digest({name: value}))
        self.written = _digests(model, self.origin)


def _digests(model: nn.Module, names) -> dict[str, str]:
    """{name: `digest` of the parameter's current value} (read from accelerate's weights map where offloaded)."""
    return {name: digest({name: value}) for name, value in offload.values(model, names).items()}


@dataclass
class EditResult:
    requests: list[dict]  # the requests edited (those whose v* reached its target, unless `v_keep_failed`)
    timings: dict  # seconds per stage (STAGES)
    originals: dict[str, torch.Tensor]  # the changed parameters (by name) as they were before the edit
    coverage: list[Coverage] = field(default_factory=list)  # per solve: what its basis held (coverage.py)


# ---------------------------------------------------------------------------------------------------------
# the multi-layer spread
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpreadStep:
    """One solve of the multi-layer schedule."""

    solve_at: int  # keys are captured and the layer is solved here
    residual_layer: int  # the residual z - h is measured at this layer's output...
    residual_times: float  # ... multiplied by this
    residual_over: float  # ... and divided by this (kept apart so that each spread computes what it always has)
    writes: tuple[tuple[int, float], ...]  # (layer, scale): the solution written into each layer, scaled


def spread_steps(spread: str, layers: list[int]) -> list[SpreadStep]:
    """The solves of a multi-layer edit (YAML `spread`), L the last edited layer:

        core       one solve at L on the whole residual, written into every layer l scaled by 1 / (L - l + 1), each
                   with its own basis (MoTE)
        residual   for each layer l in order: keys re-captured at l, the residual re-measured at L, its share
                   1 / (L - l + 1) solved and written at l (MEMIT)
        layerwise  for the i-th of n layers l: the residual at l's own output, weighted 1 / sqrt(n - i), solved and
                   written at l (MoEEdit)
    """
    layers = sorted(layers)
    L = layers[-1]
    if spread == "core":
        return [SpreadStep(L, L, 1.0, 1.0, tuple((l, 1.0 / (L - l + 1)) for l in layers))]
    if spread == "residual":
        return [SpreadStep(l, L, 1.0 / (L - l + 1), 1.0, ((l, 1.0),)) for l in layers]
    if spread == "layerwise":
        return [SpreadStep(l, l, 1.0, math.sqrt(len(layers) - i), ((l, 1.0),)) for i, l in enumerate(layers)]
    raise ValueError(f"unknown spread {spread!r}")


# ---------------------------------------------------------------------------------------------------------
# the editor
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Edit:
    """One `edit` in progress: what its steps read, and what they have measured and written so far."""

    requests: list[dict]
    adapter: MoEAdapter
    blocks: dict[int, nn.Module]  # edited layer -> its MoE block
    bases: dict[int, LayerBasis] = field(default_factory=dict)
    z: torch.Tensor | None = None  # [T, d] v* targets at the last edited layer
    timings: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    writes: list[tuple[int, ExpertUpdate]] = field(default_factory=list)
    coverage: list[Coverage] = field(default_factory=list)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.time()
        yield
        self.timings[stage] += time.time() - start


class MoTEEditor:
    """MoTE's edits of `model` with `tok` and `hparams`; the state kept between edits is the model's `EditState`.

    `MoTEEditor(model)` (no tokenizer, no hyper-parameters) reads and resets that state; editing needs all three."""

    def __init__(self, model: nn.Module, tok=None, hparams: MoTEHyperParams | None = None):
        if hparams is not None and not isinstance(hparams, MoTEHyperParams):
            alg = getattr(hparams, "alg_name", type(hparams).__name__)
            raise ValueError(f"MoTE needs MoTEHyperParams, got hyper-parameters for {alg!r}")
        self.model, self.tok, self.hparams = model, tok, hparams

    def _ready(self) -> MoTEHyperParams:
        """The hyper-parameters; ValueError when the editor was made without them or without a tokenizer."""
        if self.hparams is None or self.tok is None:
            raise ValueError("this MoTEEditor has no tokenizer or hyper-parameters: MoTEEditor(model, tok, hparams) "
                             "edits")
        return self.hparams

    # -----------------------------------------------------------------------------------------------------
    # what is kept between edits

    @property
    def state(self) -> EditState:
        return EditState.of(self.model)

    @property
    def history(self) -> EditHistory:
        """The successful edits since the model was loaded (or since `reset`): what `save_edit` writes."""
        return self.state.history

    @property
    def timings(self) -> list[dict]:
        """Seconds per stage of every successful edit, oldest first."""
        return self.state.timings

    @property
    def memory(self) -> dict:
        """Sequential-editing memory per layer (`sequential_memory: true`)."""
        return self.state.memory

    @property
    def last_coverage(self) -> list[Coverage]:
        """What each solve's basis held of the last successful edit, and the share of its residuals the update
        reproduces (coverage.py)."""
        return self.state.last_coverage

    @property
    def last_writes(self) -> list[tuple[int, ExpertUpdate]]:
        """(layer, update) written by the last successful edit, in order."""
        return self.state.last_writes

    @property
    def record_history(self) -> bool:
        """Whether edits are recorded for `save_edit` (set False for e.g. thousands of benchmark edits)."""
        return self.state.record_history

    @record_history.setter
    def record_history(self, value: bool) -> None:
        self.state.record_history = value

    def reset(self) -> None:
        """Forget the bases, the sequential memory, the timings and the history of the model (e.g. after restoring its
        weights by hand)."""
        EditState.forget(self.model)

    # -----------------------------------------------------------------------------------------------------
    # one edit

    def edit(self, requests, precomputed_targets: dict | None = None, progress: bool = True) -> EditResult:
        """Edit the model in place with `requests` (EasyEdit request dicts), all-or-nothing.

        `precomputed_targets={request_key(r): z [d] or (z, nll)}` supplies v* targets (e.g. computed once on the
        unedited model, see `targets`). Bad input raises before any weight changes; if anything fails later, every
        changed parameter is restored bit-exactly before the exception propagates.
        """
        hp = self._ready()
        hp.torch_device()  # a device this torch cannot use is bad input, refused before anything else
        requests = normalise_requests(requests)
        if not requests:
            return EditResult([], {}, {})
        adapter = get_adapter(self.model)
        blocks = moe_blocks(self.model, adapter, hp.layers)
        _check_materialised(adapter, blocks)
        hp.check_against_model(self.model)
        state = self.state
        state.follow_weights(self.model)
        known = set(state.bases) | ({"templates"} if state.context_templates is not None else set())
        memory = dict(state.memory)
        with offload.resident(blocks.values()):  # offloaded edited blocks: weights loaded for the whole call
            names = down_param_names(self.model, adapter, blocks)
            params = {name: adapter.down_param(blocks[layer]) for layer, name in names.items()}
            originals = {n: p.detach().clone() for n, p in params.items()}
            try:
                with _right_padding(self.model, self.tok):
                    edit = self._edit(_Edit(requests, adapter, blocks), precomputed_targets, progress)
                if state.record_history and edit.requests:
                    record_call(state.history, self.model, edit.requests, hp.to_dict(), edit.writes, originals,
                                adapter, blocks)
                offload.store(self.model, params)  # last: nothing after it can fail
            except BaseException:
                copy_into(params, originals)
                state.memory = memory
                raise
        state.timings.append(edit.timings)
        state.edits += len(edit.requests)
        state.last_edited = len(edit.requests)
        state.last_writes = edit.writes
        state.last_coverage = edit.coverage
        if edit.writes:
            derived = set(state.bases) | ({"templates"} if state.context_templates is not None else set())
            state.wrote(self.model, originals, derived - known)
        log.info("MoTE: %d edits, %s", len(edit.requests),
                 ", ".join(f"{k} {v:.2f} s" for k, v in edit.timings.items()))
        return EditResult(edit.requests, dict(edit.timings), originals, list(edit.coverage))

    def _edit(self, edit: _Edit, precomputed: dict | None, progress: bool) -> _Edit:
        """Steps 2-4 of the module docstring, writing into the model (no restore on failure: `edit` does that)."""
        hp = self.hparams
        with edit.timed("statistics"):
            edit.bases = self._bases_of(edit.adapter, edit.blocks)
        with edit.timed("vstar"):
            z, nll = self.targets(edit.requests, progress, precomputed)  # [T, d], [T]
        edit.requests, edit.z = drop_failed_targets(edit.requests, z, nll, max(hp.layers), hp.v_keep_failed)
        if edit.requests:
            lam = hp.mote_lambda * (1.0 + hp.lambda_growth * self.state.edits)  # MoEEdit's lambda growth
            for step in spread_steps(hp.spread, hp.layers):
                self._solve_and_write(edit, step, lam)
        return edit

    # -----------------------------------------------------------------------------------------------------
    # step 2: bases

    def bases(self, layers: list[int] | None = None) -> dict[int, LayerBasis]:
        """The basis of each of `layers` (default: the edited ones), computed and kept on first use."""
        hp = self._ready()
        adapter = get_adapter(self.model)
        return self._bases_of(adapter, moe_blocks(self.model, adapter, layers or hp.layers))

    def _bases_of(self, adapter: MoEAdapter, blocks: dict[int, nn.Module]) -> dict[int, LayerBasis]:
        hp, bases = self.hparams, self.state.bases
        settings = hp.basis_settings()
        todo = [l for l in blocks if (l, settings) not in bases]
        if todo:
            stats = preservation_stats(self.model, self.tok, adapter, todo, corpus=hp.preservation_corpus,
                                       n_tokens=hp.preservation_tokens, max_length=hp.max_length,
                                       stats_dir=hp.stats_dir)
            for l in todo:
                W = adapter.down_weight(blocks[l], dtype=None)  # [E, d, h] view, the model's dtype
                bases[(l, settings)] = basis_from_weights(W, stats[l], hp)
        return {l: bases[(l, settings)] for l in blocks}

    # -----------------------------------------------------------------------------------------------------
    # step 3: v* targets

    def context_templates(self, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
        """MEMIT's context templates: "{}" plus short texts sampled from the model itself, each followed by the prompt
        (generated once per model)."""
        state = self.state
        if state.context_templates is None:
            state.context_templates = _sample_context_templates(self.model, self.tok, n, length, seed)
        return state.context_templates

    def targets(self, requests: list[dict], progress: bool = True,
                precomputed: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """v* targets at the last edited layer L: (z [T, d], final target NLL per token [T], NaN where not reported).

        precomputed: {request_key(r): z [d] or (z, nll)} used as given (e.g. v* of the unedited model in benchmarks,
        MoEEdit's protocol); the rest are read from `hp.vstar_cache_dir` when set, else computed, `hp.v_batch_size`
        requests at a time (all together by default), and then cached. `v_objective: memit_host` computes them one at
        a time with the EasyEdit host's own compute_z, which reports no NLL.
        """
        hp = self._ready()
        if hp.v_objective == "memit_host" and host_compute_z.compute_z_fn() is None:
            raise ValueError(f"v_objective 'memit_host' needs an importable EasyEdit host "
                             f"({host_compute_z.host_status()}); use v_objective 'memit', the same objective computed "
                             "by the plugin")
        # MEMIT's context templates, generated once per model; also given to the host's compute_z (its own
        # get_context_templates keeps one list per process, from whichever model asked first)
        templates = self.context_templates()
        cache = self._vstar_cache(templates)
        z, nll = _given_targets(requests, precomputed or {}, cache)
        todo = [i for i in range(len(requests)) if z[i] is None]
        chunk = hp.v_batch_size or max(len(todo), 1)
        # tqdm's `disable`: None draws the bar on a terminal only, True never (one chunk needs none)
        disable = None if progress and len(todo) > chunk else True
        for start in tqdm(range(0, len(todo), chunk), desc="v* batches", disable=disable, leave=False):
            part = todo[start : start + chunk]
            found = self._compute_targets([requests[i] for i in part], templates, progress)
            for i, (zi, nli) in zip(part, found):
                z[i], nll[i] = zi, nli
                if cache is not None:
                    cache.save(requests[i], zi, nli)
        # detached: the host's MEMIT returns target_init + delta still attached to its graph, and precomputed targets
        # may be
        return torch.stack([zi.detach().float().to(input_device(self.model)) for zi in z]), nll

    def _vstar_cache(self, templates: list[str]) -> VStarCache | None:
        """The v* cache at the last edited layer (None without `vstar_cache_dir`). An entry is keyed by the v* settings,
        `v_objective` (the plugin's and the host's targets are kept apart) and the context templates."""
        hp = self.hparams
        if hp.vstar_cache_dir is None:
            return None
        settings = vars(hp.vstar_config()) | {"objective": hp.v_objective, "templates": templates}
        return VStarCache(hp.vstar_cache_dir, self.model, max(hp.layers), settings)

    def _compute_targets(self, requests: list[dict], templates: list[str],
                         progress: bool) -> list[tuple[torch.Tensor, float]]:
        """(z [d], final target NLL per token) of each request: the plugin's v*, the requests together, or with
        `v_objective: memit_host` the host's compute_z one request at a time (NLL not reported: NaN)."""
        model, tok, hp = self.model, self.tok, self.hparams
        L = max(hp.layers)
        if hp.v_objective == "memit_host":
            compute_z = host_compute_z.compute_z_fn()
            return [(compute_z(model, tok, r, hp, L, [templates]), float("nan")) for r in requests]
        v = compute_targets(model, tok, requests, L, hp.vstar_config(), templates, progress=progress)
        return list(zip(v.z, v.nll.tolist()))

    # -----------------------------------------------------------------------------------------------------
    # step 4: keys, solve, write

    def _solve_and_write(self, edit: _Edit, step: SpreadStep, lam: float) -> None:
        """One solve of the spread: keys at its layer, the residual, the solve, the writes into its target layers."""
        model, tok, hp, state = self.model, self.tok, self.hparams, self.state
        layer = step.solve_at
        with edit.timed("capture"):
            routed = capture(model, tok, edit.adapter, edit.requests, [layer], hp.fact_token,
                             max_length=hp.max_length)[layer]  # keys [T, K, h]
            h = layer_outputs(model, tok, edit.requests, hp.layer_module_tmp.format(step.residual_layer),
                              hp.fact_token, hp.max_length)  # [T, d]
        R = (edit.z.to(h.device) - h) * step.residual_times / step.residual_over  # [T, d]
        with edit.timed("solve"):
            memory = state.memory.get(layer) if hp.sequential_memory else None
            solution, memory = solve_batch(hp.solver, layer, edit.bases[layer], routed, R, lam, memory,
                                           keep_memory=hp.sequential_memory, bcd_passes=hp.bcd_passes,
                                           bcd_seed=hp.bcd_seed, rule=hp.basis_rule())
            if hp.sequential_memory:
                state.memory[layer] = memory
        with edit.timed("writeback"):
            for target, scale in step.writes:
                update = solution.update(edit.bases[target], target, scale)
                update.write(edit.adapter, edit.blocks[target])
                edit.writes.append((target, update))
                if target == layer:  # every spread writes its solve layer at scale 1
                    at_solve_layer = update
        edit.coverage.append(solution.coverage(at_solve_layer, routed, R))
        _report(edit.coverage[-1], hp)


# ---------------------------------------------------------------------------------------------------------
# helpers of the steps
# ---------------------------------------------------------------------------------------------------------


def basis_from_weights(W: torch.Tensor, stats: LayerStats, hp: MoTEHyperParams) -> LayerBasis:
    """One layer's basis from its down-projections W [E, d, h] and preservation statistics: the null-space projectors
    (identity when `nullspace` is off) and, for solver `mote`, the Tucker factors and U_in^T P_j."""
    if hp.nullspace:
        P = nullspace_projectors(stats.moments, stats.counts, rule=hp.nullspace_rule, threshold=hp.nullspace_threshold,
                                 min_tokens=hp.nullspace_min_tokens, fallback=hp.nullspace_fallback)  # [E, h, h]
    else:
        P = torch.eye(W.shape[2]).expand(W.shape[0], -1, -1).clone()
    P = P.to(W.device)
    if hp.solver != "mote":  # the unstructured solvers need only the projectors
        return LayerBasis(P=P, factors=None, key_maps=None)
    factors = tucker_factors(W, hp.layer_ranks(), whitening=hp.whitening, cov_in=stats.cov_in, cov_out=stats.cov_out,
                             eps=hp.eps_whitening, hooi_sweeps=hp.hooi_sweeps)
    factors = TuckerFactors(*(u.to(W.device) for u in factors))
    fixed = not any(hp.basis_rule().auto)  # with `auto` ranks each batch computes U_in^T P_j at its own rank
    return LayerBasis(P=P, factors=factors, key_maps=key_maps_of(factors, P) if fixed else None)


# below this share of the keys' energy past the projectors, a low `reproduced` is the null space's doing first
NULLSPACE_REMOVES_MOST = 0.5


def nullspace_summary(cov: Coverage) -> str:
    """What the null space let through at one solve: the keys' energy kept (mean, min over the edits), the batch's
    experts with the least kept, and the experts whose null space is empty."""
    kept = cov.keys_kept
    worst = sorted(cov.kept_by_expert.items(), key=lambda item: item[1])[:4]
    by_expert = ", ".join(f"{j}: {share:.2f}" for j, share in worst)
    touched = sorted(set(cov.empty_nullspace) & set(cov.kept_by_expert))
    empty = (f"; {len(cov.empty_nullspace)} expert(s) of the layer have an empty null space"
             f"{f' ({len(touched)} routed to by the batch: {touched})' if touched else ''}" if cov.empty_nullspace
             else "")
    return (f"keys past the null space {kept.mean:.2f} (min {kept.min:.2f}; least-kept experts {by_expert}){empty}")


def _report(cov: Coverage, hp: MoTEHyperParams) -> None:
    """Log one solve's coverage; warn, naming what to change, when its update reproduces under `min_reproduced` of the
    residual it aimed at: first the null space when it removed most of the keys, then the basis or lambda."""
    held = ", ".join(f"{name} {share.mean:.2f} (min {share.min:.2f})" for name in
                     ("residual_in_U_out", "keys_in_U_in", "gates_in_U_e") if (share := getattr(cov, name)) is not None)
    ranks = f" at ranks (r_e, r_out, r_in) = {cov.ranks}" if cov.ranks else ""
    projected = hp.nullspace and hp.nullspace_rule != "covariance"  # a projector: a share of the keys passes it
    log.info("MoTE coverage, layer %d%s: reproduced %.2f (min %.2f)%s%s", cov.layer, ranks, cov.reproduced.mean,
             cov.reproduced.min, f"; {nullspace_summary(cov)}" if projected else "",
             f"; basis holds {held}" if held else "")
    if cov.reproduced.mean >= hp.min_reproduced:
        return
    if cov.ranks is None:
        advice = "lower mote_lambda"
    elif hp.basis != "weights":  # U_out and U_in hold the batch: only the expert mode and lambda are left
        advice = (f"the basis{ranks} holds {held}: raise r_e (r_e = E is the Global ridge) or lower mote_lambda")
    else:
        advice = (f"the basis{ranks} holds {held}: set `basis: weights+edit` (the batch's residuals and keys join "
                  "U_out and U_in), raise the ranks or set them `auto`, or lower mote_lambda")
    if projected and cov.keys_kept.mean < NULLSPACE_REMOVES_MOST:
        advice = (f"the null space removes most of the edit ({nullspace_summary(cov)}): it is set by nullspace_rule "
                  f"{hp.nullspace_rule!r} and nullspace_threshold {hp.nullspace_threshold:g} (`relative` with 1e-2 "
                  f"keeps the directions holding the last 1% of each expert's key energy whatever the keys' scale; "
                  f"under `absolute` raise the threshold), preservation_tokens {hp.preservation_tokens} with "
                  f"nullspace_min_tokens {hp.nullspace_min_tokens} (experts with fewer tokens get nullspace_fallback "
                  f"{hp.nullspace_fallback!r}; `freeze` empties their null space), or `nullspace: false` (no "
                  f"protection); then {advice}")
    log.warning("MoTE: at layer %d the update reproduces %.2f of the %d edits' residuals on average (min %.2f), below "
                "min_reproduced %.2f, so the edits may not take: %s", cov.layer, cov.reproduced.mean, cov.edits,
                cov.reproduced.min, hp.min_reproduced, advice)


def _sample_context_templates(model, tok, n: int, length: int, seed: int) -> list[str]:
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
    return out


def request_key(r: dict) -> tuple[str, str, str]:
    """What identifies a request's v* target: (prompt, subject, target_new)."""
    return r["prompt"], r["subject"], r["target_new"]


def _given_targets(requests: list[dict], precomputed: dict, cache: VStarCache | None) -> tuple[list, torch.Tensor]:
    """The targets known before v* runs, from `precomputed` ({request_key(r): z or (z, nll)}), else from `cache`:
    z per request (None where unknown) and the final target NLL per token [T] (NaN where unknown or not reported)."""
    z: list = [None] * len(requests)
    nll = torch.full((len(requests),), float("nan"))
    for i, r in enumerate(requests):
        given = precomputed.get(request_key(r))
        if given is None and cache is not None:
            given = cache.load(r)
        if given is not None:
            z[i], nll[i] = given if isinstance(given, tuple) else (given, float("nan"))
    return z, nll


def drop_failed_targets(requests: list[dict], z: torch.Tensor, nll: torch.Tensor, L: int, keep: bool):
    """Warn for each request whose v* left P(target token) below 1/2 (e.g. a multi-token answer the model cannot
    produce); unless `keep`, leave those requests out of the edit. Returns (requests, z) to edit."""
    failed = (nll > FAILED_NLL).tolist()
    for r, bad, value in zip(requests, failed, nll.tolist()):
        if bad:
            log.warning("v* at layer %d did not reach %r for %r (target NLL per token %.2f > ln 2): %s", L,
                        r["target_new"], r["prompt"], value,
                        "edited anyway (v_keep_failed)" if keep else "left out of this edit")
    if keep or not any(failed):
        return requests, z
    kept = [i for i, bad in enumerate(failed) if not bad]
    return [requests[i] for i in kept], z[kept]


def _check_materialised(adapter: MoEAdapter, blocks: dict[int, nn.Module]) -> None:
    """The edited blocks' weights must exist: real tensors, or on the `meta` device with accelerate's offload hook
    holding their values (`offload.resident` loads those). A bare meta tensor would make every write a no-op."""
    for layer, block in blocks.items():
        meta = [f"{mn}.{n}".lstrip(".") for mn, m in block.named_modules() for n, p in m.named_parameters(recurse=False)
                if p.device.type == "meta" and offload.offload_hook(m) is None]
        if meta:
            raise ValueError(f"layer {layer}: the weights {', '.join(meta)} are on the meta device and not offloaded "
                             "by accelerate (no weights map holds them): load the model's weights first "
                             "(docs/large-models.md)")


@contextlib.contextmanager
def _right_padding(model: nn.Module, tok) -> Iterator[None]:
    """The tokenizer pads on the right with an id inside the vocabulary during the edit, and is given back unchanged.

    MoTE's lookups assume right padding (EasyEdit sets left padding for algorithms outside its list); the pad id is one
    the model can embed (`pad_id_in_vocab`)."""
    padding_side, pad_token = getattr(tok, "padding_side", None), getattr(tok, "pad_token", None)
    try:
        tok.padding_side = "right"
        tok.pad_token_id = pad_id_in_vocab(tok, model.get_input_embeddings().num_embeddings)
        yield
    finally:
        if padding_side is not None:
            tok.padding_side = padding_side
        if pad_token != getattr(tok, "pad_token", None):
            tok.pad_token = pad_token
