"""Editors side by side on one model and one set of records (the command line is examples/compare_editors.py).

Every method edits the same records in the same sequential batches (`batch_size`), starting from the same weights;
the weights are restored and a host method's adapters removed between methods. MoTE always runs (its v* as the YAML's
`v_objective` says); ROME, MEMIT, AlphaEdit, FT (FT-L, FT-M), LoRA (and AdaLoRA) and UnKE run when the EasyEdit host
provides them (`host_edit.HostEdit`). A method that cannot edit this model is reported as "not applicable" with the
reason (MoTE on a dense model; a dense method whose `rewrite_module_tmp` is not a 2-D weight, e.g. packed MoE experts),
a method without a host as "unavailable".

Metrics: the paper's, computed by the plugin (CounterFact probability metrics or MEMIT's zsRE token accuracies, see
`mote_plugin.metrics`), and with a host its token accuracies (`compute_edit_quality`: rewrite, rephrase, locality).
What running the host's editors takes (its key covariances, its working directory) is in `host_methods.py`; the
results are written by `results.write_results`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from ..loading import load_model, load_tokenizer
from ..metrics import counterfact_metrics, per_record, zsre_metrics
from ..mote.algebra.coverage import summarise
from ..mote.editor import MoTEEditor
from ..mote.hparams import DTYPES, MoTEHyperParams, hparams_path
from ..mote.mote_main import apply_mote_to_model, last_coverage
from .host_edit import HostEdit, HostMethodError, HostUnavailable, host_hparams
from .host_methods import host_quality, host_token_metrics, import_host, override
from .results import run_info, write_results

METRICS = ("efficacy", "generalization", "specificity", "utility")


@dataclass
class CompareConfig:
    model: str  # a fact-model build directory (with facts.json) or a Hugging Face model directory
    # method name -> hyper-parameter YAML (MoTE: hparams/MoTE/*.yaml; others: the host's format), or a mapping
    # {hparams: YAML, KEY: VALUE, ...} that overrides keys of that YAML for this comparison (`method_spec`)
    methods: dict
    dataset: str = "counterfact"  # counterfact | zsre
    data: str | None = None  # records file; None: the fact model's known facts (zsre: its known zsRE facts)
    n: int = 50  # records edited
    batch_size: int = 50  # records per edit call; batches are applied one after another
    out: str = "runs/compare"  # results directory (JSON, Markdown, PNG; the host's covariance cache)
    build: dict | None = None  # fact-model BuildOptions (arch, facts, ...) to build `model` first when missing
    covariance_texts: int = 2000  # corpus lines behind a dense baseline's key covariance
    host_metrics: bool = True  # also report the host's token accuracies when a host is importable
    dtype: str = "float32"  # the weights' dtype of the model every method edits: bfloat16 | float16 | float32

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "CompareConfig":
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(raw) - known), sorted({"model", "methods"} - set(raw))
        if unknown or missing:
            raise ValueError(f"{path}: unknown keys {unknown}, missing keys {missing} (known: {sorted(known)})")
        cfg = cls(**raw)
        if cfg.dataset not in ("counterfact", "zsre"):
            raise ValueError(f"{path}: dataset must be counterfact or zsre, got {cfg.dataset!r}")
        if not cfg.methods:
            raise ValueError(f"{path}: no methods")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"{path}: dtype must be one of {DTYPES}, got {cfg.dtype!r}")
        for name, entry in cfg.methods.items():
            hp_path, overrides = method_spec(name, entry)
            if "batch_size" in overrides:
                raise ValueError(f"{path}: methods: {name}: batch_size is the comparison's own (the config's "
                                 f"batch_size: {cfg.batch_size}), the same for every method")
            # unknown keys and bad values fail here, before any model is built
            if method_alg(name, hp_path) == "MoTE" and overrides:
                MoTEHyperParams.from_hparams(hp_path).updated(f"{path}: methods: {name}", **overrides)
        if cfg.n < 1 or cfg.batch_size < 1:
            raise ValueError(f"{path}: n and batch_size must be >= 1")
        if cfg.build is not None:
            try:
                from ..testbed import BuildOptions

                BuildOptions.from_dict(cfg.build)
            except TypeError as e:
                raise ValueError(f"{path}: build: {e}") from None
        return cfg


def method_alg(name: str, hp_path: str) -> str:
    """The editing algorithm of the `methods:` row `name`: its YAML's alg_name (a row's name is only its label, so a
    comparison may hold several rows of one algorithm, e.g. MoTE at two rank settings)."""
    try:
        path = hparams_path(hp_path)  # ".yaml" appended when missing, as every loader of a YAML here does
    except FileNotFoundError as e:
        raise ValueError(f"methods: {name}: no hyper-parameter file ({e}; relative paths are read from the working "
                         f"directory, {Path.cwd()})") from None
    alg = (yaml.safe_load(path.read_text()) or {}).get("alg_name")
    if not isinstance(alg, str):
        raise ValueError(f"methods: {name}: {path} has no alg_name")
    return alg


def method_spec(name: str, entry) -> tuple[str, dict]:
    """(YAML path, overrides) of a `methods:` entry: a path, or {hparams: path, KEY: VALUE, ...}."""
    if isinstance(entry, (str, os.PathLike)):
        return str(entry), {}
    if isinstance(entry, dict) and isinstance(entry.get("hparams"), (str, os.PathLike)):
        overrides = {k: v for k, v in entry.items() if k != "hparams"}
        return str(entry["hparams"]), overrides
    raise ValueError(f"methods: {name}: expected a hyper-parameter YAML path or {{hparams: PATH, KEY: VALUE, ...}}, "
                     f"got {entry!r}")


# ---------------------------------------------------------------------------------------------------------------
# model, records
# ---------------------------------------------------------------------------------------------------------------


def compared_model(cfg: CompareConfig):
    """(model, tok, fact rows or None): a fact model's CounterFact facts, or with `dataset: zsre` its zsRE rows."""
    path = Path(cfg.model)
    if cfg.build is not None:
        from ..testbed import BuildOptions, build

        build(path, BuildOptions.from_dict(cfg.build))
    if (path / "facts.json").exists():
        from ..testbed import load, load_zsre

        model, tok, facts = load(path)[:3]
        return model.to(getattr(torch, cfg.dtype)), tok, load_zsre(path) if cfg.dataset == "zsre" else facts
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (a fact-model build directory or a local model "
                                "directory)")
    return load_model(path, getattr(torch, cfg.dtype)), load_tokenizer(path), None


def _flat_counterfact(r: dict) -> dict:
    """A CounterFact record (flat EasyEdit or ROME format) as a flat EasyEdit record."""
    if "requested_rewrite" in r:
        rw = r["requested_rewrite"]
        return {"case_id": r.get("case_id"), "prompt": rw["prompt"].format(rw["subject"]), "subject": rw["subject"],
                "target_new": rw["target_new"]["str"], "ground_truth": rw["target_true"]["str"],
                "rephrase_prompt": (r.get("paraphrase_prompts") or [None])[0],
                "locality_prompt": (r.get("neighborhood_prompts") or [None])[0],
                "locality_ground_truth": rw["target_true"]["str"]}
    return r


def load_records(cfg: CompareConfig, facts: list[dict] | None, host=None) -> list[dict]:
    """The first `n` records. CounterFact: the fact model's known facts, or a file (the host's CounterFactDataset
    when a host is present, else the plugin's reader; either format). zsRE: the fact model's known zsRE facts (a build
    with `zsre_facts`), or a MEND/MEMIT zsRE file (the plugin's reader: the host's ZsreDataset drops `subject`, which
    every locate-then-edit method needs)."""
    if cfg.data is None:
        if facts is None:
            raise ValueError("data: needs a records file unless the model is a fact model")
        if not facts:
            raise ValueError(f"the fact model {cfg.model} has no {cfg.dataset} facts (zsRE: build it with zsre_facts "
                             "and zsre_data, docs/testbed.md), and data: names no records file")
        records = [f for f in facts if f["known"]]
    elif cfg.dataset == "counterfact" and host is not None:
        records = [_flat_counterfact(r) for r in host.CounterFactDataset(cfg.data)]
    else:
        with open(cfg.data) as f:
            raw = json.load(f)
        records = [_flat_counterfact(r) for r in raw] if cfg.dataset == "counterfact" else raw
    bad = [i for i, r in enumerate(records[: cfg.n]) if not r.get("subject")]
    if bad:
        raise ValueError(f"records {bad[:5]} of {cfg.data} have no `subject` (locate-then-edit methods need it)")
    if len(records) < cfg.n:
        raise ValueError(f"only {len(records)} records available, n = {cfg.n}")
    return records[: cfg.n]


def request_of(r: dict, dataset: str) -> dict:
    """The EasyEdit edit request of a record: a CounterFact record (either flat shape), or a MEND/MEMIT zsRE record
    (also the fact model's zsRE rows) as EasyEdit's ZsreDataset makes it, with the subject kept."""
    if dataset == "zsre":
        return {"prompt": r["src"], "subject": r["subject"], "target_new": r.get("alt") or r["answers"][0],
                "ground_truth": r["answers"][0], "rephrase_prompt": r["rephrase"],
                "locality": {"neighborhood": {"prompt": r["loc"], "ground_truth": r["loc_ans"]}}, "portability": {}}
    # case_id: the host's v* cache names its files by it (MEMIT, AlphaEdit)
    req = {"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
           "ground_truth": r.get("ground_truth") or r["target_true"], "case_id": r.get("case_id"), "portability": {},
           "locality": {}}
    rephrase = r.get("rephrase_prompt") or (r.get("paraphrase_prompts") or [None])[0]
    if rephrase:
        req["rephrase_prompt"] = rephrase
    neighbour = (r.get("neighbours") or [None])[0]
    if neighbour:
        req["locality"] = {"neighborhood": {"prompt": neighbour["prompt"], "ground_truth": neighbour["answer"]}}
    elif r.get("locality_prompt"):
        req["locality"] = {"neighborhood": {"prompt": r["locality_prompt"], "ground_truth": r["locality_ground_truth"]}}
    return req


def zsre_requests(rows: list[dict], n: int | None = None) -> list[dict]:
    """Edit requests (`request_of`) for the first `n` (all when None) known zsRE facts of a fact model's rows
    (`testbed.load_zsre`): the question, its subject, the new answer, the taught answer as `ground_truth`, the held-out
    paraphrase and the neighbour's question as locality. MoTE (`apply_mote_to_model`) and EasyEdit's editors take them
    as they are."""
    return [request_of(r, "zsre") for r in rows if r["known"]][:n]


# ---------------------------------------------------------------------------------------------------------------
# one method
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    method: str
    status: str  # ok | not applicable | unavailable
    reason: str = ""
    metrics: dict = field(default_factory=dict)  # the plugin's metrics (shares)
    host_metrics: dict = field(default_factory=dict)  # the host's token accuracies (means)
    edit_seconds: float = 0.0
    hparams: str = ""  # the YAML
    overrides: dict = field(default_factory=dict)  # the `methods:` entry's changes to it
    effective_hparams: dict = field(default_factory=dict)  # what the method ran with (YAML + overrides + the run's own)
    per_record: list = field(default_factory=list)  # per record: case_id, subject, the plugin's and the host's scores
    coverage: list = field(default_factory=list)  # MoTE: per edit call, what each solve's basis held (last_coverage)


def _as_dict(hp) -> dict:
    """Hyper-parameters as a JSON-ready dict (MoTE's and the host's dataclasses)."""
    d = hp.to_dict() if hasattr(hp, "to_dict") else dict(vars(hp))
    return {k: v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else repr(v) for k, v in d.items()}


def _host_setup(name: str, alg: str, hp_path: str, overrides: dict, model, tok, cfg: CompareConfig, host):
    """The `HostEdit` run of a host method `alg` (row `name`), or a MethodResult saying why it cannot run here."""
    try:
        hp = override(host_hparams(host, alg, hp_path), name, overrides)
        return HostEdit(hp, model, tok, stats_dir=Path(cfg.out) / "host-stats", workdir=Path(cfg.out),
                        covariance_texts=cfg.covariance_texts)
    except HostUnavailable as e:
        return MethodResult(name, "unavailable", str(e), hparams=hp_path)
    except HostMethodError as e:
        return MethodResult(name, "not applicable", str(e), hparams=hp_path)


class _MoTERun:
    """MoTE's run with HostEdit's interface: `edit` a batch (seconds), `undo` (weights and MoTE's state)."""

    def __init__(self, model, tok, hp: MoTEHyperParams):
        self.model, self.tok, self.hp = model, tok, hp
        self.originals: dict = {}
        self.coverage: list = []
        MoTEEditor(model).reset()  # a fresh start: no bases, memory or history of an earlier row

    def edit(self, requests: list[dict]) -> float:
        start = time.time()
        _, weights_copy = apply_mote_to_model(self.model, self.tok, requests, self.hp, copy=False,
                                              return_orig_weights=True)
        seconds = time.time() - start
        for k, v in weights_copy.items():
            self.originals.setdefault(k, v)
        self.coverage.append(last_coverage(self.model))
        return seconds

    def undo(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in self.originals.items():
                params[k].copy_(v)
        MoTEEditor(self.model).reset()


def run_method(name: str, entry, model, tok, records: list[dict], cfg: CompareConfig, host,
               before: dict) -> MethodResult:
    """Edit all records with one method (its `methods:` entry) in sequential batches, measure, and undo the edit
    (weights restored, a host method's adapters removed)."""
    hp_path, overrides = method_spec(name, entry)
    alg = method_alg(name, hp_path)
    run = _method_setup(name, alg, hp_path, overrides, model, tok, cfg, host)
    if isinstance(run, MethodResult):
        run.overrides = overrides
        return run
    # ROME edits one request per call inside HostEdit: every method gets the comparison's batches
    requests = [request_of(r, cfg.dataset) for r in records]
    try:
        seconds = sum(run.edit(copy.deepcopy(requests[i : i + cfg.batch_size]))
                      for i in range(0, len(requests), cfg.batch_size))
        result = MethodResult(name, "ok", metrics=plugin_metrics(model, tok, records, cfg),
                              edit_seconds=seconds, hparams=hp_path, overrides=overrides,
                              effective_hparams=_as_dict(run.hp), coverage=getattr(run, "coverage", []))
        host_rows = None
        if host is not None and cfg.host_metrics:
            result.host_metrics, host_rows = host_token_metrics(model, tok, requests, run.hp, before)
        result.per_record = record_rows(records, cfg, result.metrics, host_rows)
        return result
    finally:
        run.undo()


def _method_setup(name: str, alg: str, hp_path: str, overrides: dict, model, tok, cfg: CompareConfig, host):
    """The run of one method (`_MoTERun` or `HostEdit`: edit batch by batch, then undo), or the MethodResult saying why
    it cannot run here."""
    if alg == "MoTE":
        from ..adapters import get_adapter

        # batch_size: the run's, so the recorded hyper-parameters say how MoTE was called
        hp = MoTEHyperParams.from_hparams(hp_path).updated(f"methods: {name}",
                                                           **overrides | {"batch_size": cfg.batch_size})
        try:
            get_adapter(model)
        except ValueError as e:
            return MethodResult(name, "not applicable", f"not an MoE model: {e}", hparams=hp_path)
        return _MoTERun(model, tok, hp)
    if host is None:
        return MethodResult(name, "unavailable", "no EasyEdit host importable (see docs/easyedit.md)", hparams=hp_path)
    return _host_setup(name, alg, hp_path, overrides, model, tok, cfg, host)


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def reference(model, tok, records: list[dict], cfg: CompareConfig, host) -> dict:
    """What the host's locality compares against, from the unedited model."""
    ref = {}
    if host is not None and cfg.host_metrics:
        ref["host_locality"] = [host_quality(model, tok, request_of(r, cfg.dataset), None)["locality"] for r in records]
    return ref


def plugin_metrics(model, tok, records, cfg: CompareConfig) -> dict:
    if cfg.dataset == "zsre":
        return zsre_metrics(model, tok, records)
    return counterfact_metrics(model, tok, records)


def record_rows(records: list[dict], cfg: CompareConfig, metrics: dict, host_rows: list[dict] | None) -> list[dict]:
    """One row per record: its id, the plugin's scores (`metrics.per_record`) and the host's (prefixed `host_`)."""
    scores = per_record(metrics, records, cfg.dataset)
    return [{"case_id": r.get("case_id", i), "subject": r.get("subject"), **row,
             **{f"host_{k}": v for k, v in (host_rows[i] if host_rows else {}).items()}}
            for i, (r, row) in enumerate(zip(records, scores))]


# ---------------------------------------------------------------------------------------------------------------
# the whole comparison
# ---------------------------------------------------------------------------------------------------------------


def compare(cfg: CompareConfig, log=print, command: str = "compare()") -> dict:
    """Run every method of `cfg` and write results.{json,md,png} under `cfg.out`; the report records `command` (the
    command line that ran it) with the date, commit and machine (`results.run_info`)."""
    host, host_reason = import_host()
    log(f"EasyEdit host: {host_reason}")
    model, tok, facts = compared_model(cfg)
    shutil.rmtree(Path(cfg.out) / "host-stats", ignore_errors=True)  # key covariances of an earlier run's model
    records = load_records(cfg, facts, host)
    before = reference(model, tok, records, cfg, host)
    unedited = MethodResult("unedited", "ok", metrics=plugin_metrics(model, tok, records, cfg))
    host_rows = None
    if host is not None and cfg.host_metrics:
        requests = [request_of(r, cfg.dataset) for r in records]
        unedited.host_metrics, host_rows = host_token_metrics(model, tok, requests, None, before)
    unedited.per_record = record_rows(records, cfg, unedited.metrics, host_rows)
    results = [unedited]
    for name, entry in cfg.methods.items():
        log(f"{name}: editing {len(records)} records in batches of {cfg.batch_size}")
        results.append(run_method(name, entry, model, tok, records, cfg, host, before))
        log(f"{name}: {results[-1].status} {results[-1].reason}")
    report = run_info(command) | {"config": asdict(cfg), "host": host_reason, "versions": versions(host is not None),
                                  "n": len(records), "results": [asdict(r) for r in results]}
    for r in report["results"]:
        r["metrics"] = {k: v for k, v in r["metrics"].items() if not k.endswith("_items")}
    write_results(Path(cfg.out) / "results", report, markdown(report), {"": lambda plt: bar_chart(report, plt)})
    return report


def versions(with_host: bool) -> dict:
    """What produced the numbers: Python, torch, transformers, mote-plugin and, with a host, the EasyEdit checkout."""
    import platform

    import transformers

    from .._version import __version__
    from ..easyedit import host_version

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "mote_plugin": __version__}
    if with_host:
        out["easyeditor"] = host_version()
    return out


def edited(result: dict, n: int) -> int | None:
    """How many of the `n` requests a method's row edited: a MoTE row's from its coverage (each edit call's solves
    count the requests whose v* reached the target; the others are left out), a host method's all `n` (the host is
    handed every request and reports no count); None for the unedited row and a method that did not run."""
    if result["status"] != "ok" or not result.get("effective_hparams"):
        return None
    if result["effective_hparams"].get("alg_name") != "MoTE":
        return n
    return sum(call[0]["edits"] for call in result["coverage"] if call)


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"{report['n']} {cfg['dataset']} edits in batches of {cfg['batch_size']} on {cfg['model']}; host: "
             f"{report['host']}",
             "",
             "| method | status | edited | " + " | ".join(METRICS)
             + " | host rewrite | host rephrase | host locality | reproduced (min) | edit time (s) |",
             "|---|---|---|" + "---|" * (len(METRICS) + 5)]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']}: {r['reason']} |" + " |" * (len(METRICS) + 6))
            continue
        m, h = r["metrics"], r["host_metrics"]
        count = edited(r, report["n"])
        host_cells = [f"{h[k]:.3f}" if k in h else "-" for k in ("rewrite_acc", "rephrase_acc", "locality_acc")]
        lines.append(f"| {r['method']} | ok | {'-' if count is None else count}/{report['n']} | "
                     + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " | "
                     + " | ".join(host_cells) + f" | {_reproduced(r.get('coverage'))} | {r['edit_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _reproduced(coverage: list | None) -> str:
    """The share of the residuals MoTE's updates reproduced at their solve layers: the mean over every solve of every
    call, and the smallest single edit's share; "-" for a method without coverage (the host's)."""
    reproduced = summarise([c for call in coverage or [] for c in call]).get("reproduced")
    return "-" if reproduced is None else f"{reproduced['mean']:.2f} ({reproduced['min']:.2f})"


def bar_chart(report: dict, plt):
    """The plugin's metrics of every method that ran, side by side (results.png)."""
    ok = [r for r in report["results"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(1, len(ok))
    for i, r in enumerate(ok):
        ax.bar([j + i * width for j in range(len(METRICS))], [r["metrics"][k] for k in METRICS], width,
               label=r["method"])
    ax.set_xticks([j + width * (len(ok) - 1) / 2 for j in range(len(METRICS))], METRICS)
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['n']} {report['config']['dataset']} edits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
