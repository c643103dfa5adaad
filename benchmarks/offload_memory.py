"""Peak memory of one MoTE edit at the real Qwen3-30B-A3B layer shape, with the model in memory and disk-offloaded.

    python benchmarks/offload_memory.py             # 4 decoder layers of Qwen3-30B-A3B shape, bf16 (~6 min, 2 cores)
    python benchmarks/offload_memory.py --deep 12   # and a 12-layer model disk-offloaded (+ ~14 GB disk, ~15 min)
    python benchmarks/offload_memory.py --reduced   # a small shape, to check the script (~1 min; --edits 3: ~40 s)

A Qwen3-MoE model with the real layer shape (d_model 2048, 128 experts top-8, expert hidden 768, 32/4 attention
heads) and random weights is saved once; each mode then runs in a fresh process:

    memory  `from_pretrained(folder)`: the whole model in CPU memory
    disk    `from_pretrained(folder, device_map=..., offload_folder=...)`: every decoder layer offloaded to disk,
            embeddings, norm and head on the CPU (accelerate loads a layer's weights only for its forward pass)

and applies one MoTE edit (10 CounterFact requests, or `--edits N`; hparams/MoTE/qwen3-30b-a3b.yaml at the last layer,
fewer v* steps and preservation tokens: memory does not depend on them). `--deep N` adds a disk-offloaded model of N
layers, made from the saved one by repeating its layers: the peak should not grow with the layers that are not edited.
A thread samples the resident set size every 5 ms; each stage (statistics, projectors, Tucker basis, v*, capture,
solve, writeback, history, store) reports its peak of anonymous memory (mmapped checkpoint pages excluded) above the
level after loading. Results: benchmarks/results/offload_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from mote_plugin.experiments.results import run_info, run_line, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {  # Qwen3-30B-A3B's decoder layer; the model has only `layers` of them (random weights)
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, layers=4),
    "reduced": dict(hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, layers=3),
}
EDITS = 10
GiB = 2**30


def memory_bytes() -> dict[str, int]:
    """The process's resident memory: `anon` (its own, what an edit costs) and `file` (pages of mmapped files such as
    safetensors checkpoints, which the kernel can drop and re-read)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {"anon": int(fields["RssAnon"].split()[0]) * 1024, "file": int(fields["RssFile"].split()[0]) * 1024}


def anon_bytes() -> int:
    return memory_bytes()["anon"]


def requests(n: int = EDITS) -> list[dict]:
    path = ROOT / "mote_plugin" / "data" / "counterfact" / "counterfact-subset.json"
    return [{k: r[k] for k in ("prompt", "subject", "target_new")} for r in json.loads(path.read_text())[:n]]


def tokenizer():
    from mote_plugin.mote.model.stats import corpus_texts
    from mote_plugin.testbed.tokenizer import train_tokenizer

    texts = [t for _, t in zip(range(2000), corpus_texts(None))]
    texts += [f"{r['prompt']} {r['target_new']}" for r in requests()]
    return train_tokenizer(texts, 2000)


def build(folder: Path, shape: str, layers: int) -> None:
    """Save the random bf16 model (run in its own process: building it takes the whole model in memory)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from mote_plugin.testbed.tokenizer import special_ids

    tok = tokenizer()
    s = dict(SHAPES[shape])
    s.pop("layers")
    config = Qwen3MoeConfig(vocab_size=len(tok), num_hidden_layers=layers, intermediate_size=6144,
                            norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=512,
                            **s, **special_ids(tok))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen3MoeForCausalLM(config)
    model.save_pretrained(folder)


def deepen(src: Path, dst: Path, layers: int) -> None:
    """A checkpoint with `layers` decoder layers made from the saved one by repeating its layers, written one layer per
    shard and one layer at a time (building a deep model in memory takes all of it at once: 12 layers do not fit in
    24 GiB)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    where = {}  # tensor name -> file
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where |= {k: path for k in f.keys()}

    def copy(names: dict[str, str], shard: str) -> dict[str, str]:  # {new name: old name} -> weight map entries
        tensors = {}
        for new, old in names.items():
            with safe_open(str(where[old]), framework="pt") as f:
                tensors[new] = f.get_tensor(old)
        save_file(tensors, dst / shard, metadata={"format": "pt"})
        return {new: shard for new in names}

    dst.mkdir(parents=True)
    weight_map = copy({k: k for k in where if not k.startswith("model.layers.")}, "rest.safetensors")
    for i in range(layers):
        prefix = f"model.layers.{i % n}."
        weight_map |= copy({f"model.layers.{i}.{k[len(prefix):]}": k for k in where if k.startswith(prefix)},
                           f"layer-{i:03d}.safetensors")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][i % n] for i in range(layers)]
    (dst / "config.json").write_text(json.dumps(config, indent=1))


# ---------------------------------------------------------------------------------------------------------------------
# one mode, in a fresh process
# ---------------------------------------------------------------------------------------------------------------------


class StagePeaks:
    """Peak anonymous memory per stage label, sampled by a thread; `stage(owner, name, label)` wraps a function to set
    the label (the innermost wrapped call running)."""

    def __init__(self):
        self.label, self.peaks, self._stop = "other", {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            value = anon_bytes()
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), value)
            time.sleep(0.005)

    def stage(self, owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            outer, self.label = self.label, label
            try:
                return real(*args, **kwargs)
            finally:
                self.peaks[label] = max(self.peaks.get(label, 0), anon_bytes())
                self.label = outer

        setattr(owner, name, wrapped)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(folder: Path, mode: str, shape: str, layers: int, edits: int = EDITS) -> dict:
    from transformers import AutoModelForCausalLM

    from mote_plugin import apply_mote_to_model, last_edited, last_timings
    from mote_plugin.mote import editor
    from mote_plugin.mote.algebra.update import ExpertUpdate
    from mote_plugin.mote.editor import MoTEEditor
    from mote_plugin.mote.hparams import MoTEHyperParams
    from mote_plugin.mote.model import offload
    from solver_speed import fixed_mmap_threshold

    fixed_mmap_threshold()  # freed memory goes back to the system, so each stage's peak is its own
    torch.set_num_threads(2)
    tok = tokenizer()
    start = anon_bytes()
    t = time.time()
    if mode == "disk":
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                      **{f"model.layers.{i}": "disk" for i in range(layers)}}
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map,
                                                     offload_folder=str(folder / "offload"))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    load_s = time.time() - t
    after_load = anon_bytes()
    file_after_load = memory_bytes()["file"]
    model_bytes = sum(t.numel() * t.element_size() for _, t in model.state_dict().items())
    block = model.model.layers[layers - 1].mlp
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())

    hp = MoTEHyperParams.from_hparams(ROOT / "hparams" / "MoTE" / "qwen3-30b-a3b.yaml")
    hp = MoTEHyperParams(**(hp.to_dict() | dict(layers=[layers - 1], v_loss_layer=layers - 1, v_num_grad_steps=5,
                                                 preservation_tokens=2000, max_length=128, device="cpu",
                                                 v_keep_failed=True,  # 5 v* steps on random weights reach no target
                                                 stats_dir=str(folder / f"stats-{mode}"), model_name=str(folder))))
    peaks = StagePeaks()
    for owner, name, label in [(editor, "preservation_stats", "statistics"),
                               (editor, "nullspace_projectors", "projectors"),
                               (editor, "tucker_factors", "Tucker basis"), (MoTEEditor, "targets", "v*"),
                               (editor, "capture", "capture"), (editor, "solve_batch", "solve"),
                               (ExpertUpdate, "write", "writeback"), (editor, "record_call", "history"),
                               (offload, "store", "store")]:
        peaks.stage(owner, name, label)
    t = time.time()
    with peaks:
        apply_mote_to_model(model, tok, requests(edits), hp)
    edit_s = time.time() - t
    # how large the edit is relative to the weights, and how much of the parameter the edit history's revert fix-up
    # holds (docs/patches.md: it grows with the relative size of the change)
    call = MoTEEditor(model).history.calls[-1]
    (name, fixup), = call.revert.items() or [(call.writes[0].param, None)]
    weight = offload.values(model, [name])[name].float()  # [E, d, h], the edited weights
    delta = sum(w.update.dense(weight.shape[0]) for w in call.writes)  # [E, d, h] float32
    relative_change = float(delta.norm() / (weight - delta).norm())
    fixup_fraction = 0.0 if fixup is None else fixup.index.numel() / weight.numel()
    return {"mode": mode, "layers": layers, "label": f"{mode}, {layers} layers", "shape": shape, "load_s": load_s,
            "edit_s": edit_s, "model_bytes": model_bytes,
            "edited_block_bytes": block_bytes, "rss_after_load": after_load - start,
            "file_rss_after_load": file_after_load,
            "peak_above_load": {k: max(0, v - after_load) for k, v in peaks.peaks.items()},
            "edit_peak_above_load": max(peaks.peaks.values()) - after_load, "timings": last_timings(model),
            "edited": last_edited(model),
            "relative_change": relative_change, "revert_fixup_fraction": fixup_fraction}


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    return "\n".join([f"# MoTE edit memory, model in memory vs disk-offloaded ({report['shape']} layer shape)", "",
                      f"{run_line(report)}. One edit of {report.get('edits', EDITS)} requests at the last decoder "
                      "layer, bf16, random weights. GiB of the process's own (anonymous) resident memory; pages of "
                      "mmapped checkpoint files, which the kernel can drop, are not counted (their level after loading "
                      "has its own row). Each stage's row is the highest level while it ran.", "",
                      *table(report)]) + "\n"


def table(report: dict) -> list[str]:
    """A column per run: the model, each stage's level above loading, times, the peak; then the two peaks compared."""
    runs = {r["label"]: r for r in report["runs"]}
    stages = [s for s in ("statistics", "projectors", "Tucker basis", "v*", "capture", "solve", "writeback", "history",
                          "store")
              if any(s in r["peak_above_load"] for r in runs.values())]
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    peak = lambda r: r["rss_after_load"] + r["edit_peak_above_load"]  # noqa: E731  the process during the edit

    def row(label: str, cell) -> str:  # a table row: `cell(run)` in each run's column
        return f"| {label} | " + " | ".join(cell(r) for r in runs.values()) + " |"

    lines = ["| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs),
             row("model weights (all layers)", lambda r: g(r["model_bytes"])),
             row("edited MoE block", lambda r: g(r["edited_block_bytes"])),
             row("resident after loading", lambda r: g(r["rss_after_load"])),
             row("**edit: peak above that**", lambda r: f"**{g(r['edit_peak_above_load'])}**")]
    lines += [row(f"&nbsp; {s}", lambda r, s=s: g(r["peak_above_load"].get(s, 0))) for s in stages]
    lines += [row("mmapped file pages after loading (not counted above)", lambda r: g(r["file_rss_after_load"])),
              row("load time (s)", lambda r: f"{r['load_s']:.1f}"),
              row("edit: \\|ΔW\\| / \\|W\\| of the edited down_proj", lambda r: f"{r['relative_change']:.3f}"),
              row("edit history: revert fix-up entries / entries", lambda r: f"{r['revert_fixup_fraction']:.3f}"),
              row("edit time (s)", lambda r: f"{r['edit_s']:.1f}"),
              row("**peak of the process during the edit**", lambda r: f"**{g(peak(r))}**")]
    layers = SHAPES[report["shape"]]["layers"]
    if {f"memory, {layers} layers", f"disk, {layers} layers"} <= runs.keys():
        m, d = runs[f"memory, {layers} layers"], runs[f"disk, {layers} layers"]
        lines += ["", f"Peak during the edit (loaded weights + edit): memory {g(peak(m))} GiB, disk-offloaded "
                  f"{g(peak(d))} GiB ({peak(d) / peak(m):.2f}x)."]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reduced", action="store_true", help="a small shape, to check the script")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where offload_memory.{json,md} go")
    parser.add_argument("--deep", type=int, metavar="N", help="also edit a disk-offloaded model of N decoder layers")
    parser.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)  # folder, layers
    parser.add_argument("--edits", type=int, default=EDITS,
                        help=f"requests in the edit (default {EDITS}; at most {EDITS})")
    parser.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)  # folder, mode, layers, edits
    args = parser.parse_args(argv)
    shape = "reduced" if args.reduced else "qwen3-30b-a3b"
    if args._build:
        return build(Path(args._build[0]), shape, int(args._build[1]))
    if args._measure:
        print(json.dumps(measure(Path(args._measure[0]), args._measure[1], shape, int(args._measure[2]),
                                 int(args._measure[3]))))
        return None
    layers = SHAPES[shape]["layers"]
    if not 1 <= args.edits <= EDITS:  # the tokenizer is trained on the first EDITS requests
        parser.error(f"--edits must be between 1 and {EDITS}, got {args.edits}")
    if args.deep is not None and args.deep <= layers:
        parser.error(f"--deep must be more than the {layers} layers of the main runs, got {args.deep}")
    extra = ["--reduced"] if args.reduced else []
    plan = [(layers, "memory"), (layers, "disk")] + ([(args.deep, "disk")] if args.deep else [])
    command = " ".join(["python benchmarks/offload_memory.py", *extra, *([f"--deep {args.deep}"] if args.deep else []),
                        *([f"--edits {args.edits}"] if args.edits != EDITS else [])])
    report = run_info(command) | {"shape": shape, "edits": args.edits, "runs": []}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "offload_memory" + ("-reduced" if args.reduced else "")
    with tempfile.TemporaryDirectory(prefix="mote-offload-") as tmp:
        folder = Path(tmp) / "model"
        print(f"building the {shape} model in {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--_build", str(folder), str(layers), *extra], check=True)
        for n, mode in plan:
            if n != layers and not (Path(tmp) / f"model-{n}").exists():
                deepen(folder, Path(tmp) / f"model-{n}", n)
            print(f"editing, model {mode}, {n} layers ...", flush=True)
            where = folder if n == layers else Path(tmp) / f"model-{n}"
            out = subprocess.run([sys.executable, __file__, "--_measure", str(where), mode, str(n), str(args.edits),
                                  *extra],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            report["runs"].append(json.loads(out.strip().splitlines()[-1]))
            write_results(args.out / name, report, markdown(report))  # after every run: a late failure keeps the rest
    print(markdown(report))


if __name__ == "__main__":
    main()
