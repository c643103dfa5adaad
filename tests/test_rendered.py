"""Every number README.md, benchmarks/*.md and docs/*.md restate from a results file is rendered from it by
benchmarks/render.py: the docs hold what the committed results give, and a results file changed without rendering the
docs again is caught. No model work: the results files and the docs only."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def render():
    if str(BENCHMARKS) not in sys.path:  # as when run as a script: the benchmarks import each other's helpers
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_render", BENCHMARKS / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def perturbed(value):
    """Every number changed (floats scaled and shifted, integers plus one), the structure kept."""
    if isinstance(value, dict):
        return {k: perturbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [perturbed(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return value + 1 if isinstance(value, int) else value * 1.1 + 0.013


def test_every_rendered_block_matches_its_results_files(render):
    assert render.stale(ROOT) == [], "the docs differ from the results files: run python benchmarks/render.py"


def test_every_block_is_rendered_somewhere(render):
    """No block of render.BLOCKS is left unused, and the docs name no block it does not know."""
    used = {m["name"] for doc in render.documents(ROOT) for m in render.MARKER.finditer(doc.read_text())}
    assert used <= render.BLOCKS.keys(), used - render.BLOCKS.keys()
    assert render.BLOCKS.keys() <= used, render.BLOCKS.keys() - used
    with pytest.raises(KeyError, match="no rendered block 'nope'"):
        render.rendered("<!-- rendered: nope -->1.0<!-- /rendered -->", ROOT / "README.md", render.loader())


def test_a_results_file_changed_without_rendering_again_is_caught(render):
    """Each block follows the numbers of its results files: with every number of those files changed, every block
    renders differently, and the check names every block of every document."""
    load = render.loader()
    changed = {}

    def load_changed(file: str) -> dict:
        if file not in changed:
            changed[file] = perturbed(load(file))
        return changed[file]

    blocks = [(doc, m) for doc in render.documents(ROOT) for m in render.MARKER.finditer(doc.read_text())]
    assert blocks
    for doc, m in blocks:
        assert render.render(m["name"], doc, load_changed) != m["body"], (doc, m["name"])
    assert len(render.stale(ROOT, load_changed)) == len(blocks)


def test_tables_name_their_results_file_and_how_it_was_made(render):
    report = {"command": "python benchmarks/end_to_end.py", "date": "2026-12-08", "commit": "abc123" * 7,
              "machine": "x86_64, CPU X, no AVX-512, 2 CPUs", "torch": "2.13.0+cpu", "threads": 1}
    assert render.provenance(report) == ("`python benchmarks/end_to_end.py`; 2026-12-08, commit abc123abc123, x86_64, "
                                         "CPU X, no AVX-512, 2 CPUs, torch 2.13.0+cpu, 1 threads")
    old = {"versions": {"torch": "2.13.0+cpu"}, "results": []}  # a report from before results recorded their run
    assert render.provenance(old) == "torch 2.13.0+cpu (command, date, commit, machine not recorded)"


def _row(u: float, edited: int | None = None) -> dict:
    row = {"efficacy": u, "generalization": u, "specificity": u, "utility": u, "n": 2,
           "ci95": {"utility": [u - 0.1, u + 0.1]}}
    return row | ({"edited": edited} if edited is not None else {})


def test_demo_ranges_and_side_by_side_summary(render):
    """The demo's range over runs of README command 1 (build seeds) and the README's side-by-side rows, on reports of
    their shape."""
    def demo(efficacy: float, edits: int) -> dict:
        mote = {"method": "MoTE", "status": "ok", "effective_hparams": {"alg_name": "MoTE"},
                "coverage": [[{"edits": edits}]], "metrics": {"efficacy": efficacy, "generalization": 0.5,
                                                            "specificity": 1.0, "utility": (efficacy + 1.5) / 3}}
        return {"n": 2, "results": [mote, {"method": "ROME", "status": "unavailable", "reason": "no host"}]}

    ranges = render.demo_ranges(demo(0.5, 1), demo(1.0, 2), demo(1.0, 2))
    assert ranges[0] == "| method (range over 3 runs) | edited | efficacy | generalization | specificity | utility |"
    assert ranges[2:] == ["| MoTE | 1-2/2 | 0.50-1.00 | 0.50 | 1.00 | 0.67-0.83 |"]  # a row that did not run: none
    report = {"config": {"methods": {"MoTE-auto": {}}, "host_methods": {"ROME": {}, "UnKE": {}}},
              "archs": {a: {"splits": {"test": [51, 52]},
                            "test": {"unedited": _row(0.4), "MoTE-auto": _row(0.8, 1), "ROME": _row(0.6, 2),
                                     "UnKE": {"error": "UnboundLocalError"}}} for a in ("x", "y")}}
    report["archs"]["y"]["test"]["ROME"] = {"error": "ValueError: no host"}
    assert render.side_by_side_summary(report) == [
        "| method | x (N = 2) | y (N = 2) |", "|---|---|---|",
        "| unedited | 0.40 [0.30, 0.50] | 0.40 [0.30, 0.50] |",
        "| MoTE, `auto` ranks | 0.80 [0.70, 0.90] · 1/2 | 0.80 [0.70, 0.90] · 1/2 |",
        "| ROME (o_proj) | 0.60 [0.50, 0.70] · 2/2 | did not run: ValueError: no host |",
        "", "In side_by_side.md only: UnKE."]


# README command 1's rows and the side-by-side methods whose dev-chosen settings they run with
DEMO_ROWS = {"MoTE": "MoTE-auto", "MoTE, paper's basis": "MoTE", "Global ridge": "Global-residual",
             "MoEEdit-BCD": "MoEEdit-BCD", "ROME": "ROME", "MEMIT": "MEMIT", "AlphaEdit": "AlphaEdit",
             "FT-M (experts)": "FT-M (experts)", "LoRA": "LoRA"}


def test_demo_runs_the_settings_the_side_by_side_chose_on_dev():
    """examples/configs/compare-testbed-qwen3_moe.yaml's rows: each the side-by-side row's YAML, its overrides and the
    settings its dev grid chose on qwen3_moe (benchmarks/results/side_by_side.json), so that the demo and the table
    cannot drift apart."""
    import yaml

    demo = yaml.safe_load((ROOT / "examples" / "configs" / "compare-testbed-qwen3_moe.yaml").read_text())["methods"]
    side = json.loads((BENCHMARKS / "results" / "side_by_side.json").read_text())
    cfg, tuned = side["config"], side["archs"]["qwen3_moe"]["tune"]
    assert set(demo) == set(DEMO_ROWS)
    for row, method in DEMO_ROWS.items():
        spec = dict(demo[row])
        if method in cfg["methods"]:
            expected = {k: v for k, v in cfg["methods"][method].items() if k not in ("tune", "rank_scale")}
            assert spec.pop("hparams") == "hparams/MoTE/testbed-qwen3_moe.yaml"
        else:
            expected = {}
            assert spec.pop("hparams") == cfg["host_methods"][method]["hparams"].format(arch="qwen3_moe")
        expected |= tuned[method]["chosen"]
        assert {k: spec.get(k) for k in expected} == expected, row
