"""One run of an EasyEdit editor (ROME, MEMIT, AlphaEdit, FT-L / FT-M, LoRA / AdaLoRA, UnKE) on a model, as the
comparison (`compare.py`) and the quality protocol (benchmarks/quality.py) call it: sequential batches from the
unedited weights, then everything undone (weights, adapters, the host's module state).

    run = HostEdit(hp, model, tok, stats_dir=..., workdir=...)   # raises HostMethodError when it cannot edit this model
    seconds = run.edit(requests)                                  # one batch; call again for the next one
    run.undo()                                                    # the unedited model again

What each algorithm needs of the call is in `ALGORITHMS` (requests per call, the padding side its code assumes, whether
it reads the key covariance, what it writes); the host's own code runs unchanged. Where the host's code cannot run as
it is, the run supplies what it lacks, and says so here:

* the key covariance (MEMIT, AlphaEdit, ROME with mom2_adjustment) is written from the plugin's corpus into the
  host's cache (`host_methods.prime_host_covariance`): the host would download Wikipedia;
* AlphaEdit picks the shapes of its projector P and its edit memory by model-name substring (llama / qwen / gpt-j);
  the run builds both with the host's own `get_project` for the model at hand and hands them to the host's module;
* AdaLoRA: EasyEdit builds peft's AdaLoraConfig without `total_step`, which current peft requires; the run supplies
  num_steps x mini-batches of the first call;
* LoRA returns the model wrapped by peft; `undo` unloads the adapter (no merge) and removes what peft and EasyEdit set
  on the model (peft_config, gradient checkpointing, the input-grad hook, use_cache);
* the host's context templates (ROME, MEMIT, AlphaEdit) live in module globals filled from the first model seen: they
  are cleared at each run, and drawn under a fixed seed, so that every run on a model draws the same ones.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from ..mote.hparams import hparams_path
from ..mote.model.stats import corpus_texts
from .host_methods import dense_module_problem, prime_host_covariance, working_directory


class HostMethodError(ValueError):
    """A host method cannot edit this model with these hyper-parameters (the message says why)."""


class HostUnavailable(ValueError):
    """The importable host has no such algorithm."""


@dataclass(frozen=True)
class Algorithm:
    """How the host's apply function of one algorithm is called."""

    apply: str  # module and function of the host's apply function
    per_call: int | None = None  # requests per call (ROME: 1); None: the whole batch
    padding: str | dict = "right"  # the padding side its code assumes ({objective: side} for FT)
    covariance: bool = False  # reads the key covariance of rewrite_module_tmp
    writes: str = "dense"  # dense: {rewrite_module_tmp}.weight | named: every parameter whose name holds it | adapter
    vstar_cache: bool = False  # takes `cache_template` (v* of the first batch, computed on the unedited model)
    objective: str = ""  # where its target is computed


ALGORITHMS = {
    "ROME": Algorithm("easyeditor.models.rome.rome_main.apply_rome_to_model", per_call=1,
                      objective="v* at the output of `mlp_module_tmp` (the written module in the testbed YAMLs), one "
                                "request at a time, rank-one update"),
    "MEMIT": Algorithm("easyeditor.models.memit.memit_main.apply_memit_to_model", covariance=True, vstar_cache=True,
                       objective="z at the last edited layer's output, residual spread over the layers, key covariance "
                                 "x mom2_update_weight as the preservation term"),
    "AlphaEdit": Algorithm("easyeditor.models.alphaedit.AlphaEdit_main.apply_AlphaEdit_to_model", covariance=True,
                           vstar_cache=True,
                           objective="z at the last edited layer's output, residual spread over the layers, update "
                                     "projected on the key covariance's null space (eigenvalues < "
                                     "nullspace_threshold), ridge L2, earlier batches' keys kept"),
    "FT": Algorithm("easyeditor.models.ft.ft_main.apply_ft_to_model", writes="named",
                    padding={"prompt_last": "right", "target_new": "left"},
                    objective="cross-entropy of the target (FT-L: at the prompt's last token, within norm_constraint; "
                              "FT-M: on the target's tokens)"),
    "LoRA": Algorithm("easyeditor.models.lora.lora_main.apply_lora_to_model", writes="adapter", padding="left",
                      objective="cross-entropy of the target's tokens, adapters on target_modules"),
    "UnKE": Algorithm("easyeditor.models.unke.unke_main.apply_unke_to_model", writes="named",
                      objective="z at the last edited layer's output, the whole decoder layer trained towards it"),
}


def host_hparams(host, alg: str, path: str):
    """The host's hyper-parameters of `alg` from a YAML (its own `from_hparams` where it has one: UnKE's class reads
    only JSON, so its YAML is read here the same way)."""
    if alg not in ALGORITHMS:
        raise HostUnavailable(f"no host run for {alg} (known: {', '.join(ALGORITHMS)})")
    cls = getattr(host, f"{alg}HyperParams", None) or getattr(host, f"{alg.lower()}HyperParams", None)
    if cls is None:
        raise HostUnavailable(f"the EasyEdit host has no {alg}HyperParams")
    if "from_hparams" in vars(cls):
        return cls.from_hparams(str(path))
    with open(hparams_path(path)) as f:
        config = cls.construct_float_from_scientific_notation(yaml.safe_load(f))
    config.pop("alg_name", None)
    hp = cls(**config)
    hp.alg_name = alg
    return hp


def _host_function(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def algorithm(hp) -> Algorithm:
    if hp.alg_name not in ALGORITHMS:
        raise HostMethodError(f"no host run for alg_name {hp.alg_name!r} (known: {', '.join(ALGORITHMS)})")
    return ALGORITHMS[hp.alg_name]


def written_parameters(model: nn.Module, hp) -> list[str]:
    """The parameters a host method writes on this model (empty for an adapter method: it adds modules instead)."""
    writes = algorithm(hp).writes
    if writes == "adapter":
        return []
    if writes == "dense":
        return [f"{hp.rewrite_module_tmp.format(layer)}.weight" for layer in hp.layers]
    if hp.alg_name == "UnKE":  # every parameter of the edited decoder layers
        prefixes = [hp.layer_module_tmp.format(layer) + "." for layer in hp.layers]
        return [n for n, _ in model.named_parameters() if n.startswith(tuple(prefixes))]
    return [n for n, _ in model.named_parameters() if any(hp.rewrite_module_tmp.format(l) in n for l in hp.layers)]


def _layer_of(name: str, layer_module_tmp: str) -> int | None:
    """The decoder layer a parameter name belongs to, by `layer_module_tmp` ("model.layers.{}")."""
    head, _, _ = layer_module_tmp.partition("{}")
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def problem(model: nn.Module, hp) -> str | None:
    """Why a host method cannot edit this model with `hp`, or None."""
    writes = algorithm(hp).writes
    n_layers = model.config.get_text_config().num_hidden_layers
    bad = [layer for layer in hp.layers if not 0 <= layer < n_layers]
    if bad:
        return f"layers {bad} out of range: the model has {n_layers}"
    if writes == "dense":
        return dense_module_problem(model, hp)
    if writes == "named":
        names = written_parameters(model, hp)
        if not names:
            return f"no parameter name contains {hp.rewrite_module_tmp} at layers {hp.layers}"
        layer_tmp = getattr(hp, "layer_module_tmp", "model.layers.{}")
        stray = [n for n in names if _layer_of(n, layer_tmp) not in hp.layers]
        if stray:
            return f"{hp.rewrite_module_tmp} also selects {stray[:3]} outside layers {hp.layers}"
        return None
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(hp.target_modules) - linear)
    if missing:
        return f"target_modules {missing} are not nn.Linear modules of this model (LoRA adapts nn.Linear)"
    return None


def vstar_key(hp) -> str:
    """A digest of what a host method's v* depends on besides the model and the request (its cache directory)."""
    keys = ("alg_name", "layers", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay",
            "clamp_norm_factor", "kl_factor", "layer_module_tmp", "lm_head_module", "ln_f_module")
    spec = {k: getattr(hp, k, None) for k in keys}
    spec["layers"] = spec["layers"][-1]  # z is computed at the last edited layer only
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _padding(tok, side: str):
    previous = tok.padding_side
    tok.padding_side = side
    try:
        yield
    finally:
        tok.padding_side = previous


@contextlib.contextmanager
def _adalora_total_step(steps: int):
    """EasyEdit's execute_lora builds AdaLoraConfig without total_step (current peft requires it): supply it."""
    lora_main = importlib.import_module("easyeditor.models.lora.lora_main")
    original = lora_main.AdaLoraConfig
    lora_main.AdaLoraConfig = functools.partial(original, total_step=steps)
    try:
        yield
    finally:
        lora_main.AdaLoraConfig = original


def _clear_context_templates() -> None:
    for module in ("rome.rome_main", "memit.memit_main", "alphaedit.AlphaEdit_main"):
        importlib.import_module(f"easyeditor.models.{module}").CONTEXT_TEMPLATES_CACHE = None


@contextlib.contextmanager
def token_shaped(model: nn.Module, hp):
    """The host reads a rewritten module's input as [batch, tokens, d] (the key at the subject's token). An MoE block
    that flattens the tokens before a dense expert (Qwen3.5-MoE's shared expert sees [B*T, d]) calls that expert on
    [B, T, d] instead while this is open: a position-wise MLP computes the same, and the host finds its keys."""
    shape: dict[int, tuple[int, int]] = {}  # layer -> (B, T) of its current input
    handles, patched = [], []
    for layer in getattr(hp, "layers", []):
        def record(module, args, kwargs, layer=layer):
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, d_model]
            shape[layer] = tuple(hidden.shape[:2])

        handles.append(model.get_submodule(hp.layer_module_tmp.format(layer)).register_forward_pre_hook(
            record, with_kwargs=True))
        parent = model.get_submodule(hp.rewrite_module_tmp.format(layer).rsplit(".", 1)[0])

        def forward(*args, _forward=parent.forward, layer=layer, **kwargs):
            batch, tokens = shape.get(layer, (0, 0))
            x = args[0] if args else None  # a module called with keywords (attention) is not a flattened expert
            if x is None or x.dim() != 2 or x.shape[0] != batch * tokens:
                return _forward(*args, **kwargs)
            return _forward(x.view(batch, tokens, -1), *args[1:], **kwargs).reshape(batch * tokens, -1)

        parent.forward = forward
        patched.append(parent)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for parent in patched:
            del parent.forward  # the class's forward again


class HostEdit:
    """One host method's run on `model`: `edit` batch after batch, then `undo`.

    stats_dir: where the key covariance is cached (one directory per model: the host names its files by the model's
    directory name, `model` for every fact model); workdir: the host's working directory (files it writes);
    vstar_dir: a cache of the first batch's v* (MEMIT, AlphaEdit), keyed by `vstar_key`; seed: the context templates'
    draw. UnKE's preservation texts (its `ex_data`) are the first `ex_data_num` lines of the plugin's corpus."""

    def __init__(self, hp, model, tok, stats_dir: Path, workdir: Path, covariance_texts: int = 2000,
                 vstar_dir: Path | None = None, seed: int = 0):
        self.alg = algorithm(hp)
        why = problem(model, hp)
        if why:
            raise HostMethodError(why)
        self.hp, self.model, self.tok, self.workdir = hp, model, tok, Path(workdir).resolve()
        self.apply = _host_function(self.alg.apply)
        self.vstar_dir = vstar_dir
        n_texts = getattr(hp, "ex_data_num", 0)
        self.unke_texts = [t for _, t in zip(range(n_texts), corpus_texts(None))]
        self.originals: dict[str, torch.Tensor] = {}
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.use_cache = model.config.use_cache
        self.peft_model = None
        self.batches = 0
        torch.manual_seed(seed)
        _clear_context_templates()
        with self._token_shaped():
            if self.alg.covariance or (hp.alg_name == "ROME" and hp.mom2_adjustment):
                hp.stats_dir = str(Path(stats_dir).resolve())
                prime_host_covariance(model, tok, hp, covariance_texts)
            if hp.alg_name == "AlphaEdit":
                self._alphaedit_state()

    def _token_shaped(self):
        """`token_shaped` for the methods that read keys at a module (ROME, MEMIT, AlphaEdit)."""
        return token_shaped(self.model, self.hp) if self.alg.covariance or self.hp.alg_name == "ROME" \
            else contextlib.nullcontext()

    def _alphaedit_state(self) -> None:
        """The host's projector P [L, k, k] (its own get_project, at this model's key size k) and an empty edit memory
        of the same shape, set on its module; P saved where the host looks for it (P_loc, in workdir)."""
        main = importlib.import_module("easyeditor.models.alphaedit.AlphaEdit_main")
        P = torch.stack([main.get_project(self.model, self.tok, layer, self.hp) for layer in self.hp.layers])
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hp.P_loc = str(self.workdir / "null_space_project.pt")
        torch.save(P, self.hp.P_loc)
        main.P, main.P_loaded, main.cache_c, main.cache_c_new = P, True, torch.zeros_like(P), True

    def null_space_dims(self) -> list[int]:
        """AlphaEdit: per edited layer, the dimension of the null space its threshold kept."""
        main = importlib.import_module("easyeditor.models.alphaedit.AlphaEdit_main")
        return [round(float(torch.trace(p))) for p in main.P]

    def _padding_side(self) -> str:
        pad = self.alg.padding
        return pad[self.hp.objective_optimization] if isinstance(pad, dict) else pad

    def _call(self, requests: list[dict], first: bool):
        kwargs = {"copy": False, "return_orig_weights": True}
        if self.alg.vstar_cache and first and self.vstar_dir is not None:
            # valid only while the model is unedited: v* of a later batch depends on the earlier ones
            kwargs["cache_template"] = str(Path(self.vstar_dir) / vstar_key(self.hp) / "z{}_clamp{}_case{}.npz")
        if self.hp.alg_name == "LoRA":
            model = self.peft_model if self.peft_model is not None else self.model
            steps = self.hp.num_steps * math.ceil(len(requests) / self.hp.batch_size)
            with _adalora_total_step(steps) if self.hp.lora_type == "adalora" else contextlib.nullcontext():
                self.peft_model, _ = self.apply(model, self.tok, requests, self.hp, keep_original_weight=False)
            return {}
        if self.hp.alg_name == "UnKE":
            batch = [{"question": r["prompt"], "answer": " " + r["target_new"]} for r in requests]
            return self.apply(self.model, self.tok, self.hp, batch, self.unke_texts)
        return self.apply(self.model, self.tok, requests, self.hp, **kwargs)[1]

    def edit(self, requests: list[dict]) -> float:
        """Edit one batch of requests (EasyEdit request dicts) on the model as it is; returns the seconds taken."""
        per_call = self.alg.per_call or len(requests)
        start = time.time()
        with working_directory(self.workdir), _padding(self.tok, self._padding_side()), self._token_shaped():
            for i in range(0, len(requests), per_call):
                weights_copy = self._call([dict(r) for r in requests[i : i + per_call]], self.batches == 0 and i == 0)
                for name, value in (weights_copy or {}).items():
                    self.originals.setdefault(name, value)
        self.batches += 1
        return time.time() - start

    def undo(self) -> None:
        """The unedited model again: adapters removed, weights and requires_grad restored."""
        if self.peft_model is not None:
            self.peft_model.unload()  # the adapter layers replaced by the original modules, nothing merged
            self.peft_model = None
            if hasattr(self.model, "peft_config"):
                del self.model.peft_config
            self.model.gradient_checkpointing_disable()
            self.model.disable_input_require_grads()
            self.model.config.use_cache = self.use_cache
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.originals.items():
                params[name].copy_(value)
            for name, flag in self.requires_grad.items():
                params[name].requires_grad_(flag)
        self.originals = {}
