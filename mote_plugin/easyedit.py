"""MoTE in an EasyEdit host (`easyeditor`): selected by its YAML like ROME or MEMIT.

    from easyeditor import BaseEditor
    from mote_plugin import MoTEHyperParams
    hparams = MoTEHyperParams.from_hparams("hparams/MoTE/qwen3-30b-a3b")    # registers MoTE with the host
    editor = BaseEditor.from_hparams(hparams)

Registration is `register()` (`mote_plugin.register`), which constructing or loading `MoTEHyperParams`
(`register_with_host`), `hparams_class` and the comparison call: importing the plugin never imports or changes a host.
It is idempotent and never raises (it returns a `HostStatus` saying what happened; `strict=True` raises instead).

EasyEdit has no registration API (its easyeditor/util/alg_dict.py and editors/editor.py): `BaseEditor` looks the
algorithm up in the module-level dict `easyeditor.util.alg_dict.ALG_DICT`, `batch_edit` asserts
`BatchEditor.is_batchable_method(alg_name)` against a hard-coded list, `BaseEditor.__init__` loads `model_name` by
substring ('qwen3', 'llama', 'gpt', ...) in float16 or float32 only, raising a bare NotImplementedError for other
names, and `edit()` asserts `batch_size == 1`. `register` adds the dict entry, wraps that check, and wraps
`BaseEditor` for MoTE only: `__init__` loads a MoTE `model_name` with the plugin's loader (`load_model`: the YAML's
`dtype`, every MoE family), and the name (or a `(model, tok)` pair's model name) is what the editor and
hyper-parameters keep, as the host's evaluators need a string; `edit()` reads `batch_size` as 1, so the YAML's
batch size serves `batch_edit`. Every other algorithm keeps the host's behaviour. Last, `MoTEHyperParams` becomes a
subclass of the host's `HyperParams`, as EasyEdit's own hyper-parameter classes are.

The stale PyPI release (easyeditor 0.0.1.dev0, 2023) hard-codes CUDA devices and cannot run MEMIT's v* on
transformers 5; it is recognised (no AlphaEdit in its ALG_DICT) and refused with a message.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import re
from dataclasses import dataclass

from .host_stubs import install as install_vision_stubs  # noqa: F401  (public: the CPU set-up, docs/easyedit.md)

log = logging.getLogger(__name__)

ALG_NAME = "MoTE"
HOST_HINT = ("clone https://github.com/zjunlp/EasyEdit and put the checkout on PYTHONPATH "
             "(the PyPI release easyeditor 0.0.1.dev0 is too old to run on CPU or with transformers 5)")

# BaseEditor.__init__ (EasyEdit 14cea82) picks a loader by the first of these substrings found in model_name.lower();
# the generic ones (llama, qwen2, qwen3, mistral) load any Hugging Face causal LM with AutoModelForCausalLM /
# AutoTokenizer. The others load other classes (T5, GPT2Tokenizer, AutoModel, remote code), and a name without any
# raises NotImplementedError.
HOST_NAME_ORDER = ("t5", "chatglm-api", "gpt-3.5", "gpt", "llama", "baichuan", "chatglm", "internlm", "qwen2", "qwen3",
                   "qwen", "mistral")
# the tokenizer arguments of its qwen2 / qwen3 branch
HOST_QWEN_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


class HostError(RuntimeError):
    """An `easyeditor` is importable but cannot host MoTE (the message says why and what to do)."""


@dataclass(frozen=True)
class HostStatus:
    registered: bool
    reason: str

    def __bool__(self) -> bool:
        return self.registered


def _installed_version() -> str | None:
    """The version pip recorded for `easyeditor` (None for a git checkout on PYTHONPATH, which has no metadata)."""
    try:
        return importlib.metadata.version("easyeditor")
    except importlib.metadata.PackageNotFoundError:
        return None


def _host_modules():
    """(alg_dict module, batch_editor module), or raise ImportError / HostError."""
    if importlib.util.find_spec("easyeditor") is None:
        raise ImportError("easyeditor is not installed")
    # `import easyeditor.util.alg_dict as m` breaks after the package's star-imports rebind `easyeditor.util`;
    # importlib.import_module resolves through sys.modules instead.
    try:
        alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    except Exception as e:
        version = _installed_version()
        if version and version.startswith("0.0."):
            raise HostError(f"easyeditor {version} (the stale PyPI release) does not import here ({type(e).__name__}: "
                            f"{e}); MoTE needs the current EasyEdit: {HOST_HINT}") from e
        raise
    if "AlphaEdit" not in alg_dict.ALG_DICT:
        raise HostError(f"the importable easyeditor ({alg_dict.__file__}) is the stale 2023 release (its ALG_DICT has "
                        f"no AlphaEdit); MoTE needs the current EasyEdit: {HOST_HINT}")
    return alg_dict, importlib.import_module("easyeditor.editors.batch_editor")


def apply_mote(model, tok, requests, hparams, **kwargs):
    """The host's ALG_DICT["MoTE"]: `mote_plugin.apply_mote_to_model`, imported on the first edit (registering stays
    cheap: it never imports the editor)."""
    from .mote.mote_main import apply_mote_to_model

    return apply_mote_to_model(model, tok, requests, hparams, **kwargs)


def _admit_to_batch_edit(batch_editor) -> None:
    cls = batch_editor.BatchEditor
    check = cls.is_batchable_method
    if getattr(check, "_admits_mote", False):
        return

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name == ALG_NAME or check(alg_name)

    is_batchable_method._admits_mote = True
    cls.is_batchable_method = staticmethod(is_batchable_method)


def host_branch(model_name: str) -> str | None:
    """The substring of HOST_NAME_ORDER by which BaseEditor would pick its loader for `model_name` (None: it raises)."""
    lower = model_name.lower()
    return next((s for s in HOST_NAME_ORDER if s in lower), None)  # the host tests them in this order


def load_model(model_name: str, hparams):
    """(model, tok) of a MoTE `model_name` for BaseEditor (through `mote_plugin.loading`, the loader of the CLI and the
    comparison too): AutoModelForCausalLM in `hparams.torch_dtype()` (the YAML's `dtype`; without it EasyEdit's
    rule, float16 when `fp16`, else float32), device_map="auto" when `model_parallel`, de-quantized when
    `dequantize`; the tokenizer as EasyEdit's generic branches load it (Qwen names with its "<|endoftext|>" special
    tokens; pad token = EOS where missing, or always for Llama / Mistral names), left padding, which the host gives
    every autoregressive tokenizer for MoTE.
    The host itself loads only in float16 or float32, and every family but its generic ones not at all (GPT-OSS would
    get GPT2Tokenizer, OLMoE and DeepSeek-V3 a NotImplementedError)."""
    from .loading import load_model as load
    from .loading import load_tokenizer

    device_map = "auto" if getattr(hparams, "model_parallel", False) else None
    branch = host_branch(model_name)
    tok_kwargs = HOST_QWEN_TOKENS if branch in ("qwen2", "qwen3") else {}
    try:
        model = load(model_name, hparams.torch_dtype(), device_map, dequantize=getattr(hparams, "dequantize", False))
        tok = load_tokenizer(model_name, **tok_kwargs)
    except Exception as e:
        raise ValueError(f"model_name {model_name!r}: the plugin could not load it ({type(e).__name__}: {e}); load "
                         "the model yourself and set `hparams.model_name = (model, tok)` before "
                         "BaseEditor.from_hparams") from e
    if tok.pad_token_id is None or branch in ("llama", "mistral"):
        tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "left"
    return model, tok


def _name_of(model) -> str:
    return getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__


def _wrap_base_editor(editor_module) -> None:
    """MoTE's model loading inside `BaseEditor.__init__` (module docstring); other algorithms are passed through."""
    cls = editor_module.BaseEditor
    init = cls.__init__
    if getattr(init, "_loads_mote", False):
        return

    @functools.wraps(init)
    def __init__(self, hparams, *args, **kwargs):
        if getattr(hparams, "alg_name", None) != ALG_NAME:
            return init(self, hparams, *args, **kwargs)
        given = hparams.model_name
        hparams.torch_device()  # a device this torch cannot use: refused before loading, naming `device`
        if isinstance(given, str):
            hparams.model_name = load_model(given, hparams)
        try:
            init(self, hparams, *args, **kwargs)
        finally:
            if not isinstance(hparams.model_name, str):  # (model, tok): the host's evaluators call model_name.lower()
                hparams.model_name = given if isinstance(given, str) else _name_of(hparams.model_name[0])
        self.model_name = hparams.model_name

    __init__._loads_mote = True
    cls.__init__ = __init__
    for name in SINGLE_EDIT_METHODS:
        if callable(method := getattr(cls, name, None)) and not getattr(method, "_single_for_mote", False):
            setattr(cls, name, _one_request_per_call(method))


# BaseEditor methods that edit one request per apply call and assert `hparams.batch_size == 1` (edit() calls
# edit_requests); batch_edit chunks the requests by batch_size
SINGLE_EDIT_METHODS = ("edit_requests", "generate_edit")


def _one_request_per_call(method):
    """`method` run for MoTE with `hparams.batch_size` read as 1 (and given back afterwards), so that one YAML serves
    both edit() (one request per call, which the host asserts) and batch_edit() (the YAML's batch_size per call)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hp = getattr(self, "hparams", None)
        size = getattr(hp, "batch_size", 1)
        if getattr(hp, "alg_name", None) != ALG_NAME or size == 1:
            return method(self, *args, **kwargs)
        hp.batch_size = 1
        try:
            return method(self, *args, **kwargs)
        finally:
            hp.batch_size = size

    wrapper._single_for_mote = True
    return wrapper


def _bind_hyperparams(host_base: type) -> None:
    """Make `MoTEHyperParams` a subclass of the host's `HyperParams` (in place of its placeholder base,
    `HostHyperParams`), so that code written for EasyEdit's classes (`isinstance(hparams, HyperParams)`, `from_json`)
    accepts it. Its own methods (`from_hparams`, `to_dict`) take precedence; EasyEdit's `HyperParams` adds no fields."""
    from .mote.hparams import HostHyperParams, MoTEHyperParams

    base = host_base if isinstance(host_base, type) and host_base is not object else HostHyperParams
    if MoTEHyperParams.__bases__ != (base,):
        try:
            MoTEHyperParams.__bases__ = (base,)
        except TypeError as e:  # a host class of another layout: MoTE edits the same, only isinstance() differs
            log.info("MoTEHyperParams keeps its own base class (%s)", e)


def register(strict: bool = False) -> HostStatus:
    """Make "MoTE" selectable in the importable EasyEdit host. Idempotent.

    Returns a `HostStatus` (truthy when MoTE is registered). With no host installed, or a host that fails to
    import, nothing happens and the status says why; `strict=True` raises instead (ImportError / HostError).
    The stale PyPI host raises `HostError` with `strict`, else it is reported in the status.
    """
    try:
        alg_dict, batch_editor = _host_modules()
        editor = importlib.import_module("easyeditor.editors.editor")
        host_hparams = importlib.import_module("easyeditor.util.hparams")
    except Exception as e:
        if strict:
            raise
        known = isinstance(e, (ImportError, HostError))
        reason = str(e) if known else f"easyeditor failed to import ({type(e).__name__}: {e})"
        log.info("MoTE not registered with EasyEdit: %s", reason)
        return HostStatus(False, reason)
    alg_dict.ALG_DICT[ALG_NAME] = apply_mote
    _admit_to_batch_edit(batch_editor)
    _wrap_base_editor(editor)
    _bind_hyperparams(getattr(host_hparams, "HyperParams", object))
    return HostStatus(True, f"MoTE registered in {alg_dict.__name__}.ALG_DICT ({len(alg_dict.ALG_DICT)} algorithms)")


_IMPORT_TRIED = False


def register_with_host() -> None:
    """Register MoTE with an importable host, quietly: what constructing or loading `MoTEHyperParams` does, so that an
    EasyEdit script that only names the class selects MoTE by its YAML. A host already imported (EasyEdit's scripts
    import it first) is registered with at once; one not yet imported is imported once per process. Never raises: a
    host that cannot import or host MoTE is left alone (`register()` says why)."""
    global _IMPORT_TRIED
    import sys

    if is_registered():
        return
    if "easyeditor" not in sys.modules:
        if _IMPORT_TRIED:
            return
        _IMPORT_TRIED = True  # one look (and import) per process: hyper-parameters are constructed often
        if importlib.util.find_spec("easyeditor") is None:
            return
    register()


def is_registered() -> bool:
    """True when the host's ALG_DICT (if the host is already imported) maps "MoTE" to the plugin."""
    import sys

    module = sys.modules.get("easyeditor.util.alg_dict")
    return module is not None and getattr(module, "ALG_DICT", {}).get(ALG_NAME) is apply_mote


def host_version() -> dict:
    """Which `easyeditor` is importable: its directory, pip's version (None for a checkout on PYTHONPATH) and, for a
    git checkout, the commit (None where git cannot tell)."""
    import subprocess
    from pathlib import Path

    spec = importlib.util.find_spec("easyeditor")
    if spec is None or spec.origin is None:
        return {"path": None, "version": None, "commit": None}
    root = Path(spec.origin).resolve().parent.parent
    try:
        run = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = run.stdout.strip() if run.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"path": str(root), "version": _installed_version(), "commit": commit}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def hparams_class(alg_name: str) -> type:
    """The hyper-parameter class of an editing method, for scripts that pick it by name:

        editing_hparams = hparams_class(args.editing_method)

    "MoTE" gives `MoTEHyperParams`. With a host importable, MoTE is registered first (`register()`), so the script
    that asked can hand the class to the host's BaseEditor. Other names need a host and
    give its class, matched by name as EasyEdit spells them ("MEMIT" -> MEMITHyperParams, "R-ROME" ->
    R_ROMEHyperParams, "SERAC" -> SERACHparams; training and multimodal classes are not matched). An unknown name
    raises NotImplementedError, as the if/elif chains of EasyEdit's example scripts do, naming what is known.
    """
    from .mote.hparams import MoTEHyperParams

    register()
    if alg_name == ALG_NAME:
        return MoTEHyperParams
    try:
        host = importlib.import_module("easyeditor")
    except Exception as e:
        raise NotImplementedError(f"editing method {alg_name!r}: only MoTE is available without an EasyEdit host "
                                  f"({type(e).__name__}: {e})") from e
    classes = {}
    for attr in dir(host):
        match = re.fullmatch(r"(.+?)_?(HyperParams|Hparams)", attr)
        if match and not re.search("Training|Multimodal", attr) and isinstance(value := getattr(host, attr), type):
            classes[_norm(match.group(1))] = value
    cls = classes.get(_norm(alg_name))
    if cls is None:
        known = ", ".join(sorted({MoTEHyperParams.__name__, *(c.__name__ for c in classes.values())}))
        raise NotImplementedError(f"no hyper-parameter class for editing method {alg_name!r} (known: {known})")
    return cls
