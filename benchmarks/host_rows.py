"""EasyEdit's editors as rows of the quality protocol (benchmarks/quality.py, its `host_methods:`) beside MoTE's:
the same dev split chooses each one's settings from its own grid, the same test split, sequential batches, metrics and
bootstrap intervals report it. Runs through `mote_plugin.experiments.host_edit.HostEdit` (the host's own code; what it
supplies where the host cannot run as it is is said there).

    host_methods:
      MEMIT:                                         # a row
        hparams: hparams/MEMIT/testbed-{arch}.yaml   # the host's YAML ({arch}: the fact model's)
        archs: [qwen3_5_moe]                         # optional: only these fact models
        tune: {layers: [-1, 0], mom2_update_weight: [10, 1000]}   # every combination, on the dev split
        note: ...                                    # optional: said beside the row in the report

`layers: [s, ...]` are shifts of the build's traced edit band, as MoTE's: the YAML's number of layers taken from the
band's end (ROME: its last layer), shifted by s; a band outside the model is left out. Other keys are the host YAML's.
A grid point that raises is kept with its error; a row whose every grid point raised is reported with that error.
"""

from __future__ import annotations

import itertools
import traceback
from pathlib import Path

from mote_plugin.experiments.compare import method_alg, request_of
from mote_plugin.experiments.host_edit import ALGORITHMS, HostEdit, host_hparams
from mote_plugin.experiments.host_methods import override
from tables import headline, headline_cell

HOST_KEYS = {"hparams", "archs", "tune", "note"}


def check_config(cfg: dict, root: Path, path) -> None:
    """Refuse a malformed `host_methods:` before any work (unknown keys, a missing YAML, an unknown algorithm)."""
    for name, spec in (cfg.get("host_methods") or {}).items():
        unknown = set(spec) - HOST_KEYS
        if unknown or "hparams" not in spec:
            raise ValueError(f"{path}: host_methods: {name}: keys {sorted(HOST_KEYS)} (hparams required), got "
                             f"{sorted(spec)}")
        if name in cfg["methods"]:
            raise ValueError(f"{path}: host_methods: {name} is also a MoTE method name")
        for arch in spec.get("archs") or cfg["builds"]:
            if arch not in cfg["builds"]:
                raise ValueError(f"{path}: host_methods: {name}: archs names {arch!r}, not in builds")
            file = root / spec["hparams"].format(arch=arch)
            if not file.exists():
                raise ValueError(f"{path}: host_methods: {name}: {file} does not exist")
            alg = method_alg(name, str(file))
            if alg not in ALGORITHMS:
                raise ValueError(f"{path}: host_methods: {name}: {file}: alg_name {alg!r} has no host run "
                                 f"(known: {', '.join(ALGORITHMS)})")
        bad = [k for k, v in (spec.get("tune") or {}).items() if not isinstance(v, list) or not v]
        if bad:
            raise ValueError(f"{path}: host_methods: {name}: tune values must be non-empty lists: {bad}")


def rows_for(cfg: dict, arch: str) -> dict[str, dict]:
    """The host rows that run on `arch`."""
    return {n: s for n, s in (cfg.get("host_methods") or {}).items() if arch in (s.get("archs") or [arch])}


def host_grid(tune: dict | None, band: list[int], yaml_layers: list[int], n_layers: int) -> list[dict]:
    """Every combination of a host row's grid; `layers` shifts of the band's last len(yaml_layers) layers."""
    axes = {}
    for key, values in (tune or {}).items():
        if key == "layers":
            width = min(len(yaml_layers), len(band))
            base = band[-width:]
            values = [[l + s for l in base] for s in values if 0 <= base[0] + s and base[-1] + s < n_layers]
        axes[key] = values
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


class HostRows:
    """The host rows of one fact model (session: quality.Session; host: the imported easyeditor)."""

    def __init__(self, session, host, arch: str, cfg: dict, root: Path, cache: Path):
        self.session, self.host, self.arch, self.cfg, self.root = session, host, arch, cfg, root
        name = f"{arch}-{Path(session.model.config._name_or_path).parent.name}"  # one cache per build
        self.stats_dir, self.vstar_dir = cache / "host-stats" / name, cache / "host-vstar" / name
        self.workdir = cache / "host-work" / name
        self.specs = rows_for(cfg, arch)

    def hparams(self, name: str, **settings):
        spec = self.specs[name]
        path = self.root / spec["hparams"].format(arch=self.arch)
        hp = override(host_hparams(self.host, method_alg(name, str(path)), str(path)), name, settings)
        hp.model_name = str(self.session.model.config._name_or_path)
        if hasattr(hp, "device"):
            hp.device = "cpu"
        return hp

    def run(self, hp, records: list[dict], intervals: bool = False, vstar_cache: bool = False) -> dict:
        """Edit `records` in sequential batches with host hyper-parameters `hp` from the unedited weights; metrics on
        all of them, the edit seconds (v* included unless `vstar_cache`: the dev grid shares the first batch's v*
        between points of one v* objective) and, for AlphaEdit, each layer's null-space dimension."""
        self.session.restore()
        run = HostEdit(hp, self.session.model, self.session.tok, stats_dir=self.stats_dir, workdir=self.workdir,
                       covariance_texts=self.cfg.get("covariance_texts", 2000),
                       vstar_dir=self.vstar_dir if vstar_cache else None, seed=self.cfg.get("seed", 0))
        extra = {"null_space_dims": run.null_space_dims()} if hp.alg_name == "AlphaEdit" else {}
        seconds, bs = 0.0, self.cfg["batch_size"]
        try:
            for i in range(0, len(records), bs):
                seconds += run.edit([request_of(r, "counterfact") for r in records[i : i + bs]])
            row = self.session.scores(records, intervals)
        finally:
            run.undo()
        return row | {"seconds": {"edit": seconds}, "edited": len(records)} | extra

    def tune(self, dev: list[dict], band: list[int], log) -> dict:
        """{row: {"chosen", "dev", "grid", "objective"}} (or {"error", "grid"} when no grid point ran)."""
        n_layers = self.session.model.config.get_text_config().num_hidden_layers
        out = {}
        for name, spec in self.specs.items():
            base = self.hparams(name)
            points = []
            for combo in host_grid(spec.get("tune"), band, base.layers, n_layers):
                try:
                    row = self.run(self.hparams(name, **combo), dev, vstar_cache=True)
                    points.append({"settings": combo, **row})
                    log(f"  tune {name} {combo}: " + " ".join(f"{row[k]:.2f}" for k in METRICS)
                        + f" ({row['seconds']['edit']:.0f} s edit)")
                except Exception as e:  # kept with the grid point: what stops a host method is a result here
                    points.append({"settings": combo, "error": _error(e)})
                    log(f"  tune {name} {combo}: {points[-1]['error']}")
            entry = {"objective": ALGORITHMS[base.alg_name].objective, "grid": points,
                     "hparams": spec["hparams"].format(arch=self.arch), "note": spec.get("note", "")}
            ran = [i for i, p in enumerate(points) if "error" not in p]
            if ran:
                best = max(ran, key=lambda i: (points[i]["utility"], -i))
                entry |= {"chosen": points[best]["settings"], "dev": {k: v for k, v in points[best].items()
                                                                       if k != "settings"}}
            else:
                entry["error"] = points[0]["error"] if points else "empty grid"
            out[name] = entry
        return out

    def test(self, records: list[dict], tuned: dict, log) -> dict:
        rows = {}
        for name in self.specs:
            entry = tuned.get(name)
            if entry is None or "chosen" not in entry:
                rows[name] = {"error": (entry or {}).get("error", "not tuned: run the tune phase first")}
                continue
            try:
                rows[name] = self.run(self.hparams(name, **entry["chosen"]), records, intervals=True)
                log(f"  test {name}: " + " ".join(f"{rows[name][k]:.2f}" for k in METRICS))
            except Exception as e:  # reported in the row
                rows[name] = {"error": _error(e)}
        return rows


METRICS = ("efficacy", "generalization", "specificity", "utility")


def _error(e: Exception) -> str:
    """The exception and where in the host it was raised."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "easyeditor" in f.filename]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


# ---------------------------------------------------------------------------------------------------------------------
# the side-by-side report
# ---------------------------------------------------------------------------------------------------------------------


def _cell(row: dict | None) -> str:
    """`tables.headline_cell` and the edit seconds."""
    if row is None or "error" in row:
        return headline_cell(row)
    s = row.get("seconds") or {}
    return headline_cell(row) + f" · {s['edit'] if 'edit' in s else sum(s.values()):.0f} s"


def _settings(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if "chosen" not in entry:
        return f"did not run: {entry.get('error', '-')}"
    return ", ".join(f"{k} {v}" for k, v in entry["chosen"].items()) or "(the YAML's)"


def _grid_ranges(entry: dict) -> str:
    """Each grid axis's values, as tried on dev."""
    axes: dict[str, list] = {}
    for point in entry.get("grid", []):
        for k, v in point["settings"].items():
            if v not in axes.setdefault(k, []):
                axes[k].append(v)
    return "; ".join(f"{k} {', '.join(map(str, vs))}" for k, vs in axes.items()) or "the YAML's settings only"


def side_by_side(report: dict) -> list[str]:
    """Every row (the unedited model, the plugin's methods, the host's) on every fact model's test split, the settings
    each chose on dev, and for a row below 0.5 test efficacy the ranges it tried on dev and its best dev efficacy."""
    cfg = report["config"]
    labels = cfg.get("labels") or {}
    archs = {a: r for a, r in report["archs"].items() if "test" in r}
    names = ["unedited", *cfg["methods"], *(cfg.get("host_methods") or {})]
    lines = ["Test utility [95% interval] · efficacy / generalization / specificity · requests edited of those asked · "
             "edit seconds (all test batches, v* included), after the last of the sequential test batches.", "",
             *headline(report, {n: labels.get(n, n) for n in names[1:]}, cell=_cell)]
    lines += ["", "### Settings chosen on dev", "",
              "| method | objective | " + " | ".join(archs) + " |", "|---" * (len(archs) + 2) + "|"]
    for name in names[1:]:
        tuned = [r.get("tune", {}).get(name) for r in archs.values()]
        if not any(tuned):
            continue
        objective = next((t.get("objective", "") for t in tuned if t), "") or "MoTE's (the plugin's v*)"
        lines.append(f"| {labels.get(name, name)} | {objective} | " + " | ".join(map(_settings, tuned)) + " |")
    low = []
    for arch, r in archs.items():
        for name in names[1:]:
            row, entry = r["test"].get(name), r.get("tune", {}).get(name)
            if row and "efficacy" in row and row["efficacy"] < 0.5 and entry:
                ran = [p for p in entry.get("grid", []) if "efficacy" in p]
                best = max((p["efficacy"] for p in ran), default=float("nan"))
                note = ((cfg.get("notes") or {}).get(name)
                        or (cfg.get("host_methods") or {}).get(name, {}).get("note", ""))
                low.append(f"| {labels.get(name, name)} | {arch} | {row['efficacy']:.2f} | {_grid_ranges(entry)} | "
                           f"{best:.2f} | {note} |")
    if low:
        lines += ["", "### Rows below 0.5 test efficacy: what was tried on dev", "",
                  "| method | fact model | test efficacy | grid tried on dev | best dev efficacy | note |",
                  "|---|---|---|---|---|---|", *low]
    return lines
