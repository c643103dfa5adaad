"""MoTE hyper-parameters, loadable from an EasyEdit-style YAML file (`hparams/MoTE/<model>.yaml`).

A plain dataclass: importing it never touches an EasyEdit host. `mote_plugin.register()` makes it a subclass of the
host's `HyperParams` (host glue, `mote_plugin.easyedit`), as EasyEdit's own hyper-parameter classes are; EasyEdit only
reads its fields, so it edits the same either way. Each key is declared once, below, with its default and its check
(`setting`); the checks that involve several keys follow the fields (`_conflicts`). Values are validated on
construction (also when built directly), with messages naming the key; what depends on the model (module names,
`v_loss_layer`, the host's loading flags) is checked by `check_against_model` before an edit touches any weight.

Read like EasyEdit's own YAMLs: a quoted number of a numeric key is read with Python's `float()`, as EasyEdit's
`HyperParams.construct_float_from_scientific_notation` reads every quoted number ("1e-5", "0.5", " 2 ", "1_000"); an
integer key then needs a whole number ("25" -> 25, "2.5" refused). The ranks r_e / r_out / r_in are the exception: a
rank is an int (8), a share of the mode's size strictly between 0 and 1 (0.5), `full` or `auto`; a form that could
mean either a rank or a share (1.0, "1", 8.0, any quoted number) is refused, naming the form to write.

    alg_name: MoTE
    model_name: Qwen/Qwen3-30B-A3B
    layers: [3, 4, 5, 6, 7]
    device: 0
    mote_lambda: 0.1
    eps_whitening: 1e-5
    r_e: auto

Keys that say how the model is found or placed rather than how it is edited, kept so that a YAML reads as EasyEdit's
do and fails loudly where it does not fit:
- `device`: where a model loaded from `model_name` runs (EasyEdit's BaseEditor and `mote edit` move it there). A model
  handed over loaded is edited where it is (logged once when that is elsewhere); a device this torch cannot use is
  refused before any weight is touched.
- `mlp_module_tmp`, `experts_module_tmp` (as `layer_module_tmp`): the MoE block and packed experts of each edited layer,
  as the YAML's author names them. MoTE reaches them through the family's adapter; these keys state which modules the
  YAML means, and an edit is refused when they name others, so a YAML written for another layout never edits modules
  it did not name.
- `model_parallel`, `fp16`, `dtype`: how `model_name` is loaded; logged once when a model handed over loaded disagrees.
- `dequantize`: load a quantized checkpoint (MXFP4 experts) de-quantized; a model handed over with quantized experts
  is refused by the edit, naming this key.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from .._hooks import HPARAMS_CREATED, LOADED_WITH
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
RANK_WORDS = ("full", "auto")

# the keys a layer's basis (null-space projectors, Tucker factors) is computed from: the editor keeps one basis per
# layer and combination of these (`MoTEHyperParams.basis_settings`), so sequential batches share it
BASIS_FIELDS = (
    "r_e", "r_out", "r_in", "whitening", "eps_whitening", "hooi_sweeps", "nullspace", "nullspace_rule",
    "nullspace_threshold", "nullspace_min_tokens", "nullspace_fallback", "preservation_corpus", "preservation_tokens",
)  # fmt: skip


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_number(kind: str, value):
    """A YAML value of a field annotated `kind`, read as EasyEdit reads hyper-parameters: a string that `float()`
    accepts is a number (EasyEdit converts every such string; here only numeric fields, so a `model_name` or
    `stats_dir` made of digits stays a string). Fields typed `int` (and `device`, whose int N means cuda:N) take the
    whole number; a fraction is left for validation to refuse. Anything else (the ranks, typed `Rank`, included) comes
    back unchanged."""
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


def _is_device_name(text: str) -> bool:
    return re.fullmatch(r"cpu|mps|cuda(:\d+)?", text) is not None


def _is_template(text: str) -> bool:
    """`text` has exactly one `{}` and formats with a layer index."""
    try:
        return text.count("{}") == 1 and text.format(0) != text
    except (IndexError, KeyError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# the checks of single keys: check(name, value) -> what is wrong, or None
# ---------------------------------------------------------------------------------------------------------

Check = Callable[[str, object], "str | None"]


def _check(ok: Callable[[object], bool], what: str) -> Check:
    """None when `ok(value)`, else "<name> must be <what>, got <value>"."""
    return lambda name, value: None if ok(value) else f"{name} must be {what}, got {value!r}"


def _one_of(choices: tuple) -> Check:
    return _check(lambda v: v in choices, f"one of {choices}")


_POSITIVE = _check(lambda v: _is_number(v) and v > 0, "a number > 0")
_NON_NEGATIVE = _check(lambda v: _is_number(v) and v >= 0, "a number >= 0")
_POSITIVE_INT = _check(lambda v: _is_int(v) and v >= 1, "an int >= 1")
_COUNT = _check(lambda v: _is_int(v) and v >= 0, "an int >= 0")
_FLAG = _check(lambda v: isinstance(v, bool), "true or false")
_TEXT = _check(lambda v: isinstance(v, str), "a string")
_OPTIONAL_TEXT = _check(lambda v: v is None or isinstance(v, str), "null or a string")
_TEMPLATE = _check(lambda v: isinstance(v, str) and _is_template(v),
                   "a module name with one {} for the layer index (e.g. 'model.layers.{}')")
_DEVICE = _check(lambda v: (_is_int(v) and v >= 0) or (isinstance(v, str) and _is_device_name(v)),
                 "'cpu', 'cuda:N' or an int N >= 0")


def _layers_ok(layers) -> bool:
    return isinstance(layers, (list, tuple)) and len(layers) > 0 and all(_is_int(l) and l >= 0 for l in layers)


def _check_layers(name: str, layers) -> str | None:
    if not _layers_ok(layers):
        return f"{name} must be a non-empty list of non-negative ints, got {layers!r}"
    if len(set(layers)) != len(layers):
        return f"{name} has duplicates: {layers!r}"
    return None


def _check_v_objective(name: str, value) -> str | None:
    if value == "squared":
        return (f"{name} 'squared' was removed: use 'memit' (EasyEdit's compute_z objective; its penalty is "
                "v_weight_decay * ||delta|| / ||h||^2, so retune v_weight_decay)")
    return _one_of(V_OBJECTIVES)(name, value)


def _is_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_rank(r) -> bool:
    if isinstance(r, str):
        return r in RANK_WORDS
    return (_is_int(r) and r >= 1) or (isinstance(r, float) and 0.0 < r < 1.0)


def _check_rank(name: str, r) -> str | None:
    """A Tucker rank: an int >= 1 (that many factors), a float strictly between 0 and 1 (that share of the mode's size,
    rounded up), `full` (the mode's size) or `auto` (from each batch's coverage). A float >= 1 or a quoted number could
    be read either way, so it is refused with the form to write."""
    if _is_rank(r):
        return None
    forms = "an int rank >= 1, a share of the mode's size in (0, 1), 'full' or 'auto'"
    hint = ""
    if isinstance(r, float) and r == 1.0:
        hint = f": write `{name}: full` for the mode's full size or `{name}: 1` for rank 1"
    elif isinstance(r, float) and r > 1.0 and r.is_integer():
        hint = f": write `{name}: {int(r)}` for rank {int(r)}"
    elif isinstance(r, str) and _is_numeric(r):
        hint = ": a number in quotes is ambiguous (a rank or a share?): write it unquoted, or full"
    return f"{name} must be {forms}, got {r!r}{hint}"


def setting(default=MISSING, check: Check | None = None):
    """A hyper-parameter's declaration: its default (none: the key is required) and the check of its value."""
    return field(default=default, metadata={"check": check})


# a rank's type (`_check_rank`), a name of its own so that a quoted number stays a string for the check to refuse
Rank = int | float | str


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


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _template_hint(key: str, actual: str | None) -> str:
    """"; this model has it at 'model.language_model.layers.3': set `layer_module_tmp: model.language_model.layers.{}`"
    for a template key (the module MoTE would use, its layer number made the template's {}), or the name to set for
    a plain key; "" when the model has no such module."""
    if actual is None:
        return ""
    layer = re.search(r"\.layers\.(\d+)(\.|$)", actual)
    setting = actual if layer is None else actual[: layer.start(1)] + "{}" + actual[layer.end(1):]
    return f"; this model has it at {actual!r} (e.g. an image-text model's language model): set `{key}: {setting}`"


def _warn_once(key: str, message: str) -> None:
    """Log `message` the first time `key` has something to say in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


@dataclass
class MoTEHyperParams(HostHyperParams):
    alg_name: str = setting(check=_check(lambda v: v == "MoTE", "'MoTE'"))
    model_name: str = setting()  # HF name or local path (EasyEdit may later set it to (model, tok))
    # edited decoder layers (each must hold a sparse MoE block); the last one is L
    layers: list[int] = setting(check=_check_layers)
    device: str | int = setting(check=_DEVICE)  # "cpu", an int N (= cuda:N) or "cuda:N" (see the module docstring)
    fact_token: str = setting("subject_last", _one_of(FACT_TOKENS))  # lookup token: subject_last | subject_first | last
    layer_module_tmp: str = setting("model.layers.{}", _TEMPLATE)  # decoder layer module (v* is added to its output)
    mlp_module_tmp: str = setting("model.layers.{}.mlp", _TEMPLATE)  # MoE block module (checked: module docstring)
    experts_module_tmp: str = setting("model.layers.{}.mlp.experts", _TEMPLATE)  # packed experts module (likewise)
    ln_f_module: str = setting("model.norm", _TEXT)  # final norm (v* optimisation; must exist in the model)
    lm_head_module: str = setting("lm_head", _TEXT)  # output head (v* optimisation; a module with a `weight`)
    v_num_grad_steps: int = setting(25, _COUNT)  # Adam steps of the v* optimisation
    v_lr: float = setting(0.5, _POSITIVE)  # v* learning rate
    # layer whose output feeds the v* loss: -1 = last layer, else in [max(layers), n_layers - 1]
    v_loss_layer: int = setting(-1, _check(_is_int, "an int (-1 = last layer)"))
    v_weight_decay: float = setting(0.5, _NON_NEGATIVE)  # v* penalty weight, on ||delta|| / ||h||^2
    clamp_norm_factor: float = setting(4.0, _POSITIVE)  # ||delta|| <= clamp_norm_factor * ||h||
    kl_factor: float = setting(0.0625, _NON_NEGATIVE)  # weight of the KL term keeping "{subject} is a" stable
    # memit (EasyEdit's compute_z objective, computed by the plugin) | memit_host (the host's own compute_z)
    v_objective: str = setting("memit", _check_v_objective)
    # requests optimised together in v* (null: all requests of the call)
    v_batch_size: int | None = setting(None, _check(lambda v: v is None or _is_int(v) and v > 0, "null or an int >= 1"))
    # edit requests whose v* left P(target token) < 1/2 anyway (default: leave them out)
    v_keep_failed: bool = setting(False, _FLAG)
    mote_lambda: float = setting(0.1, _POSITIVE)  # ridge lambda of the core solve
    # Tucker ranks (`_check_rank`): an int = that many factors, a float in (0, 1) = that share of the mode's size,
    # full = the mode's size, auto = the fewest leading factors holding min_coverage of each batch's edit in that mode
    # (chosen per batch, reported with the coverage)
    r_e: Rank = setting("full", _check_rank)  # expert mode (the routed gate vectors)
    r_out: Rank = setting(0.5, _check_rank)  # output mode, d_model (the v* residuals)
    r_in: Rank = setting(0.5, _check_rank)  # input mode, expert hidden (the projected keys)
    # `auto` ranks: the share of a mode's edit energy its factors must hold (batch mean)
    min_coverage: float = setting(0.9, _check(lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"))
    # the factors a batch is solved in: weights (the HOSVD of the weights, the paper's) | weights+edit (plus the
    # batch's residuals in U_out and its projected keys in U_in; needs a spread that captures keys at every layer) |
    # weights+edit+gates (and the batch's gate vectors in U_e). Solver mote; the unstructured solvers have no basis and
    # ignore it and the ranks.
    basis: str = setting("weights", _one_of(BASES))
    # warn when the update at a solve layer reproduces less than this share of the residual it aimed at (batch mean;
    # docs/method.md says how 0.3 was chosen; 0: never)
    min_reproduced: float = setting(0.3, _check(lambda v: _is_number(v) and 0 <= v <= 1,
                                                "a number in [0, 1] (0: never warn)"))
    whitening: str = setting("in", _one_of(WHITENINGS))  # HOSVD whitening: none | in | out | both
    eps_whitening: float = setting(1e-5, _NON_NEGATIVE)  # covariance regulariser of the whitening
    hooi_sweeps: int = setting(0, _COUNT)  # HOOI refinement sweeps after the HOSVD
    nullspace: bool = setting(True, _FLAG)  # project updates onto each expert's key null space
    # relative (share of trace kept) | absolute (eigenvalue cut-off: AlphaEdit's rule) | covariance (not a projection:
    # MEMIT's preservation term per expert, weighted by mote_lambda; nullspace.py)
    nullspace_rule: str = setting("relative", _one_of(RULES))
    # threshold of the rule (relative: in (0, 1]; absolute: AlphaEdit's 2e-2; covariance: the ridge added to each
    # expert's key covariance, a share of its mean eigenvalue)
    nullspace_threshold: float = setting(1e-2, _POSITIVE)
    nullspace_min_tokens: int = setting(8, _COUNT)  # experts with fewer preservation tokens get the fallback
    nullspace_fallback: str = setting("freeze", _one_of(FALLBACKS))  # freeze (never edit) | identity (unprotected)
    preservation_tokens: int = setting(20000, _POSITIVE_INT)  # corpus tokens behind the preservation statistics
    # None = shipped text; a text file path; or a `datasets` name/path
    preservation_corpus: str | None = setting(None, _OPTIONAL_TEXT)
    # multi-layer schedule: core (G^L / (L-l+1)) | residual (MEMIT-style re-capture) | layerwise (MoEEdit)
    spread: str = setting("core", _one_of(SPREADS))
    # mote (Tucker core) | global (unstructured Woodbury) | bcd (MoEEdit's block-coordinate descent)
    solver: str = setting("mote", _one_of(SOLVERS))
    bcd_passes: int = setting(4, _POSITIVE_INT)  # bcd: sweeps over the experts
    bcd_seed: int = setting(42, _COUNT)  # bcd: seed of the random expert order
    # lambda * (1 + lambda_growth * edits so far); MoEEdit's sequential runs use 1e-3
    lambda_growth: float = setting(0.0, _NON_NEGATIVE)
    stats_dir: str = setting("./.cache/mote-stats", _TEXT)  # cache of the preservation statistics
    # cache of v* targets per (model fingerprint, layer, request); None = off
    vstar_cache_dir: str | None = setting(None, _OPTIONAL_TEXT)
    # requests per edit call of EasyEdit's batch_edit and `mote edit` (EasyEdit's edit() needs 1)
    batch_size: int = setting(1, _POSITIVE_INT)
    sequential_memory: bool = setting(False, _FLAG)  # keep earlier edits' keys in the solve across sequential batches
    max_length: int = setting(128, _POSITIVE_INT)  # token limit of prompts and of statistics windows
    model_parallel: bool = setting(False, _FLAG)  # loading flag: EasyEdit's BaseEditor loads with device_map="auto"
    fp16: bool = setting(False, _FLAG)  # loading flag: EasyEdit's BaseEditor loads model_name in float16
    # loading dtype of model_name: bfloat16 | float16 | float32; null = EasyEdit's rule (float16 if fp16 else float32)
    dtype: str | None = setting(None, _check(lambda v: v is None or v in DTYPES, f"null or one of {DTYPES}"))
    # loading flag: a quantized checkpoint (GPT-OSS's MXFP4 experts) is loaded de-quantized, in `dtype` (BaseEditor by
    # model_name, `mote edit`); MoTE edits de-quantized experts only
    dequantize: bool = setting(False, _FLAG)

    def __post_init__(self):
        for f in fields(self):  # YAML "lambda: 1" is an int: a float key stores a float
            if f.type == "float" and _is_int(getattr(self, f.name)):
                setattr(self, f.name, float(getattr(self, f.name)))
        errors = [error for f in fields(self) if f.metadata.get("check") is not None
                  and (error := f.metadata["check"](f.name, getattr(self, f.name))) is not None]
        errors += self._conflicts()
        if errors:
            raise ValueError("invalid MoTE hyper-parameters: " + "; ".join(errors))
        for hook in HPARAMS_CREATED:  # the package root's: registers MoTE with an importable EasyEdit host
            hook()

    def _conflicts(self) -> list[str]:
        """What is wrong with several keys together (each key's own check is at its declaration)."""
        problems: list[str] = []

        def need(ok: bool, msg: str):
            if not ok:
                problems.append(msg)

        need(not (self.sequential_memory and self.solver != "mote"),
             f"sequential_memory needs solver 'mote' (the {self.solver!r} solver keeps no memory of past edits)")
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
        need(not (self.nullspace and self.nullspace_rule == "covariance" and self.solver != "global"),
             f"nullspace_rule 'covariance' (MEMIT's preservation term, not a projection) is defined for solver "
             f"'global' (MEMIT on the routed experts); the {self.solver!r} solver's basis and coverage assume a "
             "projector: use rule 'relative' or 'absolute' with it")
        if self.nullspace_rule == "relative" and _is_number(self.nullspace_threshold):
            need(self.nullspace_threshold <= 1,
                 f"relative nullspace_threshold must be in (0, 1], got {self.nullspace_threshold}")
        if _is_int(self.v_loss_layer) and self.v_loss_layer != -1 and _layers_ok(self.layers):
            need(self.v_loss_layer >= max(self.layers),
                 f"v_loss_layer must be -1 (the last layer) or a layer at or above the last edited one, "
                 f"max(layers) = {max(self.layers)}; got {self.v_loss_layer}")
        need(not (self.fp16 and self.dtype not in (None, "float16")),
             f"fp16: true loads float16, but dtype is {self.dtype!r}: set one of them (fp16: false, or dtype: float16)")
        return problems

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
        problems: dict[str, str] = {}  # key -> its problem (the first layer's: a template is wrong for every layer)
        names = {m: n for n, m in model.named_modules()}

        def module(key: str, name: str, want=None):
            try:
                return model.get_submodule(name)
            except AttributeError:
                hint = _template_hint(key, names.get(want)) if want is not None else ""
                problems.setdefault(key, f"{key}: the model has no module {name!r}{hint}")
                return None

        for layer in self.layers:
            if not 0 <= layer < n_layers:
                continue  # reported by the edit's own layer check (out of range / dense MLP)
            block = adapter.moe_block(model, layer)
            expected = {"layer_module_tmp": adapter.decoder_layers(model)[layer], "mlp_module_tmp": block,
                        "experts_module_tmp": adapter.experts(block) if block is not None else None}
            for key, want in expected.items():
                name = getattr(self, key).format(layer)
                found = module(key, name, want)
                if found is not None and want is not None and found is not want:
                    actual = names.get(want, "?")
                    problems.setdefault(key, f"{key}: {name!r} is not the {adapter.family} {key.split('_')[0]} module "
                                             f"of layer {layer} ({actual!r}, what MoTE edits and reads)")
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        final_norm = f"{names.get(decoder)}.{self.ln_f_module.rpartition('.')[2]}" if decoder in names else None
        module("ln_f_module", self.ln_f_module,
               model.get_submodule(final_norm) if final_norm and _has_module(model, final_norm) else None)
        head = module("lm_head_module", self.lm_head_module)
        if head is not None and not isinstance(getattr(head, "weight", None), torch.Tensor):
            problems["lm_head_module"] = (f"lm_head_module: {self.lm_head_module!r} has no weight (v* reads the "
                                          "output head's weight)")
        last = max(self.layers)
        if self.v_loss_layer != -1 and not last <= self.v_loss_layer < n_layers:
            problems["v_loss_layer"] = (f"v_loss_layer: {self.v_loss_layer} is outside this model's {n_layers} "
                                        f"decoder layers (use -1 for the last layer, or a layer in [{last}, "
                                        f"{n_layers - 1}])")
        if problems:
            raise ValueError(f"MoTE hyper-parameters do not fit this {type(model).__name__}: "
                             + "; ".join(problems.values()))
        self._warn_loading_flags(model)

    def _warn_loading_flags(self, model) -> None:
        """`fp16`, `model_parallel`, `device`: how EasyEdit's BaseEditor loads and places `model_name`. A model handed
        over already loaded keeps its dtype and placement; say so once per key when they disagree."""
        import torch

        param = next(model.parameters(), None)
        dispatched = getattr(model, "hf_device_map", None) is not None
        loaded_with = getattr(model, LOADED_WITH, None)  # set when the plugin's loader loaded it (BaseEditor, CLI)
        how = "the model was loaded by the caller; the key applies where EasyEdit's BaseEditor loads model_name"
        if self.fp16 and param is not None and param.dtype != torch.float16:
            _warn_once("fp16", f"fp16: true has no effect here: the model is {param.dtype} ({how})")
        if self.dtype is not None and param is not None and param.dtype != self.torch_dtype():
            _warn_once("dtype", f"dtype: {self.dtype} has no effect here: the model is {param.dtype} ({how})")
        if self.model_parallel and not dispatched:
            if loaded_with is not None and loaded_with.get("device_map") is not None:
                where = param.device if param is not None else "one device"
                _warn_once("model_parallel", f"model_parallel: true: the model was loaded with device_map="
                                             f"{loaded_with['device_map']!r}, which put all of it on {where} (one "
                                             "device is all there is to spread it over here)")
            else:
                _warn_once("model_parallel", f"model_parallel: true has no effect here: the model is not dispatched "
                                             f"over devices ({how})")
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
        """The ranks of the layer's fixed factors in the form `tucker.resolve_ranks` reads (an int, or a share of the
        mode's size in (0, 1] with 1.0 the full size): the YAML's, 1.0 for `full` and for an `auto` mode (the layer
        keeps the full factor; each batch takes a prefix of it)."""
        return tuple(1.0 if r in RANK_WORDS else r for r in (self.r_e, self.r_out, self.r_in))

    def vstar_config(self) -> VStarConfig:
        """The v* settings of these hyper-parameters (each field of VStarConfig is the key of the same name)."""
        return VStarConfig(**{f.name: getattr(self, f.name) for f in fields(VStarConfig)})

    @classmethod
    def default_vstar_config(cls, **changes) -> VStarConfig:
        """The v* settings at these keys' defaults, with `changes` (v* outside an edit, e.g. the testbed's probe)."""
        defaults = {f.name: f.default for f in fields(cls)}
        return VStarConfig(**{f.name: defaults[f.name] for f in fields(VStarConfig)} | changes)
