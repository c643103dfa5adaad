"""The benchmark runners on tiny inputs: bad input refused with a clear message, the pipelines produce reports."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

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
def paper():
    return load("paper")


TINY = dict(E=6, d=16, h=8, k=2, layers=2)


def test_solver_speed_runs_every_method_on_a_tiny_shape(speed, monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "SHAPES", {"tiny": speed.Shape(**TINY, adapter="Qwen3MoeAdapter"),
                                          "tiny-transposed": speed.Shape(**TINY, adapter="GptOssAdapter")})
    monkeypatch.setattr(speed, "RANKS", (3, 8, 4))
    # the benchmark makes glibc mmap and unmap every allocation above 128 KiB, for the whole process: here it would slow
    # every later test ~3x (page faults on each tensor allocation)
    monkeypatch.setattr(speed, "fixed_mmap_threshold", lambda: None)
    speed.main(["--shape", "tiny", "tiny-transposed", "--edits", "20", "--edits-per-batch", "10", "--sample-blocks", "2",
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


def test_paper_config_is_checked_before_any_work(paper, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("archs: [qwen3_moe]\nedits: 10\nbatch_size: 5\nmethods: {X: {}}\nwhat: 1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['what'\]"):
        paper.load_config(bad)
    bad.write_text("archs: [qwen3_moe]\nedits: 10\nbatch_size: 5\nmethods: {X: {solver: adam}}\n")
    with pytest.raises(ValueError, match="solver must be one of"):
        paper.load_config(bad)
    good = paper.load_config(BENCHMARKS / "configs" / "paper.yaml")
    assert {"MoTE", "MoEEdit-BCD", "BCD+speedup", "Global+speedup", "MoTE-residual"} <= set(good["methods"])


def test_paper_refuses_more_edits_than_known_facts(paper):
    facts = [{"known": True}] * 3 + [{"known": False}] * 2
    edited, preserved = paper.counterfact_records(facts, 2)
    assert len(edited) == 2 and len(preserved) == 1
    with pytest.raises(ValueError, match="knows only 3 facts"):
        paper.counterfact_records(facts, 4)


def test_bootstrap_and_routing_similarity(paper):
    items = {"efficacy": [1.0] * 8 + [0.0] * 2, "generalization": [1.0] * 5 + [0.0] * 5, "specificity": [1.0] * 10}
    ci = paper.bootstrap(items, 500, 0)
    assert ci["specificity"] == [1.0, 1.0]
    assert ci["efficacy"][0] <= 0.8 <= ci["efficacy"][1] and ci["efficacy"][1] - ci["efficacy"][0] > 0.1
    assert ci["utility"][0] <= (0.8 + 0.5 + 1.0) / 3 <= ci["utility"][1]
    a = torch.tensor([[0, 1], [2, 3]])
    assert paper.jaccard(a, torch.tensor([[1, 0], [2, 4]])).tolist() == [1.0, pytest.approx(1 / 3)]
    sim = paper.routing_similarity({0: a, 1: a, 2: a}, {0: a, 1: a, 2: torch.tensor([[4, 5], [6, 7]])})
    assert sim["windows"] == {"early": 1.0, "middle": 1.0, "late": 0.0}


def test_sequential_records(tmp_path):
    seq = load("sequential")
    facts = [{"subject": f"S{i}", "known": True, "prompt": f"S{i} is"} for i in range(120)]
    pool = [{"subject": f"T{i}", "prompt": f"T{i} plays", "target_new": "x"} for i in range(30)]
    pool.append({"subject": "S1", "prompt": "S1 again", "target_new": "x"})  # a known subject: not an extra edit
    pool.append({"subject": "Z", "prompt": "nothing of it", "target_new": "x"})  # subject not in the prompt: skipped
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(pool))
    records, kept = seq.edit_records(facts, path, 40, 10)
    assert [r["subject"] for r in records[:10]] == [f"S{i}" for i in range(10)]
    assert [r["subject"] for r in records[10:]] == [f"T{i}" for i in range(30)]
    assert len(kept) == 100 and kept[0]["subject"] == "S10"
    with pytest.raises(ValueError, match="30 usable records"):
        seq.edit_records(facts, path, 41, 10)
    with pytest.raises(ValueError, match="knows 120 facts"):
        seq.edit_records(facts, path, 40, 21)


def test_offload_memory_measures_both_modes_on_a_small_shape(tmp_path):
    """The real-shape run lives in benchmarks/results; here the same pipeline on its --reduced shape."""
    offload_memory = load("offload_memory")
    offload_memory.main(["--reduced", "--deep", "4", "--edits", "3", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "offload_memory-reduced.json").read_text())
    runs = {r["label"]: r for r in report["runs"]}
    assert runs.keys() == {"memory, 3 layers", "disk, 3 layers", "disk, 4 layers"}
    for r in runs.values():
        assert {"statistics", "projectors", "Tucker basis", "v*", "capture", "solve", "writeback"} <= r["peak_above_load"].keys()
        assert r["edit_peak_above_load"] > 0 and r["timings"]["edits"] == report["edits"] == 3
    assert "store" in runs["disk, 3 layers"]["peak_above_load"]  # the edited weights went back into accelerate's weights map
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
    args = editing.argparse.Namespace(build=str(tmp_path), set=[("layers", [1, 2])], sweep=("v_weight_decay", [1, 6]), arch=[])
    assert editing.runs(args) == [(str(tmp_path), {"layers": [1, 2], "v_weight_decay": 1}),
                                  (str(tmp_path), {"layers": [1, 2], "v_weight_decay": 6})]


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

    if subprocess.run(["git", "-C", str(BENCHMARKS.parent), "cat-file", "-e", "bd9e197"], capture_output=True).returncode:
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
