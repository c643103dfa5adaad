"""Peak accelerator memory of one MoTE edit with each real YAML (hparams/MoTE/{qwen3-30b-a3b,gpt-oss-20b,
qwen3.6-35b-a3b}.yaml), at the real layer shapes, measured on the CPU with random weights.

    python benchmarks/edit_memory.py                      # the three YAMLs (a few minutes on 2 CPU cores)
    python benchmarks/edit_memory.py --yaml qwen3-30b-a3b

What an edit holds on the model's device besides the weights (bf16, `dtype: bfloat16`), phase by phase (editor.py):

    originals   a copy of every edited layer's down-projections [E, d, h] in the weights' dtype, taken before the edit
                (the all-or-nothing restore; EasyEdit's weights_copy is this copy), held throughout
    statistics  float64 running sums per edited layer, all layers at once: key moments [E, h, h], output moment [d, d]
    basis       per edited layer, kept: projectors P [E, h, h], U_in^T P [E, r_in, h], Tucker factors (float32);
                while one layer's basis is computed, also that computation's working memory (measured: peak resident
                memory of `basis_from_weights` on one real-shape layer, random bf16 weights, random key moments)
    v*          autograd activations of the layers above the last edited one, for batch_size requests x (context
                templates + 1 KL prompt) rows of `--tokens` tokens (measured: bytes saved for backward per token by one
                real-width decoder layer, times the tokens, times the layers above), and the float32 log-probabilities
                [n, V] at the target positions (2 target tokens per row assumed)

Basis and v* are measured on E / 8 experts (`--fraction`) and scaled to E (docstrings of the two functions).
peak = weights + originals + max(statistics, basis kept + one layer's working memory, basis kept + v*). The weights
are the published parameter counts in bf16 (the plugin holds no checkpoint). Results: benchmarks/results/edit_memory.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mote_plugin.experiments.results import run_info, run_line  # noqa: E402
from mote_plugin.mote.editor import basis_from_weights  # noqa: E402
from mote_plugin.mote.hparams import MoTEHyperParams  # noqa: E402
from mote_plugin.mote.model.stats import LayerStats  # noqa: E402
from mote_plugin.testbed.model import ModelSize, make_config, make_model  # noqa: E402
from solver_speed import PeakRSS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30

# YAML -> (testbed arch, E, d, h, top-k, attention (query heads, key/value heads, head dim), decoder layers, vocabulary,
# published parameters), from the models' published configs (Qwen3.6-35B-A3B's linear-attention layers are measured
# as full attention)
MODELS = {
    "qwen3-30b-a3b": ("qwen3_moe", 128, 2048, 768, 8, (32, 4, 128), 48, 151_936, 30.5e9),
    "gpt-oss-20b": ("gpt_oss", 32, 2880, 2880, 4, (64, 8, 64), 24, 201_088, 20.9e9),
    "qwen3.6-35b-a3b": ("qwen3_5_moe", 256, 2048, 512, 8, (16, 2, 256), 40, 248_320, 35.0e9),
}
TEMPLATES = 5  # MEMIT's context templates besides "{}" (editor.context_templates), each a row, plus one KL row
GPUS = (("one 80 GB H100", 78 * 2**30), ("one 141 GB H200", 139 * 2**30))  # what their drivers leave usable


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def basis_memory(E: int, d: int, h: int, hp: MoTEHyperParams, fraction: int) -> tuple[int, int]:
    """(bytes kept, peak working bytes) of one layer's basis at (E, d, h), random bf16 weights and key moments,
    measured on E / fraction experts (at least r_e) and scaled to E (what grows with E: the projectors, U_in^T P,
    the float64 working copy of the weights; the [d, d] and [h, h] parts are then over-counted)."""
    r_e = hp.r_e if isinstance(hp.r_e, int) else 1
    E_full, E = E, max(E // fraction, r_e)  # at least the expert-mode rank
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(E, d, h, generator=g) * 0.02).to(torch.bfloat16)  # [E, d, h]
    scale = torch.logspace(0, -5, h, dtype=torch.float32)  # [h] a power-law spectrum, as preserved keys have
    moments = torch.diag(scale).expand(E, h, h).clone()  # [E, h, h]
    counts = torch.full((E,), 400, dtype=torch.long)  # [E] every expert above nullspace_min_tokens
    stats = LayerStats(moments=moments, counts=counts, cov_out=torch.eye(d), n_tokens=50_000)
    gc.collect()
    with PeakRSS() as peak:
        basis = basis_from_weights(W, stats, hp)
    kept = nbytes(basis.P, basis.key_maps, *(basis.factors or ()))
    return int(kept * E_full / E), int(peak.peak * E_full / E)


def vstar_bytes_per_token(arch: str, E: int, d: int, h: int, top_k: int, attention: tuple[int, int, int],
                          fraction: int) -> float:
    """Bytes saved for backward per token by one decoder layer at the real width and attention shape (bf16, random
    weights), with max(top-k, E / fraction) experts: a token's saved activations are those of its top-k experts,
    whatever E, but for its router logits [E] (float32), added for the real E."""
    E_sub = max(top_k, E // fraction)
    torch.manual_seed(0)
    heads, kv_heads, head_dim = attention
    size = ModelSize(d_model=d, layers=1, heads=d // head_dim, experts=E_sub, top_k=top_k, expert_hidden=h,
                     max_positions=256)
    config = make_config(arch, 256, size, {})
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, kv_heads, head_dim
    model = make_model(config).to(torch.bfloat16)
    model.requires_grad_(False)
    rows, tokens = 8, 32
    x = torch.randn(rows, tokens, d, dtype=torch.bfloat16, requires_grad=True)  # [rows, S, d] v*'s delta enters here
    saved: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t):  # activations only: the weights a backward reads are the model's own, counted under "weights"
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.model(inputs_embeds=x, use_cache=False).last_hidden_state  # [rows, S, d]
    del out, model
    saved.pop(x.untyped_storage().data_ptr(), None)
    return sum(saved.values()) / (rows * tokens) + (E - E_sub) * 4


def load_yaml(name: str) -> MoTEHyperParams:
    return MoTEHyperParams.from_hparams(ROOT / "hparams" / "MoTE" / name)


def measure(name: str, tokens: int, fraction: int) -> dict:
    hp = load_yaml(name)
    arch, E, d, h, top_k, attention, n_layers, vocab, params = MODELS[name]
    n_edit, L = len(hp.layers), max(hp.layers)
    kept, working = basis_memory(E, d, h, hp, fraction)
    per_token = vstar_bytes_per_token(arch, E, d, h, top_k, attention, fraction)
    above = (hp.v_loss_layer if hp.v_loss_layer >= 0 else n_layers - 1) - L
    terms = {
        "weights": params * 2,
        "originals": n_edit * E * d * h * 2,
        "statistics": n_edit * (E * h * h + d * d) * 8,
        "basis kept": n_edit * kept,
        "basis working (one layer)": max(working - kept, 0),
    }
    raw = {"yaml": name, "shape": [E, d, h], "layers": hp.layers, "tokens": tokens, "layers_above": above,
           "vocab": vocab, "vstar_bytes_per_token_layer": per_token, "terms": terms}
    return finish(raw, hp)


def finish(r: dict, hp: MoTEHyperParams) -> dict:
    """`r` with the v* terms for the YAML's batch_size / v_batch_size, the peak and the GPUs it fits."""
    terms = {k: v for k, v in r["terms"].items() if not k.startswith("v*")}
    v_requests = min(hp.v_batch_size or hp.batch_size, hp.batch_size)  # requests whose v* is optimised together
    rows = v_requests * (TEMPLATES + 2)  # "{}" + templates, and the KL prompt
    terms["v* activations"] = r["vstar_bytes_per_token_layer"] * rows * r["tokens"] * r["layers_above"]
    terms["v* log-probabilities"] = rows * 2 * MODELS[r["yaml"]][7] * 4 * 2  # [n, V] float32, and its log-softmax
    vstar = terms["v* activations"] + terms["v* log-probabilities"]
    basis = terms["basis kept"]
    extra = max(terms["statistics"], basis + terms["basis working (one layer)"], basis + vstar)
    peak = terms["weights"] + terms["originals"] + extra
    per_request = vstar / v_requests
    room = GPUS[0][1] - terms["weights"] - terms["originals"] - basis
    return r | {"batch_size": hp.batch_size, "v_batch_size": hp.v_batch_size, "v_requests": v_requests,
                "rows": rows, "vstar_per_request": per_request, "largest_v_batch_size_80gb": int(room // per_request),
                "terms": terms, "peak": peak, "fits": [gpu for gpu, cap in GPUS if peak <= cap]}


def table(results: list[dict]) -> list[str]:
    """Per YAML: GiB of each term, the peak and the GPUs it fits."""
    names = list(results[0]["terms"])
    lines = ["| YAML | (E, d, h) | v* requests at once | " + " | ".join(names) + " | peak | fits |",
             "|---" * (len(names) + 5) + "|"]
    for r in results:
        cells = [f"{r['terms'][k] / GIB:.1f}" for k in names]
        lines.append(f"| {r['yaml']} | {tuple(r['shape'])} | {r['v_requests']} | " + " | ".join(cells)
                     + f" | **{r['peak'] / GIB:.1f}** | {', '.join(r['fits']) or 'none of these'} |")
    return lines


def markdown(results: list[dict], info: dict) -> str:
    notes = [f"GiB; usable: {', '.join(f'{g} {c / GIB:.0f}' for g, c in GPUS)}. v*: `v_batch_size` requests (null: "
             f"the batch) x {TEMPLATES + 2} rows of {results[0]['tokens']} tokens, through the layers above the last "
             "edited one; per request and, in brackets, the largest v_batch_size that fits the 80 GB GPU: " + ", ".join(
                 f"{r['yaml']} {r['vstar_per_request'] / GIB:.2f} GiB ({r['largest_v_batch_size_80gb']})"
                 for r in results) + "; bytes per token and layer: " + ", ".join(
                 f"{r['yaml']} {r['vstar_bytes_per_token_layer'] / 1024:.0f} KiB" for r in results), run_line(info)]
    return "\n".join(table(results)) + "\n\n" + "\n\n".join(notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--yaml", action="append", choices=sorted(MODELS), help="default: all three")
    parser.add_argument("--tokens", type=int, default=32, help="padded tokens per v* row")
    parser.add_argument("--fraction", type=int, default=8, help="measure on E / FRACTION experts and scale (1: all)")
    parser.add_argument("--out", default=str(RESULTS / "edit_memory"), help="results: OUT.json and OUT.md")
    parser.add_argument("--render", action="store_true",
                        help="recompute the v* terms of edit_memory.json for the YAMLs' batch sizes as they are now")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        saved = json.loads(Path(f"{out}.json").read_text())
        results = [finish(r, load_yaml(r["yaml"])) for r in saved["results"]]
        Path(f"{out}.json").write_text(json.dumps(saved | {"results": results}, indent=1))
        Path(f"{out}.md").write_text(markdown(results, saved["info"]))
        print(markdown(results, saved["info"]))
        return
    info = run_info("python benchmarks/edit_memory.py" + "".join(f" --yaml {y}" for y in args.yaml or ())
                    + f" --fraction {args.fraction}")
    results = []
    for name in args.yaml or list(MODELS):
        results.append(measure(name, args.tokens, args.fraction))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "terms"}), flush=True)
    # a YAML measured again replaces its row; the others measured before are kept (one process per YAML: each peak is
    # that process's own)
    before = json.loads(Path(f"{out}.json").read_text())["results"] if Path(f"{out}.json").exists() else []
    measured = {r["yaml"]: r for r in before} | {r["yaml"]: r for r in results}
    results = [measured[name] for name in MODELS if name in measured]
    info["command"] = f"python benchmarks/edit_memory.py --yaml Y (one process per YAML) --fraction {args.fraction}"
    out.parent.mkdir(exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    Path(f"{out}.md").write_text(markdown(results, info))
    print(markdown(results, info))


if __name__ == "__main__":
    main()
