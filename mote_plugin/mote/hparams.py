"""MoTE hyper-parameters, loadable from an EasyEdit-style YAML file (`hparams/MoTE/<model>.yaml`).

A plain dataclass: importing it never touches an EasyEdit host. `mote_plugin.register()` makes it a subclass of the
host's `HyperParams` (host glue, `mote_plugin.easyedit`), as EasyEdit's own hyper-parameter classes are; EasyEdit only
reads its fields, so it edits the same either way. Values are validated on construction (also when built directly),
with messages naming the field; what depends on the model (module names, `v_loss_layer`, the host's loading flags) is
checked by `check_against_model` before an edit touches any weight.

Read like EasyEdit's own YAMLs: a quoted number of a numeric key is read with Python's `float()`, as EasyEdit's
`HyperParams.construct_float_from_scientific_notation` reads every quoted number ("1e-5", "0.5", " 2 ", "1_000"); an
integer key then needs a whole number ("25" -> 25, "2.5" refused), and r_e / r_out / r_in get a float (a fraction).

    alg_name: MoTE
    model_name: Qwen/Qwen3-30B-A3B
    layers: [3, 4, 5, 6, 7]
    device: 0
    mote_lambda: 0.1
    eps_whitening: 1e-5
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import yaml

from .._hooks import HPARAMS_CREATED
from .algebra.batch_basis import BASES, BasisRule
from .algebra.nullspace import FALLBACKS, RULES
from .algebra.solvers import SOLVERS
from .algebra.tucker import WHITENINGS
from .model.lookup import FACT_TOKENS
from .model.vstar_objective import VStarConfig

log = logging.getLogger(__name__)

SPREADS = ("core", "residual", "layerwise")
DTYPES = ("bfloat16", "float16", "float32")  # what `dtype` may name (the weights' dtype when model_name is loaded)
V_OBJECTIVES = ("memit", "memit_host")  # the plugin's batched v* | the EasyEdit host's own compute_z

# the keys a layer's basis (null-space projectors, Tucker factors) is computed from: the editor keeps one basis per
# layer and combination of these (`MoTEHyperParams.basis_settings`), so sequential batches share it
BASIS_FIELDS = (
    "r_e", "r_out", "r_in", "whitening", "eps_whitening", "hooi_sweeps", "nullspace", "nullspace_rule",
    "nullspace_threshold", "nullspace_min_tokens", "nullspace_fallback", "preservation_corpus", "preservation_tokens",
)  # fmt: skip


_FLOAT_FIELDS = (
    "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mote_lambda", "eps_whitening", "nullspace_threshold",
    "lambda_growth", "min_coverage", "min_reproduced",
)  # fmt: skip


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_number(kind: str, value):
    """A YAML value of a field annotated `kind`, read as EasyEdit reads hyper-parameters: a string that `float()`
    accepts is a number (EasyEdit converts every such string; here only numeric fields, so a `model_name` or
    `stats_dir` made of digits stays a string). Fields typed `int` (and `device`, whose int N means cuda:N) take the
    whole number; a fraction is left for validation to refuse. Anything else comes back unchanged."""
    kinds = {k.strip() for k in kind.split("|")}
    if not isinstance(value, str) or not kinds & {"int", "float"}:
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if "float" in kinds:
        return number
    if number.is_integer():
        return int(number)
    return number if kinds == {"int"} else value


def _is_template(text: str) -> bool:
    """`text` has exactly one `{}` and formats with a layer index."""
    try:
        return text.count("{}") == 1 and text.format(0) != text
    except (IndexError, KeyError, ValueError):
        return False


def hparams_path(hparams_name_or_path: str | Path) -> Path:
    """The YAML file of `hparams_name_or_path` (".yaml" appended when it has no .yaml / .yml suffix, as EasyEdit's
    `from_hparams` does); FileNotFoundError naming what was tried."""
    path = str(hparams_name_or_path)
    if not path.endswith((".yaml", ".yml")):
        path += ".yaml"
    if not Path(path).is_file():
        tried = path if path == str(hparams_name_or_path) else f"{hparams_name_or_path} (tried {path})"
        raise FileNotFoundError(f"no such hparams file: {tried}")
    return Path(path)


# keys naming a file or directory: a relative path in a YAML is read from the YAML's own directory (`resolve_paths`)
PATH_FIELDS = ("model_name", "stats_dir", "vstar_cache_dir", "preservation_corpus")


def resolve_paths(config: dict, base: Path) -> dict:
    """`config` with the relative paths of PATH_FIELDS made absolute against `base` (the YAML's directory), so a YAML
    means the same from any working directory. `stats_dir` and `vstar_cache_dir` are always paths; `model_name` and
    `preservation_corpus` may also be a Hugging Face / `datasets` name ("Qwen/Qwen3-30B-A3B"): they are read as paths
    when they start with "." ("./model", "../../.cache/...") or name something that exists under `base`, and are
    left as they are otherwise."""
    out = dict(config)
    for key in PATH_FIELDS:
        value = out.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        local = base / value
        if key in ("stats_dir", "vstar_cache_dir") or value.startswith(".") or local.exists():
            out[key] = os.path.normpath(local.resolve())
    return out


class HostHyperParams:
    """The base class of `MoTEHyperParams` until `mote_plugin.register()` rebases it onto the EasyEdit host's
    `HyperParams` (a class whose only base is `object` cannot be rebased, hence this placeholder)."""


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Log `message` the first time `key` has something to say in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


@dataclass
class MoTEHyperParams(HostHyperParams):
    alg_name: str  # must be "MoTE"
    model_name: str  # HF name or local path (EasyEdit may later set it to (model, tok))
    layers: list[int]  # edited decoder layers (each must hold a sparse MoE block); the last one is L
    device: str | int  # "cpu", an int N (= cuda:N) or "cuda:N"
    fact_token: str = "subject_last"  # lookup token: subject_last | subject_first | last
    layer_module_tmp: str = "model.layers.{}"  # decoder layer module (v* is added to its output)
    mlp_module_tmp: str = "model.layers.{}.mlp"  # MoE block module (must be the block the adapter edits)
    experts_module_tmp: str = "model.layers.{}.mlp.experts"  # packed experts module (likewise)
    ln_f_module: str = "model.norm"  # final norm (v* optimisation; must exist in the model)
    lm_head_module: str = "lm_head"  # output head (v* optimisation; a module with a `weight`)
    v_num_grad_steps: int = 25  # Adam steps of the v* optimisation
    v_lr: float = 0.5  # v* learning rate
    v_loss_layer: int = -1  # layer whose output feeds the v* loss: -1 = last layer, else in [max(layers), n_layers - 1]
    v_weight_decay: float = 0.5  # v* penalty weight, on ||delta|| / ||h||^2
    clamp_norm_factor: float = 4.0  # ||delta|| <= clamp_norm_factor * ||h||
    kl_factor: float = 0.0625  # weight of the KL term keeping "{subject} is a" stable
    # memit (EasyEdit's compute_z objective, computed by the plugin) | memit_host (the host's own compute_z)
    v_objective: str = "memit"
    v_batch_size: int | None = None  # requests optimised together in v* (null: all requests of the call)
    v_keep_failed: bool = False  # edit requests whose v* left P(target token) < 1/2 anyway (default: leave them out)
    mote_lambda: float = 0.1  # ridge lambda of the core solve (> 0)
    # Tucker ranks: int = absolute, float in (0, 1] = fraction (1 != 1.0!), "auto" = the fewest leading factors holding
    # min_coverage of each batch's edit in that mode (chosen per batch, reported with the coverage)
    r_e: int | float | str = 1.0  # expert mode (the routed gate vectors)
    r_out: int | float | str = 0.5  # output mode, d_model (the v* residuals)
    r_in: int | float | str = 0.5  # input mode, expert hidden (the projected keys)
    min_coverage: float = 0.9  # `auto` ranks: the share of a mode's edit energy its factors must hold (batch mean)
    # the factors a batch is solved in: weights (the HOSVD of the weights, the paper's) | weights+edit (plus the
    # batch's residuals in U_out and its projected keys in U_in; needs a spread that captures keys at every layer) |
    # weights+edit+gates (and the batch's gate vectors in U_e)
    basis: str = "weights"  # (solver mote; the unstructured solvers have no basis and ignore it and the ranks)
    # warn when the update at a solve layer reproduces less than this share of the residual it aimed at (batch mean;
    # docs/method.md says how 0.3 was chosen; 0: never)
    min_reproduced: float = 0.3
    whitening: str = "in"  # HOSVD whitening: none | in | out | both
    eps_whitening: float = 1e-5  # covariance regulariser of the whitening (>= 0)
    hooi_sweeps: int = 0  # HOOI refinement sweeps after the HOSVD
    nullspace: bool = True  # project updates onto each expert's key null space
    nullspace_rule: str = "relative"  # relative (share of trace kept) | absolute (eigenvalue cut-off: AlphaEdit's rule)
    nullspace_threshold: float = 1e-2  # threshold of the rule (relative: in (0, 1]; absolute: AlphaEdit's 2e-2)
    nullspace_min_tokens: int = 8  # experts with fewer preservation tokens get the fallback
    nullspace_fallback: str = "freeze"  # freeze (never edit) | identity (edit unprotected)
    preservation_tokens: int = 20000  # corpus tokens behind the preservation statistics
    preservation_corpus: str | None = None  # None = shipped text; a text file path; or a `datasets` name/path
    # multi-layer schedule: core (G^L / (L-l+1)) | residual (MEMIT-style re-capture) | layerwise (MoEEdit)
    spread: str = "core"
    # mote (Tucker core) | global (unstructured Woodbury) | bcd (MoEEdit's block-coordinate descent)
    solver: str = "mote"
    bcd_passes: int = 4  # bcd: sweeps over the experts
    bcd_seed: int = 42  # bcd: seed of the random expert order
    lambda_growth: float = 0.0  # lambda * (1 + lambda_growth * edits so far); MoEEdit's sequential runs use 1e-3
    stats_dir: str = "./.cache/mote-stats"  # cache of the preservation statistics
    vstar_cache_dir: str | None = None  # cache of v* targets per (model fingerprint, layer, request); None = off
    batch_size: int = 1  # requests per edit call of EasyEdit's batch_edit and `mote edit` (EasyEdit's edit() needs 1)
    sequential_memory: bool = False  # keep earlier edits' keys in the solve across sequential batches
    max_length: int = 128  # token limit of prompts and of statistics windows
    model_parallel: bool = False  # loading flag: EasyEdit's BaseEditor loads model_name with device_map="auto"
    fp16: bool = False  # loading flag: EasyEdit's BaseEditor loads model_name in float16
    # loading dtype of model_name: bfloat16 | float16 | float32; null = EasyEdit's rule (float16 if fp16 else float32)
    dtype: str | None = None

    def __post_init__(self):
        for name in _FLOAT_FIELDS:  # YAML "lambda: 1" is an int: store floats as floats
            if _is_int(getattr(self, name)):
                setattr(self, name, float(getattr(self, name)))
        errors = self._validate()
        if errors:
            raise ValueError("invalid MoTE hyper-parameters: " + "; ".join(errors))
        for hook in HPARAMS_CREATED:  # the package root's: registers MoTE with an importable EasyEdit host
            hook()

    def _validate(self) -> list[str]:
        e: list[str] = []

        def need(ok: bool, msg: str):
            if not ok:
                e.append(msg)

        need(self.alg_name == "MoTE", f"alg_name must be 'MoTE', got {self.alg_name!r}")
        layers = self.layers
        layers_ok = isinstance(layers, (list, tuple)) and len(layers) > 0 and all(_is_int(l) and l >= 0 for l in layers)
        need(layers_ok, f"layers must be a non-empty list of non-negative ints, got {layers!r}")
        if isinstance(layers, (list, tuple)):
            need(len(set(layers)) == len(layers), f"layers has duplicates: {layers!r}")
        dev = self.device
        need(
            (_is_int(dev) and dev >= 0)
            or (isinstance(dev, str) and re.fullmatch(r"cpu|mps|cuda(:\d+)?", dev) is not None),
            f"device must be 'cpu', 'cuda:N' or an int N >= 0, got {dev!r}",
        )
        need(self.fact_token in FACT_TOKENS, f"fact_token must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        need(self.whitening in WHITENINGS, f"whitening must be one of {WHITENINGS}, got {self.whitening!r}")
        need(self.spread in SPREADS, f"spread must be one of {SPREADS}, got {self.spread!r}")
        need(self.v_objective != "squared", "v_objective 'squared' was removed: use 'memit' (EasyEdit's compute_z "
             "objective; its penalty is v_weight_decay * ||delta|| / ||h||^2, so retune v_weight_decay)")
        need(self.v_objective in V_OBJECTIVES or self.v_objective == "squared",
             f"v_objective must be one of {V_OBJECTIVES}, got {self.v_objective!r}")
        need(self.v_batch_size is None or (_is_int(self.v_batch_size) and self.v_batch_size >= 1),
             f"v_batch_size must be null or an int >= 1, got {self.v_batch_size!r}")
        need(self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}")
        need(not (self.sequential_memory and self.solver != "mote"),
             f"sequential_memory needs solver 'mote' (the {self.solver!r} solver keeps no memory of past edits)")
        need(self.nullspace_rule in RULES, f"nullspace_rule must be one of {RULES}, got {self.nullspace_rule!r}")
        need(self.nullspace_fallback in FALLBACKS,
             f"nullspace_fallback must be one of {FALLBACKS}, got {self.nullspace_fallback!r}")
        for name in ("r_e", "r_out", "r_in"):
            r = getattr(self, name)
            ok = (_is_int(r) and r >= 1) or (isinstance(r, float) and 0.0 < r <= 1.0) or r == "auto"
            need(ok, f"{name} must be a positive int, a float in (0, 1] or 'auto', got {r!r}")
        need(self.basis in BASES, f"basis must be one of {BASES}, got {self.basis!r}")
        need(_is_number(self.min_coverage) and 0 < self.min_coverage <= 1,
             f"min_coverage must be a number in (0, 1], got {self.min_coverage!r}")
        need(_is_number(self.min_reproduced) and 0 <= self.min_reproduced <= 1,
             f"min_reproduced must be a number in [0, 1] (0: never warn), got {self.min_reproduced!r}")
        if not self.basis_rule().fixed:
            per_batch = (f"basis {self.basis!r}" if self.basis != "weights" else "'auto' ranks")
            need(not self.sequential_memory,
                 f"{per_batch} takes a basis per batch, which the sequential memory (past edits' features in one "
                 f"fixed basis) cannot follow: set sequential_memory: false, or fixed ranks with basis 'weights'")
            need(self.hooi_sweeps == 0 or not any(self.basis_rule().auto),
                 "'auto' ranks take prefixes of the HOSVD factors; HOOI factors depend on the rank: set hooi_sweeps: 0")
        need(not (self.basis != "weights" and self.spread == "core"),
             f"basis {self.basis!r} is built from the keys captured at the layer it writes, and the core spread "
             "writes layers whose keys it never captures: use spread 'residual' or 'layerwise'")
        for name in ("mote_lambda", "v_lr", "clamp_norm_factor", "nullspace_threshold"):
            v = getattr(self, name)
            need(_is_number(v) and v > 0, f"{name} must be a number > 0, got {v!r}")
        for name in ("eps_whitening", "v_weight_decay", "kl_factor", "lambda_growth"):
            v = getattr(self, name)
            need(_is_number(v) and v >= 0, f"{name} must be a number >= 0, got {v!r}")
        if self.nullspace_rule == "relative" and _is_number(self.nullspace_threshold):
            need(self.nullspace_threshold <= 1,
                 f"relative nullspace_threshold must be in (0, 1], got {self.nullspace_threshold}")
        for name in ("preservation_tokens", "batch_size", "max_length", "bcd_passes"):
            v = getattr(self, name)
            need(_is_int(v) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        for name in ("v_num_grad_steps", "hooi_sweeps", "nullspace_min_tokens", "bcd_seed"):
            v = getattr(self, name)
            need(_is_int(v) and v >= 0, f"{name} must be an int >= 0, got {v!r}")
        need(_is_int(self.v_loss_layer), f"v_loss_layer must be an int (-1 = last layer), got {self.v_loss_layer!r}")
        if _is_int(self.v_loss_layer) and self.v_loss_layer != -1 and layers_ok:
            need(self.v_loss_layer >= max(layers),
                 f"v_loss_layer must be -1 (the last layer) or a layer at or above the last edited one, "
                 f"max(layers) = {max(layers)}; got {self.v_loss_layer}")
        need(self.dtype is None or self.dtype in DTYPES,
             f"dtype must be null or one of {DTYPES}, got {self.dtype!r}")
        need(not (self.fp16 and self.dtype not in (None, "float16")),
             f"fp16: true loads float16, but dtype is {self.dtype!r}: set one of them (fp16: false, or dtype: float16)")
        for name in ("nullspace", "sequential_memory", "model_parallel", "fp16", "v_keep_failed"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("layer_module_tmp", "mlp_module_tmp", "experts_module_tmp", "ln_f_module", "lm_head_module",
                     "stats_dir"):
            need(isinstance(getattr(self, name), str), f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("layer_module_tmp", "mlp_module_tmp", "experts_module_tmp"):
            tmp = getattr(self, name)
            need(isinstance(tmp, str) and _is_template(tmp),
                 f"{name} must be a module name with one {{}} for the layer index (e.g. 'model.layers.{{}}'), got "
                 f"{tmp!r}")
        need(self.vstar_cache_dir is None or isinstance(self.vstar_cache_dir, str),
             f"vstar_cache_dir must be null or a string, got {self.vstar_cache_dir!r}")
        corpus = self.preservation_corpus
        need(corpus is None or isinstance(corpus, str), f"preservation_corpus must be null or a string, got {corpus!r}")
        return e

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path) -> "MoTEHyperParams":
        """Load `<path>` (".yaml" appended when missing), read quoted numbers as EasyEdit does, validate."""
        path = hparams_path(hparams_name_or_path)
        with open(path) as f:
            config = yaml.safe_load(f)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of hyper-parameters, got {type(config).__name__}")
        return cls._from_mapping(resolve_paths(config, path.parent), str(path))

    def updated(self, source: str = "overrides", **changes) -> "MoTEHyperParams":
        """A copy with `changes` applied, read as a YAML would be (e.g. `updated(v_weight_decay="1e-1")`): unknown
        keys and invalid values raise, naming `source`."""
        return type(self)._from_mapping(self.to_dict() | changes, source)

    @classmethod
    def _from_mapping(cls, config: dict, source: str) -> "MoTEHyperParams":
        if "alg_name" in config and config["alg_name"] != "MoTE":
            raise ValueError(f"{source}: alg_name must be 'MoTE', found {config['alg_name']!r}")
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(config) - set(kinds))
        if unknown:
            raise ValueError(f"{source}: unknown MoTE hyper-parameter(s): {', '.join(unknown)}")
        if "nullspace_threshold" in config and "nullspace_rule" not in config:
            raise ValueError(
                f"{source}: nullspace_threshold is set without nullspace_rule, and the two rules read it differently: "
                f"add `nullspace_rule: absolute` for AlphaEdit's meaning (keep the eigen-directions of E[k k^T] with "
                f"eigenvalue below the threshold; AlphaEdit's 2e-2) or `nullspace_rule: relative` (the share of the "
                f"trace left unprotected, in (0, 1]; MoTE's default, 1e-2)")
        config = {k: _read_number(kinds[k], v) for k, v in config.items()}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"{source}: missing required MoTE hyper-parameter(s): {', '.join(missing)}")
        return cls(**config)

    def torch_device(self):
        """The `torch.device` the settings name (an int N is cuda:N, as EasyEdit reads it); ValueError when this torch
        cannot use it (e.g. `device: 0` on a CPU-only build), so a run fails before any weight is touched."""
        import torch

        dev = torch.device(f"cuda:{self.device}" if _is_int(self.device) else self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} needs CUDA, which this torch build cannot use "
                             f"(torch.cuda.is_available() is False): set `device: cpu`")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {self.device!r}: MPS is not available here; set `device: cpu`")
        return dev

    def torch_dtype(self):
        """The dtype `model_name` is loaded in: `dtype` when set, else EasyEdit's rule (float16 when `fp16`, else
        float32). Statistics and solves run in float32 whatever it is; updates are written in the weights' dtype."""
        import torch

        return getattr(torch, self.dtype or ("float16" if self.fp16 else "float32"))

    def check_against_model(self, model) -> None:
        """What these settings say about `model`, checked before an edit changes anything (`apply_mote_to_model` calls
        it): ValueError naming every key that does not fit. `layer_module_tmp`, `mlp_module_tmp` and
        `experts_module_tmp` must name, at each edited layer, the decoder layer, MoE block and experts module the
        family's adapter edits; `ln_f_module` and `lm_head_module` (read by v*) must exist, the head with a `weight`;
        `v_loss_layer` must be -1 or a layer in [max(layers), n_layers - 1]. The loading flags `fp16` and
        `model_parallel` and `device` cannot change a model that is already loaded: a disagreement is logged once
        per key and process."""
        import torch

        from ..adapters import get_adapter

        adapter = get_adapter(model)
        n_layers = adapter.num_layers(model)
        problems: list[str] = []

        def module(key: str, name: str):
            try:
                return model.get_submodule(name)
            except AttributeError:
                problems.append(f"{key}: the model has no module {name!r}")
                return None

        for layer in self.layers:
            if not 0 <= layer < n_layers:
                continue  # reported by the edit's own layer check (out of range / dense MLP)
            block = adapter.moe_block(model, layer)
            expected = {"layer_module_tmp": adapter.decoder_layers(model)[layer], "mlp_module_tmp": block,
                        "experts_module_tmp": adapter.experts(block) if block is not None else None}
            for key, want in expected.items():
                name = getattr(self, key).format(layer)
                found = module(key, name)
                if found is not None and want is not None and found is not want:
                    actual = next((n for n, m in model.named_modules() if m is want), "?")
                    problems.append(f"{key}: {name!r} is not the {adapter.family} {key.split('_')[0]} module of layer "
                                    f"{layer} ({actual!r}, what MoTE edits and reads)")
        module("ln_f_module", self.ln_f_module)
        head = module("lm_head_module", self.lm_head_module)
        if head is not None and not isinstance(getattr(head, "weight", None), torch.Tensor):
            problems.append(f"lm_head_module: {self.lm_head_module!r} has no weight (v* reads the output head's "
                            "weight)")
        last = max(self.layers)
        if self.v_loss_layer != -1 and not last <= self.v_loss_layer < n_layers:
            problems.append(f"v_loss_layer: {self.v_loss_layer} is outside this model's {n_layers} decoder layers "
                            f"(use -1 for the last layer, or a layer in [{last}, {n_layers - 1}])")
        if problems:
            raise ValueError(f"MoTE hyper-parameters do not fit this {type(model).__name__}: " + "; ".join(problems))
        self._warn_loading_flags(model)

    def _warn_loading_flags(self, model) -> None:
        """`fp16`, `model_parallel`, `device`: how EasyEdit's BaseEditor loads and places `model_name`. A model handed
        over already loaded keeps its dtype and placement; say so once per key when they disagree."""
        import torch

        param = next(model.parameters(), None)
        dispatched = getattr(model, "hf_device_map", None) is not None
        how = "the model was loaded by the caller; the key applies where EasyEdit's BaseEditor loads model_name"
        if self.fp16 and param is not None and param.dtype != torch.float16:
            _warn_once("fp16", f"fp16: true has no effect here: the model is {param.dtype} ({how})")
        if self.dtype is not None and param is not None and param.dtype != self.torch_dtype():
            _warn_once("dtype", f"dtype: {self.dtype} has no effect here: the model is {param.dtype} ({how})")
        if self.model_parallel and not dispatched:
            _warn_once("model_parallel", f"model_parallel: true has no effect here: the model is not dispatched over "
                                         f"devices ({how})")
        try:
            want = self.torch_device()
        except ValueError:  # a device this torch cannot use: `apply_mote_to_model` refuses it before this check
            want = None
        if want is not None and param is not None and not dispatched and param.device.type != "meta":
            if (param.device.type, param.device.index or 0) != (want.type, want.index or 0):
                _warn_once("device", f"device: {self.device!r}, but the model is on {param.device}: MoTE edits it "
                                     f"where it is (EasyEdit's BaseEditor moves a model to `device`)")

    def to_dict(self) -> dict:
        """Field name -> value (shallow: `dataclasses.asdict` would deep-copy a `(model, tok)` model_name)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), list) else v for f in fields(self)}

    def basis_settings(self) -> tuple:
        """What a layer's basis depends on: whether it has Tucker factors (solver mote; the other solvers use the
        projectors only) and the BASIS_FIELDS."""
        return (self.solver == "mote", *(getattr(self, name) for name in BASIS_FIELDS))

    def basis_rule(self) -> BasisRule:
        """How each batch's factors are taken from the layer's (`basis`, `auto` ranks, `min_coverage`)."""
        auto = tuple(getattr(self, name) == "auto" for name in ("r_e", "r_out", "r_in"))
        return BasisRule(basis=self.basis, auto=auto, min_coverage=self.min_coverage)

    def layer_ranks(self) -> tuple:
        """The ranks of the layer's fixed factors: the YAML's, full size (1.0) for an `auto` mode."""
        return tuple(1.0 if r == "auto" else r for r in (self.r_e, self.r_out, self.r_in))

    def vstar_config(self) -> VStarConfig:
        """The v* settings of these hyper-parameters (each field of VStarConfig is the key of the same name)."""
        return VStarConfig(**{f.name: getattr(self, f.name) for f in fields(VStarConfig)})

    @classmethod
    def default_vstar_config(cls, **changes) -> VStarConfig:
        """The v* settings at these keys' defaults, with `changes` (v* outside an edit, e.g. the testbed's probe)."""
        defaults = {f.name: f.default for f in fields(cls)}
        return VStarConfig(**{f.name: defaults[f.name] for f in fields(VStarConfig)} | changes)
