"""v*: the target output z of the last edited layer at each request's lookup token, a whole batch at once.

MEMIT's compute_z (EasyEdit `easyeditor/models/memit/compute_z.py`) with one delta per request, optimised together.
Request t gets a vector delta_t [d] added to the output of decoder layer `layer` at the lookup token of each of its
rows (vstar_rows.py): the rewrite prompt behind each context template followed by the target's first tokens, and the
KL prompt "{subject} is a". Adam minimises, per request, EasyEdit's compute_z objective term for term:

    loss_t = NLL_t + kl_factor * KL(P_delta || P_0)  +  v_weight_decay * ||delta_t|| / ||h_t||^2

with the KL at the lookup token of "{subject} is a"; the request stops when loss_t < 5e-2.

NLL_t: the mean over the request's rewrite rows of the target's summed token NLL over its length, read from the
output of layer `loss_layer` (v_loss_layer; -1 = the last) through the final norm and the output head. At most
`v_num_grad_steps` evaluations, one Adam step after each but the last; after each step
||delta_t|| <= clamp_norm_factor * ||h_t||. h_t: the layer's output at the lookup token of the plain prompt;
z_t = h_t + delta_t.

Requests never interact (a row sees one delta, a token's computation only its own row) and Adam's update is
elementwise, so the batch gives each request the z it gets alone, up to float summation order; a stopped request keeps
its delta while the others go on. Speed: each step replays only the layers above `layer` (vstar_replay.py), then the
norm and the output head at the positions the loss reads (not at every token).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .blocks import input_device
from .vstar_replay import Replay, suffix_replay_applies
from .vstar_rows import vstar_rows

STOP_LOSS = 5e-2  # MEMIT's early stop
FAILED_NLL = math.log(2)  # a v* whose final target NLL per token is above this left P(target token) below 1/2


@dataclass
class VStarConfig:
    """What v* reads. Each field is the hyper-parameter of the same name, declared (default, check, meaning) in
    `MoTEHyperParams`, which fills this by name (`vstar_config()`; `default_vstar_config()` for the defaults)."""

    layer_module_tmp: str
    fact_token: str
    v_num_grad_steps: int
    v_lr: float
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    v_loss_layer: int  # -1: the last decoder layer
    ln_f_module: str
    lm_head_module: str  # a module with `.weight` [V, d] (a tied head: the input embeddings)
    max_length: int | None  # None: prompts are not truncated


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


def compute_targets(model, tok, requests: list[dict], layer: int, cfg: VStarConfig, context_templates=("{}",),
                    progress: bool = False, suffix: bool = True) -> VStarBatch:
    """v* for a batch of EasyEdit requests (`prompt` containing `subject`, `target_new`), optimised together.
    `suffix=False` replays whole rows instead of the suffixes from the lookup tokens on (the same z; see `Replay`)."""
    with _frozen(model):
        loss = _Loss(model, tok, requests, layer, cfg, list(context_templates), suffix)
        delta, nll, steps = _optimise(loss, cfg, progress)
    return VStarBatch(z=loss.h + delta, delta=delta, nll=nll, steps=steps)


def compute_z(model, tok, request: dict, layer: int, cfg: VStarConfig, context_templates=("{}",)) -> VStar:
    """v* for one request (`compute_targets` with a batch of one)."""
    v = compute_targets(model, tok, [request], layer, cfg, context_templates)
    return VStar(z=v.z[0], delta=v.delta[0], nll=float(v.nll[0]), steps=int(v.steps[0]))


@contextmanager
def _frozen(model) -> Iterator[None]:
    """No parameter of `model` requires a gradient inside the block (v* differentiates the deltas only); each one's
    flag is restored on leaving."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)


class _Loss:
    """loss_t and NLL_t (module docstring) of every request of a batch, as functions of the deltas [T, d].

    `h` [T, d]: the edited layer's output at each request's lookup token (on the device of that layer's output, where
    every per-request tensor lives); `h_norm` [T] its norm."""

    def __init__(self, model, tok, requests: list[dict], layer: int, cfg: VStarConfig, templates: list[str],
                 suffix: bool):
        self.cfg, self.layer = cfg, layer
        self.last = model.config.get_text_config().num_hidden_layers - 1
        self.loss_layer = self.last if cfg.v_loss_layer < 0 else max(cfg.v_loss_layer, layer)
        self.norm, self.head = _head(model, cfg)
        rows = vstar_rows(tok, requests, templates, cfg.fact_token, cfg.max_length)
        top = self.last if cfg.kl_factor > 0 else self.loss_layer  # the KL is read at the last layer
        self.replay = Replay(model, cfg.layer_module_tmp, layer, top, rows.tokens, rows.lookup, tok.pad_token_id,
                             input_device(model), suffix=suffix and suffix_replay_applies(model))
        shift = self.replay.shift  # [B] row position - replayed position
        dev = self.replay.h.device
        self.at = torch.arange(len(rows.tokens), device=dev), torch.tensor(rows.lookup, device=dev) - shift.to(dev)
        self.reads = rows.reads | {"pos": rows.reads["pos"] - shift[rows.reads["row"]]}
        self.kl_rows, self.kl_pos = rows.kl_rows, rows.kl_pos - shift[rows.kl_rows]
        self.owner = rows.owner.to(dev)
        first = rows.first.to(dev)
        self.h = self.replay.h[first, self.at[1][first]].float()  # [T, d]
        self.h_norm = self.h.norm(dim=1)  # [T]
        self.kl_init = None  # [T, V] the KL rows' log-probabilities at delta = 0 (the first evaluation)

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [T], NLL [T]) at `delta` [T, d]."""
        h0 = self.replay.h  # [B, S', d]
        hidden = h0.index_put(self.at, delta[self.owner].to(h0.dtype), accumulate=True)  # [B, S', d]
        at_loss = self.replay.run(hidden, self.layer + 1, self.loss_layer)  # [B, S, d]
        nll = self._nll(at_loss)
        loss = nll
        if self.cfg.kl_factor > 0:
            loss = loss + self.cfg.kl_factor * self._kl(at_loss)
        return loss + self.cfg.v_weight_decay * delta.norm(dim=1) / self.h_norm**2, nll

    def _logprobs(self, hidden: torch.Tensor, at_rows: torch.Tensor, at_pos: torch.Tensor) -> torch.Tensor:
        """[n, V] log-probabilities of the next token at (rows, positions) of a layer output [B, S, d]."""
        x = self.norm(hidden[at_rows.to(hidden.device), at_pos.to(hidden.device)])  # [n, d]
        return torch.log_softmax(self.head(x).float(), dim=-1)  # [n, V]

    def _nll(self, at_loss: torch.Tensor) -> torch.Tensor:
        """[T] each request's NLL_t, from the output of the loss layer."""
        reads = self.reads
        lp = self._logprobs(at_loss, reads["row"], reads["pos"])  # [M, V]
        token_nll = -lp.gather(1, reads["tok"].to(lp.device)[:, None])[:, 0] * reads["weight"].to(lp.device)  # [M]
        per_request = torch.zeros(len(self.h), device=lp.device).index_add(0, reads["owner"].to(lp.device), token_nll)
        return per_request.to(self.h.device)

    def _kl(self, at_loss: torch.Tensor) -> torch.Tensor:
        """[T] KL(P_delta || P_0) at each request's KL read (MEMIT's kl_div(kl_init, kl_lp, log_target=True))."""
        at_last = self.replay.run(at_loss, self.loss_layer + 1, self.last) if self.last > self.loss_layer else at_loss
        kl_lp = self._logprobs(at_last, self.kl_rows, self.kl_pos).to(self.h.device)  # [T, V]
        if self.kl_init is None:
            self.kl_init = kl_lp.detach()
        return (kl_lp.exp() * (kl_lp - self.kl_init)).sum(-1)


def _optimise(loss: _Loss, cfg: VStarConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on the deltas, each request stopping on its own: (delta [T, d], NLL at its last evaluation [T], steps
    [T])."""
    T, dev = len(loss.h), loss.h.device
    delta = torch.zeros_like(loss.h, requires_grad=True)  # [T, d]
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    active = torch.ones(T, dtype=torch.bool, device=dev)
    steps = torch.zeros(T, dtype=torch.long, device=dev)
    nll = torch.full((T,), float("nan"), device=dev)
    bar = tqdm(range(cfg.v_num_grad_steps), desc=f"v* ({T} requests)", leave=False,
               disable=None if progress else True)  # None: a bar on a terminal only
    for it in bar:
        loss_t, nll_t = loss(delta)  # [T], [T]
        with torch.no_grad():
            nll[active] = nll_t[active]
            active &= loss_t >= STOP_LOSS
        bar.set_postfix(active=int(active.sum()), nll=f"{float(nll.mean()):.3f}")
        if it == cfg.v_num_grad_steps - 1 or not active.any():
            break
        opt.zero_grad()
        loss_t[active].sum().backward()
        _step(opt, delta, active, cfg.clamp_norm_factor * loss.h_norm)
        steps += active
    return delta.detach(), nll, steps


def _step(opt: torch.optim.Optimizer, delta: torch.Tensor, active: torch.Tensor, max_norm: torch.Tensor) -> None:
    """One Adam step of the active requests' deltas [T, d], each then clamped to ||delta_t|| <= max_norm[t]."""
    stopped = delta.detach()[~active].clone()
    opt.step()
    with torch.no_grad():
        delta[~active] = stopped  # Adam's momentum would still move a stopped request
        scale = max_norm / delta.norm(dim=1).clamp_min(1e-30)  # [T]
        delta.mul_(scale.clamp(max=1.0)[:, None])


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
