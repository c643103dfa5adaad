"""MoTE's quality as a method: every setting chosen on a dev split of known facts, every number reported on a test
split.

    python benchmarks/quality.py                                    # benchmarks/configs/quality.yaml, all phases
    python benchmarks/quality.py --arch qwen3_moe --only tune test  # some archs / phases (results are merged)

Per fact model (the `builds:` of the config, built from the data shipped with the package when missing):

  splits     the build's known facts in facts.json order: dev = the first `dev`, test = all the known facts after them
             (at most `test`), in batches of `batch_size` (the last one may be smaller). No setting is chosen on a test
             fact.
  tune       per method, every combination of the `tune:` grid (the method's own `tune:` where it has one; on top of the
             arch's testbed YAML and the method's own overrides) edits the dev facts in sequential batches; the best dev
             utility wins (ties: grid order). Host rows (`host_methods:`, benchmarks/host_rows.py) the same way, each
             on its own grid.
             `layers: [-1, 0, 1]` means the build's traced edit band shifted by that many layers; a method's
             `rank_scale: s` multiplies the YAML's Tucker ranks (rounded up, capped at the mode size; `full`: full
             size).
  test       each method, with its chosen settings, edits the test facts in sequential batches, v* computed at each
             batch on the model as it then is; metrics after the last batch on all test facts, with 95% bootstrap
             intervals over facts, the requests edited (a request whose v* fails is left out) and each stage's seconds.
  ablations  variants of the chosen settings of each method in `ablate` (whitening, null space, v*) on the test facts,
             not re-tuned.
  basis      why a rank loses: on the first test batch at the last edited layer, the share of the v* residuals' energy
             in span(U_out), of the projected keys' in span(U_in), of the routed experts' indicators in span(U_e), and
             the share of each residual the solved core reproduces, for MoTE's settings and each of `basis_variants`.
  routing    top-k routing overlap before/after the test edits (the paper's Appendix C.1).

Results are merged into benchmarks/results/quality.json (the `--arch`/`--only` parts re-run replace theirs; runs of
other archs in parallel, one process per `--arch` with the same `--out`, keep each other's) and
written out as quality.md and quality-ranks.png (the methods with a `rank_scale`: quality against solve+write seconds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml

import host_rows  # benchmarks/, beside this script
from mote_plugin import (
    MoTEEditor,
    MoTEHyperParams,
    apply_mote_to_model,
    host_stubs,
    last_coverage,
    last_edited,
    last_timings,
)
from mote_plugin.adapters import get_adapter
from mote_plugin.experiments.host_methods import import_host
from mote_plugin.experiments.results import run_info, run_line, write_results
from mote_plugin.metrics import counterfact_metrics
from mote_plugin.mote.algebra.coverage import SHARES, summarise
from mote_plugin.mote.algebra.solvers import solve_batch
from mote_plugin.mote.algebra.tucker import resolve_ranks
from mote_plugin.mote.model.capture import capture, layer_outputs
from mote_plugin.mote.model.requests import normalise_requests
from mote_plugin.testbed import BuildOptions, build, load
from tables import headline

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"  # fact-model builds, preservation statistics, v* targets
RESULTS = Path(__file__).resolve().parent / "results" / "quality"
PHASES = ("tune", "test", "ablations", "basis", "routing")
METRICS = ("efficacy", "generalization", "specificity", "utility")
STAGES = ("vstar", "capture", "solve", "writeback")
CONFIG_KEYS = {"builds", "dev", "test", "batch_size", "methods", "tune", "ablate", "ablations", "basis_variants",
               "bootstrap", "seed", "real_ranks", "host_methods", "covariance_texts", "labels",
               "notes"}


def load_config(path: str | Path) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    unknown, missing = set(cfg) - CONFIG_KEYS, {"builds", "dev", "test", "batch_size", "methods",
                                                                  "real_ranks"} - set(cfg)
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if "MoTE" not in cfg["methods"]:
        raise ValueError(f"{path}: methods must include MoTE (the basis phase starts from its settings)")
    missing_bases = set(cfg.get("ablate", ["MoTE"])) - set(cfg["methods"])
    if missing_bases:
        raise ValueError(f"{path}: ablate names methods that are not in methods: {sorted(missing_bases)}")
    base = MoTEHyperParams(alg_name="MoTE", model_name="m", layers=[0], device="cpu", r_e=2, r_out=2, r_in=2)
    variants = {**cfg["methods"], **{k: v for group in (cfg.get("ablations") or {}).values() for k, v in group.items()},
                **(cfg.get("basis_variants") or {})}
    for name, overrides in variants.items():  # unknown keys and bad values fail here, before any work
        overrides = dict(overrides or {})
        scale = overrides.pop("rank_scale", 1)
        for key, values in (overrides.pop("tune", None) or {}).items():  # a method's own grid
            if key != "layers":
                for v in values:
                    base.updated(f"{path}: {name}: tune {key}", **{key: v})
        if scale != "full" and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"{path}: {name}: rank_scale must be a number > 0 or 'full', got {scale!r}")
        base.updated(f"{path}: {name}", **overrides)
    for key, values in (cfg.get("tune") or {}).items():
        if key != "layers":
            for v in values:
                base.updated(f"{path}: tune {key}", **{key: v})
    for arch, opts in cfg["builds"].items():
        BuildOptions.from_dict(opts | {"arch": arch})
    host_rows.check_config(cfg, ROOT, path)
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# facts and settings
# ---------------------------------------------------------------------------------------------------------------------


def fact_model(arch: str, cfg: dict):
    """(model, tok, facts, report) of the arch's build, built first if needed."""
    opts = BuildOptions.from_dict(cfg["builds"][arch] | {"arch": arch})
    out = CACHE / "mote-testbed" / f"{arch}-{opts.facts}-quality"
    build(out, opts)
    return load(out)


def splits(facts: list[dict], cfg: dict) -> dict[str, list[dict]]:
    """{"dev": the first `dev` known facts, "test": the known facts after them (at most `test`)}."""
    known = [f for f in facts if f["known"]]
    dev, test = known[: cfg["dev"]], known[cfg["dev"] : cfg["dev"] + cfg["test"]]
    if len(dev) < cfg["dev"] or len(test) < cfg["batch_size"]:
        raise SystemExit(f"the build knows {len(known)} facts: too few for dev {cfg['dev']} + one test batch of "
                         f"{cfg['batch_size']}")
    return {"dev": dev, "test": test}


def base_hparams(arch: str, report: dict, cfg: dict, shape: tuple[int, int, int]) -> MoTEHyperParams:
    """The arch's testbed YAML at the build's traced band and lookup token, with the benchmark's caches, at the
    protocol's fixed ranks (`ratio_ranks`)."""
    hp = MoTEHyperParams.from_hparams(ROOT / "hparams" / "MoTE" / f"testbed-{arch}")
    r_e, r_out, r_in = ratio_ranks(cfg["real_ranks"][arch], shape)
    return hp.updated("the build", layers=report["edit_layers"], fact_token=report["lookup_token"],
                      stats_dir=str(CACHE / "mote-stats"), vstar_cache_dir=str(CACHE / "mote-vstar"), r_e=r_e,
                      r_out=r_out, r_in=r_in)


def ratio_ranks(real: dict, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The real model's Tucker ranks in the same ratios to the fact model's (E, d, h): rounded up, at least 2."""
    return tuple(max(2, math.ceil(r * n / size)) for r, n, size in zip(real["ranks"], shape, real["shape"]))


def grid(tune: dict, report: dict, n_layers: int) -> list[dict]:
    """Every combination of the tuning grid; `layers` shifts of the traced band become explicit bands in range."""
    axes = {}
    for key, values in (tune or {}).items():
        if key == "layers":
            band = report["edit_layers"]
            values = [[l + s for l in band] for s in values if 0 <= band[0] + s and band[-1] + s < n_layers]
        axes[key] = values
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def rank_variant(hp: MoTEHyperParams, scale: float | str, shape: tuple[int, int, int]) -> dict:
    """The fixed ranks of `hp` times `scale` (rounded up, at most the mode size); "full": every mode at full size."""
    if scale == "full":
        return {"r_e": "full", "r_out": "full", "r_in": "full"}
    ranks = resolve_ranks(hp.layer_ranks(), shape)
    return dict(zip(("r_e", "r_out", "r_in"), (min(size, math.ceil(r * scale)) for r, size in zip(ranks, shape))))


def settings(base: MoTEHyperParams, name: str, overrides: dict | None, shape: tuple[int, int, int],
             **tuned) -> MoTEHyperParams:
    """A method's hyper-parameters: the base, its overrides (`rank_scale` resolved on the fixed ranks), then
    `tuned`."""
    overrides = dict(overrides or {})
    scale = overrides.pop("rank_scale", None)
    overrides.pop("tune", None)  # the method's own grid (`tune`)
    hp = base.updated(name, **overrides)
    if scale is not None:
        hp = hp.updated(name, **rank_variant(hp, scale, shape))
    return hp.updated(name, **tuned)


# ---------------------------------------------------------------------------------------------------------------------
# editing and scoring
# ---------------------------------------------------------------------------------------------------------------------


def request(r: dict) -> dict:
    return {"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]}


def bootstrap(items: dict[str, list[float]], n: int, seed: int) -> dict[str, list[float]]:
    """95% percentile intervals of each metric's mean and of utility (mean of the three), resampling facts."""
    gen = torch.Generator().manual_seed(seed)
    means = {}
    for key, values in items.items():
        v = torch.tensor(values, dtype=torch.float64)
        means[key] = v[torch.randint(len(v), (n, len(v)), generator=gen)].mean(dim=1)  # [n]
    means["utility"] = sum(means[k] for k in ("efficacy", "generalization", "specificity")) / 3
    return {k: [float(m.quantile(0.025)), float(m.quantile(0.975))] for k, m in means.items()}


class Session:
    """One fact model, restored to its unedited weights before every run."""

    def __init__(self, model, tok, cfg: dict):
        self.model, self.tok, self.cfg = model, tok, cfg
        self.original = {k: v.clone() for k, v in model.state_dict().items()}
        adapter = get_adapter(model)
        block = adapter.moe_block(model, adapter.moe_layers(model)[0])
        self.shape = tuple(adapter.down_weight(block, dtype=None).shape)

    def restore(self) -> None:
        self.model.load_state_dict(self.original)
        MoTEEditor(self.model).reset()

    def scores(self, records: list[dict], intervals: bool) -> dict:
        m = counterfact_metrics(self.model, self.tok, records)
        row = {k: m[k] for k in METRICS} | {"n": len(records)}
        if intervals:
            items = {k: m[k + "_items"] for k in ("efficacy", "generalization", "specificity")}
            row["ci95"] = bootstrap(items, self.cfg.get("bootstrap", 1000), self.cfg.get("seed", 0))
        return row

    def run(self, hp: MoTEHyperParams, records: list[dict], intervals: bool = False) -> dict:
        """Edit `records` in sequential batches with `hp` from the unedited weights; metrics on all of them."""
        self.restore()
        seconds = dict.fromkeys(STAGES, 0.0)
        edited = 0
        solves = []
        bs = self.cfg["batch_size"]
        for i in range(0, len(records), bs):
            apply_mote_to_model(self.model, self.tok, [request(r) for r in records[i : i + bs]], hp)
            t = last_timings(self.model)
            edited += last_edited(self.model)
            for s in STAGES:
                seconds[s] += t[s]
            solves += last_coverage(self.model)
        ranks = list(resolve_ranks(hp.layer_ranks(), self.shape)) if hp.solver == "mote" else None
        return self.scores(records, intervals) | {"seconds": seconds, "edited": edited, "ranks": ranks,
                                                  "coverage": summarise(solves)}

    def unedited(self, records: list[dict]) -> dict:
        self.restore()
        return self.scores(records, intervals=True)

    def routed_experts(self, prompts: list[str]) -> dict[int, torch.Tensor]:
        """{MoE layer: [P, K] experts chosen at the last token of each prompt}."""
        adapter = get_adapter(self.model)
        layers = adapter.moe_layers(self.model)
        reqs = [{"prompt": p, "subject": p.split()[0], "target_new": "x"} for p in prompts]
        return {l: c.expert_idx for l, c in capture(self.model, self.tok, adapter, reqs, layers, "last").items()}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of |A & B| / |A | B| of the expert sets in a, b [P, K]."""
    return sum(len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a.tolist(), b.tolist())) / len(a)


# ---------------------------------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------------------------------


def tune(session: Session, base: MoTEHyperParams, dev: list[dict], cfg: dict, report: dict, log) -> dict:
    """{method: {"chosen": settings, "dev": its dev row, "grid": [(settings, dev row)...]}}."""
    out = {}
    for name, overrides in cfg["methods"].items():
        # the method's own grid (its `tune:`), else the config's
        combos = grid((overrides or {}).get("tune", cfg.get("tune")), report, session.model.config.num_hidden_layers)
        rows = []
        for combo in combos:
            rows.append((combo, session.run(settings(base, name, overrides, session.shape, **combo), dev)))
            log(f"  tune {name} {combo}: " + " ".join(f"{rows[-1][1][k]:.2f}" for k in METRICS))
        best = max(range(len(rows)), key=lambda i: (rows[i][1]["utility"], -i))
        out[name] = {"chosen": rows[best][0], "dev": rows[best][1], "grid": [{"settings": c, **r} for c, r in rows]}
    return out


def chosen(result: dict, name: str) -> dict:
    if name not in result.get("tune", {}):
        raise SystemExit(f"no tuned settings for {name}: run the tune phase first (--only tune)")
    return result["tune"][name]["chosen"]


def method_settings(session: Session, base: MoTEHyperParams, cfg: dict, result: dict, name: str) -> MoTEHyperParams:
    """A method's hyper-parameters with the settings the tune phase chose for it."""
    return settings(base, name, cfg["methods"][name], session.shape, **chosen(result, name))


def test(session: Session, base: MoTEHyperParams, records: list[dict], cfg: dict, result: dict, log) -> dict:
    rows = {"unedited": session.unedited(records)}
    for name in cfg["methods"]:
        rows[name] = session.run(method_settings(session, base, cfg, result, name), records, intervals=True)
        log(f"  test {name}: " + " ".join(f"{rows[name][k]:.2f}" for k in METRICS))
    return rows


def ablations(session: Session, base: MoTEHyperParams, records: list[dict], cfg: dict, result: dict, log) -> dict:
    """{method in `ablate`: {group: {variant: test row}}}, each variant on top of the method's chosen settings."""
    out = {}
    for method in cfg.get("ablate", ["MoTE"]):
        hp = method_settings(session, base, cfg, result, method)
        out[method] = {}
        for group, variants in (cfg.get("ablations") or {}).items():
            out[method][group] = {}
            for name, overrides in variants.items():
                row = session.run(settings(hp, f"{group}: {name}", overrides, session.shape), records, intervals=True)
                out[method][group][name] = row
                log(f"  ablation {method}, {group} {name}: " + " ".join(f"{row[k]:.2f}" for k in METRICS))
    return out


def basis(session: Session, base: MoTEHyperParams, records: list[dict], cfg: dict, result: dict, log) -> dict:
    """What each basis holds of the first test batch's edit at the last edited layer (unedited model): the coverage of
    MoTE's dev-chosen settings and of each of `basis_variants` (`batch_coverage`)."""
    session.restore()
    mote = method_settings(session, base, cfg, result, "MoTE")
    variants = {name: settings(mote, name, overrides, session.shape)
                for name, overrides in {"MoTE's settings": {}, **(cfg.get("basis_variants") or {})}.items()}
    out = batch_coverage(session.model, session.tok, [request(r) for r in records[: cfg["batch_size"]]], variants)
    for name, measured in out.items():
        log(f"  basis {name}: " + ", ".join(f"{k} {v}" for k, v in measured.items()))
    return out


def batch_coverage(model, tok, requests: list[dict], variants: dict[str, MoTEHyperParams]) -> dict[str, dict]:
    """The coverage (coverage.py) of one batch at the last edited layer L of the first variant, solved as the editor
    solves it with each variant's basis and the whole residual z - h_L (the core spread's solve). The model is left
    unchanged; v*, keys and residuals are those of the first variant."""
    first = next(iter(variants.values()))
    reqs = normalise_requests(requests)
    L = max(first.layers)
    z, _ = MoTEEditor(model, tok, first).targets(reqs, progress=False)  # [T, d]
    h = layer_outputs(model, tok, reqs, first.layer_module_tmp.format(L), first.fact_token, first.max_length)  # [T, d]
    R = z - h  # [T, d]
    cap = capture(model, tok, get_adapter(model), reqs, [L], first.fact_token)[L]
    out = {}
    for name, hp in variants.items():
        layer = MoTEEditor(model, tok, hp).bases([L])[L]
        solution, _ = solve_batch(hp.solver, L, layer, cap, R, hp.mote_lambda, rule=hp.basis_rule())
        out[name] = solution.coverage(solution.update(layer, L, 1.0), cap, R).to_dict()
    return out


def routing(session: Session, base: MoTEHyperParams, records: list[dict], cfg: dict, result: dict, log) -> dict:
    prompts = [r["prompt"] for r in records]
    session.restore()
    before = session.routed_experts(prompts)
    out = {}
    for name in cfg["methods"]:
        session.run(method_settings(session, base, cfg, result, name), records)
        after = session.routed_experts(prompts)
        out[name] = {str(l): jaccard(before[l], after[l]) for l in before}
        log(f"  routing {name}: {out[name]}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------



def _share(share: dict | float | None) -> str:
    """A coverage share: mean (smallest); a bare number as it is; "-" when not measured."""
    if share is None:
        return "-"
    return f"{share:.2f}" if isinstance(share, float) else f"{share['mean']:.2f} ({share['min']:.2f})"


def _cell(row: dict, key: str) -> str:
    if "ci95" not in row:
        return f"{row[key]:.2f}"
    lo, hi = row["ci95"][key]
    return f"{row[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def _seconds(row: dict) -> str:
    s = row.get("seconds")
    if s and "edit" in s:  # a host method: all it took, v* included
        return f"{s['edit']:.1f}"
    return "-" if not s else f"{sum(s.values()):.1f} ({s['solve'] + s['writeback']:.2f})"


def _settings(chosen_settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in chosen_settings.items()) or "-"


def _table(rows: dict, extra: dict | None = None) -> list[str]:
    head = ("| method | " + " | ".join(METRICS) + " | edited | edit s (solve+write s) | reproduced (min) |"
            + (" settings chosen on dev |" if extra is not None else ""))
    lines = [head, "|---" * (len(METRICS) + 4 + (extra is not None)) + "|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | did not run: {row['error']} |" + " |" * (len(METRICS) + 2 + (extra is not None)))
            continue
        ranks = row.get("coverage", {}).get("ranks") or ([row["ranks"]] * 2 if row.get("ranks") else None)
        ranks = "" if not ranks else f" {tuple(ranks[0])}" + (f"-{tuple(ranks[1])}" if ranks[1] != ranks[0] else "")
        line = (f"| {name}{ranks} | " + " | ".join(_cell(row, k) for k in METRICS)
                + f" | {row.get('edited', '-')}/{row['n']} | {_seconds(row)} | "
                + _share(row.get("coverage", {}).get("reproduced")) + " |")
        if extra is not None:
            line += f" {_settings(extra[name])} |" if name in extra else " - |"
        lines.append(line)
    return lines


def rank_rows(res: dict, cfg: dict) -> dict:
    """The test rows of the methods with a `rank_scale`, by scale."""
    return {str(o["rank_scale"]): res["test"][n] for n, o in cfg["methods"].items()
            if "rank_scale" in (o or {}) and o.get("spread") == "core" and n in res.get("test", {})}


# The headline (benchmarks/README.md renders it): per arch, at the fixed ranks (`real_ranks` in the same ratios), the
# paper's basis with the testbed YAML's former (residual) and the paper's (core) spread, the edit-aware basis (and U_e,
# where it ran) and `auto` ranks (the testbed YAMLs now); then the two strongest other solvers. Residual spread unless
# the label says otherwise.
HEADLINE = {"MoTE-residual": "MoTE, weights' basis, fixed ranks",
            "MoTE": "MoTE, same, core spread (the paper's)",
            "MoTE-edit": "MoTE, edit-aware basis, same ranks",
            "MoTE-edit+gates": "MoTE, edit-aware basis and U_e, same ranks",
            "MoTE-auto": "MoTE, `auto` ranks (coverage 0.9)",
            "Global-residual": "Global ridge (= edit-aware at r_e = E)", "MoEEdit-BCD": "MoEEdit-BCD"}


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = ["# MoTE's quality: dev/test protocol on the fact models", "",
             f"Last command: {run_line(report)}. Every setting below was chosen on the dev split; every metric is "
             "measured on the test split (facts no setting was chosen on), after the last of its sequential batches, "
             "with 95% bootstrap intervals over facts. `edited`: requests edited of those asked (a request whose v* "
             "does not reach its target is left out). Edit seconds: all batches, v* (computed at each batch) and "
             "capture included.",
             ""]
    if cfg.get("host_methods"):  # the side-by-side comparison with EasyEdit's editors
        lines[0] = "# Side by side: MoTE and EasyEdit's editors, dev/test protocol on the fact models"
        lines += ["## Side by side (test split)", "", *host_rows.side_by_side(report), ""]
    else:
        lines += ["## Headline (test split)", "",
                  "Utility [95% interval] · efficacy / generalization / specificity · requests edited of those asked, "
                  "after the last test batch.", "", *headline(report, HEADLINE), ""]
    for arch, res in report["archs"].items():
        s = res["splits"]
        split = (f"dev = known facts {s['dev'][0]}-{s['dev'][1]} ({s['dev'][1] - s['dev'][0] + 1} facts), test = known "
                 f"facts {s['test'][0]}-{s['test'][1]} (N = {s['test'][1] - s['test'][0] + 1}, {s['batches']} "
                 f"sequential batches of at most {cfg['batch_size']})")
        lines += [f"## {arch}", "",
                  f"Build: `{res['build']}` ({s['known']} known facts); edit band traced {res['traced_layers']} "
                  f"at {res['lookup_token']}; fixed ranks {tuple(res['yaml_ranks'])} of (E, d, h) = "
                  f"{tuple(res['shape'])}. Splits: {split}.", ""]
        if "test" in res:
            lines += ["### Test split", "",
                      *_table(res["test"], {k: v["chosen"] for k, v in res.get("tune", {}).items() if "chosen" in v}),
                      ""]
        ranked = rank_rows(res, cfg)
        if ranked:
            lines += ["### Tucker ranks (each tuned on dev; test split)", "",
                      "| scale of the fixed ranks | (r_e, r_out, r_in) | " + " | ".join(METRICS) + " | solve+write s |",
                      "|---" * (len(METRICS) + 3) + "|"]
            lines += [f"| {scale} | {tuple(row['ranks'])} | " + " | ".join(_cell(row, k) for k in METRICS)
                      + f" | {row['seconds']['solve'] + row['seconds']['writeback']:.3f} |"
                      for scale, row in ranked.items()]
            lines.append("")
        for method, groups in res.get("ablations", {}).items():
            for group, rows in groups.items():
                lines += [f"### Ablation: {group} ({method}'s dev-chosen settings otherwise; test split)", "",
                          *_table(rows), ""]
        if "basis" in res:
            lines += ["### What the Tucker basis holds (first test batch, last edited layer, unedited model)", "",
                      "Mean (smallest) share over the batch's edits, in the span of each factor: the v* residuals in "
                      "U_out, the gated null-space-projected keys in U_in, the gate vectors in U_e; `reproduced`: "
                      "<c_t, r_t> / ||r_t||^2 for the output change c_t the solved update makes at the layer (1 = "
                      "the layer's output moves exactly to z). Basis phase of `benchmarks/quality.py`.", "",
                      "| basis | (r_e, r_out, r_in) | residual in U_out | keys in U_in | gates in U_e | reproduced |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {n} | {tuple(r['ranks'])} | " + " | ".join(_share(r.get(k)) for k in SHARES) + " |"
                      for n, r in res["basis"].items()]
            lines.append("")
        if "routing" in res:
            layers = list(next(iter(res["routing"].values())))
            lines += ["### Routing overlap (top-k Jaccard before/after, last prompt token of the test prompts)", "",
                      "| method | " + " | ".join(f"layer {l}" for l in layers) + " |", "|---" * (len(layers) + 1) + "|"]
            lines += [f"| {n} | " + " | ".join(f"{r[l]:.3f}" for l in layers) + " |" for n, r in res["routing"].items()]
            lines.append("")
        if "tune" in res:
            lines += ["### Dev split (the grid's best per method)", "",
                      *_table({k: v.get("dev", {"error": v.get("error")}) for k, v in res["tune"].items()}), "",
                      f"Grid: `{json.dumps(cfg.get('tune'))}` (`layers`: shifts of the traced band); every grid "
                      "point's dev metrics are in quality.json.", ""]
    return "\n".join(lines) + "\n"


def plot(report: dict, plt):
    """quality-ranks.png: per arch, the test metrics against the core size r_e * r_out * r_in (top) and the solve +
    write seconds of all test batches against the same (bottom), one point per rank scale (None: no rank rows)."""
    order = lambda scale: float("inf") if scale == "full" else float(scale)  # noqa: E731
    curves = {a: dict(sorted(rank_rows(r, report["config"]).items(), key=lambda kv: order(kv[0])))
              for a, r in report["archs"].items()}
    curves = {a: c for a, c in curves.items() if c}
    if not curves:
        return None
    fig, axes = plt.subplots(2, len(curves), figsize=(4.5 * len(curves), 6.0), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [2, 1]})
    for col, (arch, rows) in enumerate(curves.items()):
        xs = [math.prod(r["ranks"]) for r in rows.values()]
        top, bottom = axes[0][col], axes[1][col]
        for key, marker in zip(METRICS, "os^D"):
            top.plot(xs, [r[key] for r in rows.values()], marker=marker, label=key)
        for x, (scale, r) in zip(xs, rows.items()):
            top.annotate(f"x{scale}" if scale != "full" else "full", (x, r["utility"]), fontsize=7,
                         textcoords="offset points", xytext=(2, 4))
        bottom.plot(xs, [r["seconds"]["solve"] + r["seconds"]["writeback"] for r in rows.values()], marker="o",
                    color="gray")
        top.set_title(f"{arch}: quality vs Tucker rank (test split)", fontsize=9)
        top.set_ylim(0, 1.02)
        bottom.set_xscale("log")
        bottom.set_xlabel("core size r_e * r_out * r_in")
        bottom.set_ylabel("solve + write s, all test batches", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "configs" / "quality.yaml"))
    parser.add_argument("--arch", nargs="*", help="archs of the config to run (default: all)")
    parser.add_argument("--only", nargs="*", choices=PHASES, default=list(PHASES))
    parser.add_argument("--methods", nargs="*", help="run only these methods of the config (tune, test, ablations of "
                        "those in `ablate`, routing), merged into the results already written")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    archs = args.arch or list(cfg["builds"])
    unknown = set(archs) - set(cfg["builds"])
    if unknown:
        raise SystemExit(f"--arch {sorted(unknown)}: not in the config's builds ({', '.join(cfg['builds'])})")
    run_cfg = cfg
    if args.methods:
        unknown = set(args.methods) - set(cfg["methods"]) - set(cfg.get("host_methods") or {})
        if unknown:
            raise SystemExit(f"--methods {sorted(unknown)}: not in the config's methods or host_methods")
        if "basis" in args.only:
            raise SystemExit("--methods runs the tune, test, ablations and routing phases only (add --only tune test)")
        run_cfg = cfg | {"methods": {m: o for m, o in cfg["methods"].items() if m in args.methods},
                         "ablate": [m for m in cfg.get("ablate", ["MoTE"]) if m in args.methods],
                         "host_methods": {m: o for m, o in (cfg.get("host_methods") or {}).items()
                                          if m in args.methods}}
    host = None
    if any(host_rows.rows_for(run_cfg, arch) for arch in archs):
        host_stubs.install()  # the vision packages EasyEdit imports but text editing never uses
        host, reason = import_host()
        if host is None:
            raise SystemExit(f"host_methods need an importable EasyEdit (PYTHONPATH=/path/to/EasyEdit): {reason}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"archs": {}}
    argv_shown = argv if argv is not None else sys.argv[1:]
    report |= run_info(shlex.join(["python", "benchmarks/quality.py", *argv_shown])) | {"config": cfg}
    for arch in archs:
        model, tok, facts, build_report = fact_model(arch, cfg)
        session = Session(model, tok, cfg)
        split = splits(facts, cfg)
        base = base_hparams(arch, build_report, cfg, session.shape)
        res = report["archs"].setdefault(arch, {})
        n_dev, n_test = len(split["dev"]), len(split["test"])
        res |= {"build": json.dumps(cfg["builds"][arch]), "traced_layers": build_report["edit_layers"],
                "lookup_token": build_report["lookup_token"], "shape": list(session.shape),
                "yaml_ranks": list(resolve_ranks(base.layer_ranks(), session.shape)),
                "splits": {"dev": [1, n_dev], "test": [n_dev + 1, n_dev + n_test],
                           "batches": -(-n_test // cfg["batch_size"]),
                           "known": sum(f["known"] for f in facts)}}
        log = lambda m, arch=arch: print(f"[{arch}] {m}", flush=True)  # noqa: E731
        hosts = host_rows.HostRows(session, host, arch, run_cfg, ROOT, CACHE) if host_rows.rows_for(run_cfg, arch) \
            else None
        phases = {"tune": tune, "test": test, "ablations": ablations, "basis": basis, "routing": routing}
        for phase in PHASES:
            if phase not in args.only:
                continue
            t = time.time()
            if phase == "tune":
                result = tune(session, base, split["dev"], run_cfg, build_report, log)
                result |= hosts.tune(split["dev"], build_report["edit_layers"], log) if hosts else {}
            else:
                result = phases[phase](session, base, split["test"], run_cfg, res, log)
                if phase == "test" and hosts:
                    result |= hosts.test(split["test"], res.get("tune", {}), log)
            # a run of some methods adds its rows to those of the others
            merge = args.methods and phase in ("tune", "test", "ablations", "routing")
            res[phase] = res.get(phase, {}) | result if merge else result
            log(f"{phase}: {time.time() - t:.0f} s")
            report = save(out, report, archs)  # after every phase: a long run keeps its parts
        del model, session
    report = save(out, report, archs)
    write_results(out, report, markdown(report), {"-ranks": lambda plt: plot(report, plt)})
    print(markdown(report))


def save(out: Path, report: dict, archs: list[str]) -> dict:
    """Write the report with this run's archs over those the results file holds now, so that runs of other archs in
    parallel (one process per `--arch`, same `--out`) keep each other's results; returns the merged report."""
    path = out.with_suffix(".json")
    on_disk = json.loads(path.read_text())["archs"] if path.exists() else {}
    merged = on_disk | {a: r for a, r in report["archs"].items() if a in archs}
    order = [*report["config"]["builds"], *merged]  # the config's order, then archs it no longer names
    report = report | {"archs": {a: merged[a] for a in dict.fromkeys(order) if a in merged}}
    write_results(out, report)
    return report


if __name__ == "__main__":
    main()
