"""The benchmark runners on tiny inputs: bad input refused with a clear message, the pipelines produce reports."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mote_plugin.testbed.data import edit_records

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    if str(BENCHMARKS) not in sys.path:  # as when run as a script: the benchmarks import each other's helpers
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return load("solver_speed")


@pytest.fixture(scope="module")
def quality():
    return load("quality")


TINY = dict(E=6, d=16, h=8, k=2, layers=2)


def test_solver_speed_runs_every_method_on_a_tiny_shape(speed, monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "SHAPES", {"tiny": speed.Shape(**TINY, adapter="Qwen3MoeAdapter"),
                                          "tiny-transposed": speed.Shape(**TINY, adapter="GptOssAdapter")})
    monkeypatch.setattr(speed, "RANKS", (3, 8, 4))
    # the benchmark makes glibc mmap and unmap every allocation above 128 KiB, for the whole process: here it would slow
    # every later test ~3x (page faults on each tensor allocation)
    monkeypatch.setattr(speed, "fixed_mmap_threshold", lambda: None)
    speed.main(["--shape", "tiny", "tiny-transposed", "--edits", "20", "--edits-per-batch", "10", "--sample-blocks",
                "2",
                "--out", str(tmp_path / "speed")])
    report = json.loads((tmp_path / "speed.json").read_text())
    for shape in ("tiny", "tiny-transposed"):
        methods = report["shapes"][shape]["methods"]
        assert set(methods) == set(speed.METHODS)
        assert all(m["seconds"] > 0 for m in methods.values())
        assert methods["moeedit-bcd"]["extrapolated"]["blocks"] > 0
    assert "| mote | " in (tmp_path / "speed.md").read_text()


def test_solver_speed_refuses_what_does_not_fit(speed, monkeypatch):
    monkeypatch.setattr(speed, "available_bytes", lambda: 2**30)
    with pytest.raises(SystemExit, match=r"needs about [\d.]+ GiB, only 1.0 GiB available"):
        speed.check_memory("qwen3-30b-a3b", speed.SHAPES["qwen3-30b-a3b"], 50)
    with pytest.raises(SystemExit):
        speed.main(["--method", "adam"])  # argparse: invalid choice


def test_speedup_and_per_layer_batches_write_every_layer(speed):
    """run_batch writes all layers for every method; the unstructured per-layer solvers match their own solve."""
    shape = speed.Shape(**TINY, adapter="Qwen3MoeAdapter")
    adapter = speed.ADAPTERS[shape.adapter]()
    gen = torch.Generator().manual_seed(0)
    for method in ("mote", "global+speedup", "bcd+speedup", "global", "bcd"):
        blocks, W = zip(*[speed.make_block(shape, adapter, gen) for _ in range(shape.layers)])
        basis, _ = speed.make_basis(shape, W[-1], gen)
        before = [adapter.down_param(b).detach().clone() for b in blocks]
        batch = [speed.synthetic_capture(shape, 5, gen) for _ in range(shape.layers)]
        split = {}
        speed.run_batch(method, adapter, list(blocks), [basis] * shape.layers, batch, split)
        assert set(split) == {"solve", "factors", "write"}
        assert all(not torch.equal(adapter.down_param(b), w) for b, w in zip(blocks, before)), method


def test_quality_config_is_checked_before_any_work(quality, tmp_path):
    bad = tmp_path / "bad.yaml"
    ranks = "real_ranks: {qwen3_moe: {ranks: [16, 256, 128], shape: [128, 2048, 768]}}\n"
    head = "builds: {qwen3_moe: {facts: 20}}\ndev: 4\ntest: 8\nbatch_size: 4\n" + ranks
    bad.write_text(head + "methods: {MoTE: {}}\nwhat: 1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['what'\]"):
        quality.load_config(bad)
    bad.write_text(head + "methods: {MoTE: {solver: adam}}\n")
    with pytest.raises(ValueError, match="solver must be one of"):
        quality.load_config(bad)
    bad.write_text(head + "methods: {MoTE: {}}\ntune: {mote_lambda: [0.1, -1]}\n")
    with pytest.raises(ValueError, match="mote_lambda must be a number > 0"):
        quality.load_config(bad)
    bad.write_text("builds: {qwen3_moe: {facts: 20, epochs: 3}}\ndev: 4\ntest: 8\nbatch_size: 4\nmethods: {MoTE: {}}\n"
                   + ranks)
    with pytest.raises(TypeError, match="epochs"):
        quality.load_config(bad)
    good = quality.load_config(BENCHMARKS / "configs" / "quality.yaml")
    assert {"MoTE", "MoTE-residual", "MoTE-fullrank", "Global-residual", "Global+speedup", "BCD+speedup",
            "MoEEdit-BCD"} <= set(good["methods"])
    bad.write_text(head + "methods: {MoTE: {rank_scale: -1}}\n")
    with pytest.raises(ValueError, match="rank_scale must be"):
        quality.load_config(bad)
    bad.write_text(head + "methods: {Other: {}}\n")
    with pytest.raises(ValueError, match="must include MoTE"):
        quality.load_config(bad)
    bad.write_text(head + "methods: {MoTE: {}}\nablate: [Other]\n")
    with pytest.raises(ValueError, match="ablate names methods"):
        quality.load_config(bad)


def test_side_by_side_config_is_checked_before_any_work(quality, tmp_path):
    """benchmarks/configs/side_by_side.yaml loads without a host; a malformed host row is refused by name: an unknown
    key, a YAML missing for one of its fact models, an algorithm without a host run, an arch not built, a MoTE
    method's own grid with a bad value."""
    good = quality.load_config(BENCHMARKS / "configs" / "side_by_side.yaml")
    assert {"ROME", "MEMIT", "AlphaEdit", "FT-L (experts)", "FT-M (o_proj)", "LoRA", "AdaLoRA", "UnKE"} <= set(
        good["host_methods"])
    assert {"MoTE-auto", "MoTE", "Global-residual", "MoEEdit-BCD", "MEMIT-experts"} <= set(good["methods"])
    bad = tmp_path / "bad.yaml"
    head = ("builds: {qwen3_moe: {facts: 20}, gpt_oss: {facts: 20}}\ndev: 4\ntest: 8\nbatch_size: 4\n"
            "real_ranks: {qwen3_moe: {ranks: [16, 256, 128], shape: [128, 2048, 768]}}\nmethods: {MoTE: {}}\n")
    cases = {
        "host_methods: {ROME: {hparams: 'hparams/ROME/testbed-{arch}.yaml', grid: {}}}": "got \\['grid', 'hparams'\\]",
        "host_methods: {M: {hparams: 'hparams/MEMIT/testbed-{arch}-shared_expert.yaml'}}": "does not exist",
        "host_methods: {M: {hparams: 'hparams/MoTE/testbed-{arch}.yaml'}}": "alg_name 'MoTE' has no host run",
        "host_methods: {M: {hparams: 'hparams/MEMIT/testbed-{arch}.yaml', archs: [mixtral]}}": "not in builds",
        "host_methods: {M: {hparams: 'hparams/MEMIT/testbed-{arch}.yaml', tune: {layers: 1}}}": "non-empty lists",
        "methods: {MoTE: {tune: {mote_lambda: [-1]}}}": "mote_lambda must be a number > 0",
    }
    for text, message in cases.items():
        bad.write_text(head + text + "\n")
        with pytest.raises(ValueError, match=message):
            quality.load_config(bad)


def test_side_by_side_report(quality):
    """side_by_side.md: a column per fact model with every row's test utility, interval, metrics and edit seconds; the
    settings each row chose on dev; a row that could not run with its error; for a row below 0.5 test efficacy the
    grid it tried on dev and its best dev efficacy."""
    def row(e, seconds):
        ci = dict.fromkeys(("efficacy", "generalization", "specificity", "utility"), [0.1, 0.9])
        return {"efficacy": e, "generalization": 0.5, "specificity": 0.9, "utility": (e + 1.4) / 3, "n": 8,
                "ci95": ci, "seconds": seconds, "edited": 8}

    stages = {"vstar": 1.0, "capture": 0.5, "solve": 0.1, "writeback": 0.1}
    unke = "UnboundLocalError: loss"
    tune = {"MoTE": {"chosen": {"mote_lambda": 1.0}, "dev": row(0.9, stages),
                     "grid": [{"settings": {"mote_lambda": 1.0}, **row(0.9, {})}]},
            "MEMIT": {"chosen": {"mom2_update_weight": 10}, "objective": "z at the last layer", "dev": row(0.3, {}),
                      "grid": [{"settings": {"mom2_update_weight": w}, **row(e, {"edit": 3.0})}
                               for w, e in ((10, 0.3), (15000, 0.0))]},
            "UnKE": {"error": unke, "grid": [{"settings": {}, "error": unke}]}}
    test = {"unedited": row(0.0, None), "MoTE": row(0.9, stages), "MEMIT": row(0.2, {"edit": 12.0}),
            "UnKE": {"error": unke}}
    report = {"command": "python benchmarks/quality.py", "date": "today", "machine": "m", "torch": "t", "threads": 1,
              "config": {"methods": {"MoTE": {}}, "host_methods": {"MEMIT": {"hparams": "x", "note": "damped"},
                                                                   "UnKE": {"hparams": "y"}},
                         "labels": {"MoTE": "MoTE (paper)"}, "batch_size": 4, "tune": {}},
              "archs": {"qwen3_moe": {"splits": {"dev": [1, 4], "test": [5, 12], "batches": 2, "known": 12},
                                      "build": "{}", "traced_layers": [0, 1, 2], "lookup_token": "subject_last",
                                      "yaml_ranks": [2, 2, 2], "shape": [8, 128, 128], "tune": tune, "test": test}}}
    md = quality.markdown(report)
    assert "## Side by side (test split)" in md and "| method | qwen3_moe (N = 8) |" in md
    assert "| MoTE (paper) | **0.77** [0.10, 0.90] · 0.90 / 0.50 / 0.90 · 8/8 edited · 2 s |" in md
    assert "| MEMIT | **0.53** [0.10, 0.90] · 0.20 / 0.50 / 0.90 · 8/8 edited · 12 s |" in md
    assert "| UnKE | did not run: UnboundLocalError: loss |" in md
    assert "| MEMIT | z at the last layer | mom2_update_weight 10 |" in md
    assert "| MEMIT | qwen3_moe | 0.20 | mom2_update_weight 10, 15000 | 0.30 | damped |" in md


def test_host_grid_shifts_the_traced_band_by_the_yamls_width():
    import host_rows

    # ROME (one layer): the band's last layer, shifted; MEMIT (three): the band, shifted; out of range left out
    assert host_rows.host_grid({"layers": [-1, 0, 1]}, [1, 2, 3], [2], 6) == [
        {"layers": [2]}, {"layers": [3]}, {"layers": [4]}]
    assert host_rows.host_grid({"layers": [-2, 0, 3], "lr": [1, 2]}, [1, 2, 3], [0, 1, 2], 6) == [
        {"layers": [1, 2, 3], "lr": 1}, {"layers": [1, 2, 3], "lr": 2}]
    assert host_rows.host_grid(None, [1, 2, 3], [0], 6) == [{}]


def test_quality_splits_grid_and_ranks(quality):
    facts = [{"known": i % 7 != 3, "i": i} for i in range(40)]
    cfg = {"dev": 6, "test": 100, "batch_size": 5}
    split = quality.splits(facts, cfg)
    assert len(split["dev"]) == 6 and len(split["test"]) == 28  # every known fact after dev (the last batch has 3)
    assert len(quality.splits(facts, cfg | {"test": 10})["test"]) == 10
    assert not {f["i"] for f in split["dev"]} & {f["i"] for f in split["test"]}
    assert all(f["known"] for f in split["dev"] + split["test"])
    with pytest.raises(SystemExit, match="too few"):
        quality.splits(facts[:8], cfg)
    combos = quality.grid({"layers": [-1, 0, 1], "mote_lambda": [0.1, 1]}, {"edit_layers": [0, 1, 2]}, 4)
    assert combos == [{"layers": [0, 1, 2], "mote_lambda": 0.1}, {"layers": [0, 1, 2], "mote_lambda": 1},
                      {"layers": [1, 2, 3], "mote_lambda": 0.1}, {"layers": [1, 2, 3], "mote_lambda": 1}]
    from mote_plugin import MoTEHyperParams

    hp = MoTEHyperParams(alg_name="MoTE", model_name="m", layers=[0], device="cpu", r_e=2, r_out=16, r_in=22)
    assert quality.rank_variant(hp, 2, (8, 128, 128)) == {"r_e": 4, "r_out": 32, "r_in": 44}
    assert quality.rank_variant(hp, 8, (8, 128, 128)) == {"r_e": 8, "r_out": 128, "r_in": 128}
    assert quality.rank_variant(hp, "full", (8, 128, 128)) == {"r_e": "full", "r_out": "full", "r_in": "full"}


def test_bootstrap_and_jaccard(quality):
    items = {"efficacy": [1.0] * 8 + [0.0] * 2, "generalization": [1.0] * 5 + [0.0] * 5, "specificity": [1.0] * 10}
    ci = quality.bootstrap(items, 500, 0)
    assert ci["specificity"] == [1.0, 1.0]
    assert ci["efficacy"][0] <= 0.8 <= ci["efficacy"][1] and ci["efficacy"][1] - ci["efficacy"][0] > 0.1
    assert ci["utility"][0] <= (0.8 + 0.5 + 1.0) / 3 <= ci["utility"][1]
    a = torch.tensor([[0, 1], [2, 3]])
    assert quality.jaccard(a, torch.tensor([[1, 0], [2, 4]])) == pytest.approx((1 + 1 / 3) / 2)


def test_parallel_runs_of_other_archs_keep_each_others_results(quality, tmp_path):
    # two processes, one per --arch, the same --out: each writes its own archs over what the file holds then
    cfg = {"builds": {"qwen3_moe": {}, "gpt_oss": {}, "qwen3_5_moe": {}}}
    out = tmp_path / "side"
    first = quality.save(out, {"config": cfg, "archs": {"gpt_oss": {"tune": 1}}}, ["gpt_oss"])
    second = {"config": cfg, "archs": {"qwen3_moe": {"tune": 2}}}  # started before the first wrote anything
    merged = quality.save(out, second, ["qwen3_moe"])
    assert merged["archs"] == {"qwen3_moe": {"tune": 2}, "gpt_oss": {"tune": 1}}  # the config's order
    first["archs"]["gpt_oss"]["test"] = 3
    quality.save(out, first, ["gpt_oss"])  # the first run's next phase keeps the second's arch
    assert json.loads(out.with_suffix(".json").read_text())["archs"] == {"qwen3_moe": {"tune": 2},
                                                                          "gpt_oss": {"tune": 1, "test": 3}}


@pytest.mark.slow
def test_quality_protocol_end_to_end(quality, reduced_fact_model, tmp_path, monkeypatch):
    """Every phase on a small build (dev 4, test 8 in batches of 4, a two-point grid): settings chosen on dev only, the
    report names the splits and the chosen settings beside each table."""
    from mote_plugin.testbed import load as load_build

    out, report = reduced_fact_model("gpt_oss")
    monkeypatch.setattr(quality, "fact_model", lambda arch, cfg: load_build(out))
    monkeypatch.setattr(quality, "CACHE", tmp_path)  # stats and v* caches
    cfg = tmp_path / "q.yaml"
    cfg.write_text(yaml.safe_dump({
        "builds": {"gpt_oss": {"facts": 24}}, "dev": 4, "test": 8, "batch_size": 4,
        "real_ranks": {"gpt_oss": {"ranks": [8, 256, 256], "shape": [32, 2880, 2880]}},
        "methods": {"MoTE": {"spread": "core", "rank_scale": 1}, "MoTE-fullrank": {"rank_scale": "full"},
                    "Global+speedup": {"solver": "global", "spread": "core"}},
        "tune": {"mote_lambda": [0.1, 1.0]}, "ablations": {"whitening": {"none": {"whitening": "none"}}},
        "basis_variants": {"full": {"rank_scale": "full"}}, "bootstrap": 50}))
    quality.main(["--config", str(cfg), "--out", str(tmp_path / "quality")])
    res = json.loads((tmp_path / "quality.json").read_text())["archs"]["gpt_oss"]
    assert res["splits"]["dev"] == [1, 4] and res["splits"]["test"] == [5, 12] and res["splits"]["batches"] == 2
    assert set(res["tune"]) == {"MoTE", "MoTE-fullrank", "Global+speedup"} and len(res["tune"]["MoTE"]["grid"]) == 2
    assert res["tune"]["MoTE"]["chosen"]["mote_lambda"] in (0.1, 1.0)
    assert set(res["test"]) == {"unedited", "MoTE", "MoTE-fullrank", "Global+speedup"} and res["test"]["MoTE"]["n"] == 8
    assert res["test"]["MoTE-fullrank"]["ranks"] == [8, 128, 128] and res["test"]["Global+speedup"]["ranks"] is None
    assert set(res["ablations"]) == {"MoTE"} and set(res["ablations"]["MoTE"]["whitening"]) == {"none"}
    assert res["yaml_ranks"] == [2, 12, 12] and res["test"]["MoTE"]["ranks"] == [2, 12, 12]  # the real ranks' ratios
    reproduced = {name: row["reproduced"]["mean"] for name, row in res["basis"].items()}
    assert reproduced["full"] > reproduced["MoTE's settings"] - 1e-6
    assert set(res["routing"]) == {"MoTE", "MoTE-fullrank", "Global+speedup"}
    md = (tmp_path / "quality.md").read_text()
    assert "test = known facts 5-12 (N = 8, 2 sequential batches of at most 4)" in md and "mote_lambda" in md
    assert "### Tucker ranks" in md and (tmp_path / "quality-ranks.png").exists()


def test_sequential_records(tmp_path):
    seq = load("sequential")
    facts = [{"subject": f"S{i}", "known": True, "prompt": f"S{i} is"} for i in range(120)]
    pool = [{"subject": f"T{i}", "prompt": f"T{i} plays", "target_new": "x"} for i in range(30)]
    pool.append({"subject": "S1", "prompt": "S1 again", "target_new": "x"})  # a known subject: not an extra edit
    pool.append({"subject": "Z", "prompt": "nothing of it", "target_new": "x"})  # subject not in the prompt: skipped
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(pool))
    records, kept = seq.records_and_kept(facts, path, 40, 10)
    assert [r["subject"] for r in records[:10]] == [f"S{i}" for i in range(10)]
    assert [r["subject"] for r in records[10:]] == [f"T{i}" for i in range(30)]
    assert len(kept) == 100 and kept[0]["subject"] == "S10"
    with pytest.raises(ValueError, match="give 40"):
        seq.records_and_kept(facts, path, 41, 10)
    with pytest.raises(ValueError, match="knows 120 facts"):
        seq.records_and_kept(facts, path, 40, 21)
    # one per subject, from the shipped subset by default (end_to_end's records)
    pool.append({"subject": "T0", "prompt": "T0 again", "target_new": "y"})
    path.write_text(json.dumps(pool))
    chosen = edit_records(facts[:5], 35, counterfact=path)  # 5 known facts, T0..T29
    assert [r["prompt"] for r in chosen].count("T0 again") == 0
    with pytest.raises(ValueError, match="give 35"):
        edit_records(facts[:5], 36, counterfact=path)
    assert edit_records(facts[:5], 36, counterfact=path, one_per_subject=False)[-1]["prompt"] == "T0 again"
    assert all(r["subject"] in r["prompt"] for r in edit_records(facts[:0], 20))  # the shipped subset


def test_offload_memory_measures_both_modes_on_a_small_shape(tmp_path):
    """The real-shape run lives in benchmarks/results; here the same pipeline on its --reduced shape."""
    offload_memory = load("offload_memory")
    offload_memory.main(["--reduced", "--deep", "4", "--edits", "3", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "offload_memory-reduced.json").read_text())
    runs = {r["label"]: r for r in report["runs"]}
    assert runs.keys() == {"memory, 3 layers", "disk, 3 layers", "disk, 4 layers"}
    for r in runs.values():
        stages = {"statistics", "projectors", "Tucker basis", "v*", "capture", "solve", "writeback"}
        assert stages <= r["peak_above_load"].keys()
        assert r["edit_peak_above_load"] > 0 and r["edited"] == report["edits"] == 3
    # the edited weights went back into accelerate's weights map
    assert "store" in runs["disk, 3 layers"]["peak_above_load"]
    assert "| **edit: peak above that** |" in (tmp_path / "offload_memory-reduced.md").read_text()
    with pytest.raises(SystemExit):  # --deep must add layers
        offload_memory.main(["--reduced", "--deep", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # the tokenizer knows the first EDITS requests only
        offload_memory.main(["--reduced", "--edits", str(offload_memory.EDITS + 1), "--out", str(tmp_path)])


def test_editing_overrides_and_sweeps_are_read_as_yaml(tmp_path):
    editing = load("editing")
    assert editing.key_value("layers=[1, 2, 3]") == ("layers", [1, 2, 3])
    assert editing.key_value("nullspace_threshold=1e-4") == ("nullspace_threshold", "1e-4")  # made a float by updated()
    assert editing.sweep("v_weight_decay=0.5,3,6") == ("v_weight_decay", [0.5, 3, 6])
    assert editing.sweep("v_weight_decay=[1, 2]") == ("v_weight_decay", [1, 2])
    with pytest.raises(Exception, match="KEY=VALUE"):
        editing.key_value("layers")
    args = editing.argparse.Namespace(build=str(tmp_path), set=[("layers", [1, 2])], sweep=("v_weight_decay", [1, 6]),
                                      arch=[])
    assert editing.runs(args) == [(str(tmp_path), {"layers": [1, 2], "v_weight_decay": 1}),
                                  (str(tmp_path), {"layers": [1, 2], "v_weight_decay": 6})]


@pytest.mark.slow
def test_end_to_end_speed_report(reduced_fact_model, tmp_path, monkeypatch):
    """benchmarks/end_to_end.py on a small build: every batch edited with v* included, the batched and one-at-a-time v*
    of the same requests agree, and the report gives the seconds of every stage."""
    from mote_plugin.testbed import load as load_build

    end_to_end = load("end_to_end")
    out, report = reduced_fact_model("gpt_oss")
    monkeypatch.setattr(end_to_end, "fact_model", lambda arch, cfg: load_build(out))
    end_to_end.main(["--arch", "gpt_oss", "--edits", "8", "--batch-size", "4", "--compare", "6", "--out",
                     str(tmp_path / "e2e"),
                     "--set", f"layers={report['edit_layers']}", "--set", f"fact_token={report['lookup_token']}"])
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["edits"] == 8 and 0 < report["edited"] <= 8
    assert set(report["seconds"]) == {"statistics", "basis", "vstar", "capture", "solve", "writeback"}
    assert report["vstar"]["requests"] == 6 and report["vstar"]["z_rel_diff"]["max"] < 1e-3
    assert "| **all 8 edits** (wall, statistics excluded) |" in (tmp_path / "e2e.md").read_text()


@pytest.mark.parametrize("adapter", ["Qwen3MoeAdapter", "GptOssAdapter"])
def test_global_check_reference_matches_global_solve(speed, monkeypatch, tmp_path, adapter):
    """The independent sparse Woodbury reference gives the plugin's Global update, and the check reports it."""
    monkeypatch.setattr(speed, "SHAPES", {"tiny": speed.Shape(**TINY, adapter=adapter)})
    monkeypatch.setattr(speed, "RANKS", (3, 8, 4))
    monkeypatch.setattr(speed, "fixed_mmap_threshold", lambda: None)
    speed.main(["--global-check", "--shape", "tiny", "--edits-per-batch", "5", "--check-batches", "2",
                "--out", str(tmp_path / "speed")])
    row = json.loads((tmp_path / "speed_global_check.json").read_text())["global_check"][0]
    assert row["same_experts"] and row["delta_rel_error_max"] < 1e-5
    assert row["weights_max_abs_diff"] < 1e-2  # bf16 rounding of two float32 products
    assert row["mote_per_layer_batch"] > 0 and row["reference_per_layer_batch"] > 0
    assert "| tiny | 5 |" in (tmp_path / "speed_global_check.md").read_text()


def test_one_time_runs_on_a_tiny_shape(monkeypatch, tmp_path):
    """The one-time benchmark against the branch's base commit: same projectors and factors, a report."""
    import subprocess

    found = subprocess.run(["git", "-C", str(BENCHMARKS.parent), "cat-file", "-e", "bd9e197"], capture_output=True)
    if found.returncode:
        pytest.skip("the baseline commit is not in this clone's history")
    one_time = load("one_time")
    monkeypatch.setattr(one_time, "SHAPES", {"tiny": (6, 12, 10, 2, (2, 4, 3))})
    monkeypatch.setattr(one_time, "fixed_mmap_threshold", lambda: None)
    monkeypatch.setattr(one_time, "TOKENS", 300)
    one_time.main(["--baseline", "bd9e197", "--experts", "3", "--repeats", "1", "--out", str(tmp_path / "one")])
    row = json.loads((tmp_path / "one.json").read_text())["shapes"]["tiny"]
    for p in row["projectors"].values():
        assert max(p["diff_op_norm"]) < 1e-5 and max(p["energy_diff"]) < 1e-5
    assert max(row["hosvd"]["subspace_diff"].values()) < 1e-4
    assert "| tiny | absolute 0.02 | 3 |" in (tmp_path / "one.md").read_text()
