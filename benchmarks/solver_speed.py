"""Solve + writeback speed of MoTE and the baselines at the real MoE layer shapes (random weights, synthetic edits).

    python benchmarks/solver_speed.py              # the three shapes, T = 1000 edits in batches of 50
                                                   # (~15 min, 2 CPU cores)
    python benchmarks/solver_speed.py --growth     # and how the costs grow with T (50..2000) and E (32..256)
                                                   # (~5 min more)
    python benchmarks/solver_speed.py --reduced    # Qwen3-30B-A3B only, 200 edits (~1.5 min)
    python benchmarks/solver_speed.py --shape gpt-oss-20b --edits 200 --method mote global+speedup
    python benchmarks/solver_speed.py --basis-check    # only MoTE per layer-batch with each basis (weights,
        # weights+edit, auto) at the three shapes (T = 50, ~5 min; results/solver_speed_basis.{json,md})
    python benchmarks/solver_speed.py --global-check   # only the Global check: per layer-batch seconds of MoTE, the
        # plugin's Global and an independent sparse Woodbury reference, and their numerical difference
        # (Qwen3-30B-A3B, T = 50, ~2 min; results/solver_speed_global_check.{json,md})

What is timed, per batch of T edits: the solve from captured keys/gates/residuals and the writeback into bf16
down-projections of every edited layer, through the plugin's own code (`solve_batch`, `ExpertUpdate.write`).
Captures, v* and the preservation statistics are not part of it (v* precomputed, as the paper's Table 2); the
one-time cost (null-space projectors from key moments, whitened HOSVD) is timed separately, for one layer.

    mote            MoTE: Tucker core at the last layer, written into every layer with that layer's basis (`core`
                    spread)
    global+speedup  exact ridge over all experts (sparse Woodbury, T x T) at the last layer, spread the same way
    bcd+speedup     MoEEdit's BCD (4 sweeps, push-through form) at the last layer, spread the same way
    global          the sparse Woodbury solve at every layer (each routed expert a rank-n_j update, others untouched)
    bcd             MoEEdit's BCD at every layer, per-expert solves of size n_j (the same iterates as published)
    moeedit-bcd     MoEEdit's BCD as published: h x h solve per block, other experts' outputs recomputed over all T
                    edits per block, dense delta @ P_j written to every expert. Timed on a sample of blocks and one
                    writeback, extrapolated to all blocks, layers and batches (all of them would take hours here)
    floor           one in-place add of a precomputed dense bf16 delta over all experts of every layer

Peak memory: the peak resident set size above the level before the method ran (sampled every 2 ms), weights and
inputs excluded. Results: benchmarks/results/solver_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from moeedit_bcd import bcd_published
from mote_plugin.adapters import GptOssAdapter, Qwen3_5MoeAdapter, Qwen3MoeAdapter
from mote_plugin.experiments.results import run_info, run_line, write_results
from mote_plugin.mote.algebra.batch_basis import BasisRule
from mote_plugin.mote.algebra.core_solve import key_maps_of
from mote_plugin.mote.algebra.nullspace import nullspace_projectors
from mote_plugin.mote.algebra.routed_keys import RoutedKeys
from mote_plugin.mote.algebra.solvers import LayerBasis, solve_batch
from mote_plugin.mote.algebra.tucker import TuckerFactors, tucker_factors

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    E: int  # routed experts
    d: int  # d_model
    h: int  # expert hidden size
    k: int  # experts per token
    layers: int  # edited layers
    adapter: str


SHAPES = {
    "qwen3-30b-a3b": Shape(E=128, d=2048, h=768, k=8, layers=5, adapter="Qwen3MoeAdapter"),
    "gpt-oss-20b": Shape(E=32, d=2880, h=2880, k=4, layers=3, adapter="GptOssAdapter"),
    "qwen3.6-35b-a3b": Shape(E=256, d=2048, h=512, k=8, layers=5, adapter="Qwen3_5MoeAdapter"),
}
ADAPTERS = {"Qwen3MoeAdapter": Qwen3MoeAdapter, "GptOssAdapter": GptOssAdapter, "Qwen3_5MoeAdapter": Qwen3_5MoeAdapter}
METHODS = ("mote", "global+speedup", "bcd+speedup", "global", "bcd", "moeedit-bcd", "floor")
RANKS = (16, 256, 128)  # (r_e, r_out, r_in), capped by the mode sizes
LAMBDA = 0.1
PASSES = 4


# ---------------------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------------------


def fixed_mmap_threshold() -> None:
    """Make glibc serve every allocation above 128 KiB by mmap and return it on free (its default raises the threshold
    after large frees, so a method run later would reuse memory freed by an earlier one and look lighter)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Peak resident set size above the level at entry, sampled by a thread every `interval` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"])


def memory_estimate(shape: Shape, T: int) -> int:
    """Bytes the benchmark holds at once for one shape: bf16 weights and float32 projectors of every layer, the
    published BCD's float32 dense deltas and [T, E, h] keys, a float32 writeback chunk and the floor's bf16 delta."""
    weights = shape.layers * shape.E * shape.d * shape.h * 2
    projectors = shape.layers * shape.E * shape.h * shape.h * 4
    published = shape.E * shape.d * shape.h * 4 * 2 + T * shape.E * shape.h * 4
    floor = shape.E * shape.d * shape.h * 2
    return weights + projectors + published + floor + 512 * 2**20


def check_memory(shape_name: str, shape: Shape, T: int) -> None:
    need, have = memory_estimate(shape, T), available_bytes()
    if need > 0.9 * have:
        raise SystemExit(f"{shape_name} with T={T} needs about {need / 2**30:.1f} GiB, only {have / 2**30:.1f} GiB "
                         f"available: reduce --edits-per-batch or pick another --shape")


# ---------------------------------------------------------------------------------------------------------------------
# synthetic layers and edits
# ---------------------------------------------------------------------------------------------------------------------


class Experts(nn.Module):
    def __init__(self, down_proj: torch.Tensor):
        super().__init__()
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)


class Block(nn.Module):
    """Just enough of an MoE block for the adapters' writeback: `block.experts.down_proj` in the family's layout."""

    def __init__(self, down_proj: torch.Tensor):
        super().__init__()
        self.experts = Experts(down_proj)


def random_moments(shape: Shape, gen: torch.Generator, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key second moments [E, h, h] of `tokens` random keys per expert, with a decaying spectrum, and counts [E]."""
    scale = torch.logspace(0, -3, shape.h)  # [h]
    moments = torch.empty(shape.E, shape.h, shape.h)
    for j in range(shape.E):
        keys = torch.randn(tokens, shape.h, generator=gen) * scale  # [n, h]
        moments[j] = keys.T @ keys / tokens
    return moments, torch.full((shape.E,), tokens)


def ranks(shape: Shape) -> tuple[int, int, int]:
    return tuple(min(r, n) for r, n in zip(RANKS, (shape.E, shape.d, shape.h)))


def make_block(shape: Shape, adapter, gen: torch.Generator) -> tuple[Block, torch.Tensor]:
    """A random layer: the block with bf16 down_proj in the family's layout, and the float32 weights [E, d, h]."""
    W = torch.randn(shape.E, shape.d, shape.h, generator=gen) * 0.02  # [E, d, h]
    down_proj = (W.transpose(1, 2) if adapter.is_transposed else W).to(torch.bfloat16).contiguous()
    return Block(down_proj), W


def make_basis(shape: Shape, W: torch.Tensor, gen: torch.Generator) -> tuple[LayerBasis, dict]:
    """Projectors and whitened Tucker factors of one layer from random key moments, and the seconds each took."""
    moments, counts = random_moments(shape, gen, tokens=min(2 * shape.h, 1024))
    t = time.perf_counter()
    P = nullspace_projectors(moments, counts, rule="relative", threshold=1e-2)  # [E, h, h]
    one_time = {"projectors": time.perf_counter() - t}
    cov_in = (moments * counts[:, None, None]).sum(0) / counts.sum()  # [h, h]
    del moments
    t = time.perf_counter()
    factors = tucker_factors(W, ranks(shape), whitening="in", cov_in=cov_in, eps=1e-5)
    one_time["hosvd_whitened"] = time.perf_counter() - t
    return LayerBasis(P=P, factors=factors, key_maps=key_maps_of(factors, P)), one_time


def synthetic_capture(shape: Shape, T: int, gen: torch.Generator) -> tuple[RoutedKeys, torch.Tensor]:
    """Keys/gates/experts of T edits at one layer (top-k of random router scores) and residuals [T, d]."""
    idx = torch.rand(T, shape.E, generator=gen).topk(shape.k, dim=1).indices  # [T, k]
    gates = torch.softmax(torch.randn(T, shape.k, generator=gen), dim=1)  # [T, k]
    keys = torch.randn(T, shape.k, shape.h, generator=gen)  # [T, k, h]
    residuals = torch.randn(T, shape.d, generator=gen)  # [T, d]
    return RoutedKeys(idx, gates, keys, shape.E), residuals


# ---------------------------------------------------------------------------------------------------------------------
# the methods: one batch
# ---------------------------------------------------------------------------------------------------------------------


def run_batch(method: str, adapter, blocks: list[Block], bases: list[LayerBasis], batch: list[tuple],
              split: dict | None = None) -> None:
    """Solve and write one batch. batch[l] = (capture, residuals) of layer l; the last layer is L. `split` (optional)
    accumulates seconds per step: solve, factors (the per-layer update factors), write (matmul, cast, add)."""
    split = {} if split is None else split

    def timed(step, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        split[step] = split.get(step, 0.0) + time.perf_counter() - t
        return out

    L = len(blocks) - 1
    speedup = method.endswith("+speedup") or method == "mote"
    sol = None
    for l in range(len(blocks)):
        if sol is None or not speedup:
            layer = L if speedup else l
            sol, _ = timed("solve", solve_batch, method.removesuffix("+speedup"), layer, bases[layer], *batch[layer],
                           LAMBDA, bcd_passes=PASSES)
        update = timed("factors", sol.update, bases[l], l, 1.0 / (L - l + 1) if speedup else 1.0)
        timed("write", update.write, adapter, blocks[l])


def published_batch_seconds(shape: Shape, adapter, block: Block, basis: LayerBasis, cap: RoutedKeys, R: torch.Tensor,
                            sample_blocks: int) -> dict:
    """MoEEdit's published BCD at one layer: seconds per block (timed on `sample_blocks`), number of blocks, and the
    writeback (dense delta @ P_j for every expert, then added), timed once."""
    k = cap.projected(basis.P).keys  # [T, K, h]
    t = time.perf_counter()
    deltas = bcd_published(k, cap.gates, cap.expert_idx, R, LAMBDA, shape.E, passes=PASSES, dtype=torch.float32,
                           max_blocks=sample_blocks)  # [E, d, h]
    per_block = (time.perf_counter() - t) / sample_blocks
    blocks = PASSES * int(cap.expert_idx.unique().numel())
    t = time.perf_counter()
    param = adapter.down_param(block)
    with torch.no_grad():
        for j in range(shape.E):  # as published: delta_j @ P_j, cast, added expert by expert
            update = (deltas[j] @ basis.P[j]).to(param.dtype)  # [d, h]
            param[j].add_(update.T if adapter.is_transposed else update)
    writeback = time.perf_counter() - t
    return {"seconds_per_block": per_block, "blocks": blocks, "writeback": writeback,
            "seconds": per_block * blocks + writeback}


# ---------------------------------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------------------------------


def bench_shape(name: str, shape: Shape, edits: int, per_batch: int, methods: list[str], sample_blocks: int,
                log=print) -> dict:
    check_memory(name, shape, per_batch)
    adapter = ADAPTERS[shape.adapter]()
    gen = torch.Generator().manual_seed(0)
    log(f"[{name}] building {shape.layers} random layers {asdict(shape)}")
    blocks = []
    for _ in range(shape.layers):
        block, W = make_block(shape, adapter, gen)
        blocks.append(block)
    # the one-time basis is timed on one layer and shared by all (solve/writeback cost does not depend on its values)
    basis, one_time = make_basis(shape, W, gen)
    del W
    bases = [basis] * shape.layers
    n_batches = edits // per_batch
    batches = [[synthetic_capture(shape, per_batch, gen) for _ in range(shape.layers)] for _ in range(n_batches)]
    result = {"shape": asdict(shape), "edits": edits, "per_batch": per_batch, "batches": n_batches,
              "ranks": ranks(shape),
              "one_time_per_layer": one_time, "methods": {}}
    for method in methods:
        if method == "moeedit-bcd":
            with PeakRSS() as peak:
                pub = published_batch_seconds(shape, adapter, blocks[-1], bases[-1], *batches[0][-1], sample_blocks)
            seconds = pub["seconds"] * shape.layers * n_batches
            result["methods"][method] = {"seconds": seconds, "peak_bytes": peak.peak, "extrapolated": pub}
        elif method == "floor":
            delta = torch.full_like(adapter.down_param(blocks[0]), 1e-4)  # the parameter's layout and dtype
            with PeakRSS() as peak:
                t = time.perf_counter()
                with torch.no_grad():
                    for _ in range(n_batches):
                        for block in blocks:
                            adapter.down_param(block).add_(delta)
                seconds = time.perf_counter() - t
            del delta
            result["methods"][method] = {"seconds": seconds, "peak_bytes": peak.peak + shape.E * shape.d * shape.h * 2}
        else:
            split = {}
            with PeakRSS() as peak:
                t = time.perf_counter()
                for batch in batches:
                    run_batch(method, adapter, blocks, bases, batch, split)
                seconds = time.perf_counter() - t
            result["methods"][method] = {"seconds": seconds, "peak_bytes": peak.peak, "split": split}
        log(f"[{name}] {method}: {result['methods'][method]['seconds']:.2f} s for {edits} edits, "
            f"peak +{result['methods'][method]['peak_bytes'] / 2**20:.0f} MiB")
    return result


def growth(shape_name: str, Ts: list[int], Es: list[int], log=print) -> dict:
    """One batch at one layer of `shape_name` for growing T, and for growing E at T = 50: mote / global / bcd."""
    base = SHAPES[shape_name]
    out = {"T": {}, "E": {}}
    adapter = ADAPTERS[base.adapter]()
    gen = torch.Generator().manual_seed(1)
    layer = None
    for key, values in (("T", Ts), ("E", Es)):
        for v in values:
            shape = Shape(**(asdict(base) | {"layers": 1} | ({"E": v} if key == "E" else {})))
            T = v if key == "T" else 50
            check_memory(f"{shape_name} {key}={v}", shape, T)
            if key == "E" or layer is None:  # the T sweep shares one layer
                block, W = make_block(shape, adapter, gen)
                layer = (block, *make_basis(shape, W, gen))
                del W
            block, basis, one_time = layer
            cap, R = synthetic_capture(shape, T, gen)
            row = {"one_time": one_time}
            for method in ("mote", "global", "bcd"):
                t = time.perf_counter()
                run_batch(method, adapter, [block], [basis], [(cap, R)])
                row[method] = time.perf_counter() - t
            out[key][v] = row
            log(f"[growth {key}={v}] " + ", ".join(f"{m} {s:.2f} s" for m, s in row.items() if m != "one_time"))
    return out


def sparse_woodbury(adapter, block, P: torch.Tensor, cap: RoutedKeys, R: torch.Tensor, lam: float) -> list:
    """An independent sparse Global solve and write (none of `baselines.global_solve`'s code), the reference it is
    checked against:

        v_s = g_s P_{j_s} k_s for each selection slot s = (t, k)                        # [T*K, h]
        Psi Psi^T [t, u] = sum over slot pairs (s in t, s' in u) with j_s = j_s' of v_s . v_s'   (blocked, [T*K, T*K])
        alpha = (Psi Psi^T + lam I)^{-1} R                                                  # [T, d]
        Delta_j = sum over slots s routed to j of alpha[t_s] v_s^T = A_j^T V_j              # [d, h], rank n_j

    written into the bf16 parameter expert by expert (float32 product, cast, in-place add). Returns [(j, A_j, V_j)]
    (float64) for the numerical comparison."""
    T, K, h = cap.keys.shape
    j_of = cap.expert_idx.reshape(T * K)  # [T*K]
    t_of = torch.arange(T).repeat_interleave(K)  # [T*K]
    order = torch.argsort(j_of, stable=True)  # slots sorted by expert
    experts, counts = torch.unique_consecutive(j_of[order], return_counts=True)
    keys = cap.keys.reshape(T * K, h)[order]  # [T*K, h] float32, sorted by expert
    V = torch.empty(T * K, h, dtype=torch.float64)  # [T*K, h] gated projected keys, sorted by expert
    for j, seg in zip(experts.tolist(), torch.split(torch.arange(T * K), counts.tolist())):
        V[seg] = (keys[seg] @ P[j]).to(torch.float64)  # P_j symmetric, float32 as stored
    V *= cap.gates.reshape(T * K).to(torch.float64)[order, None]
    t_sorted, j_sorted = t_of[order], j_of[order]
    same = (j_sorted[:, None] == j_sorted[None, :]).to(torch.float64)  # [T*K, T*K]
    gram = torch.zeros(T, T, dtype=torch.float64).index_put_((t_sorted[:, None], t_sorted[None, :]), (V @ V.T) * same,
                                                              accumulate=True)  # [T, T]
    alpha = torch.linalg.solve(gram + lam * torch.eye(T, dtype=torch.float64), R.to(torch.float64))  # [T, d]
    param = adapter.down_param(block)
    d = R.shape[1]
    buffer = torch.empty(d, h)  # float32 delta of one expert
    cast = torch.empty(d, h, dtype=param.dtype)
    parts = []
    with torch.no_grad():
        for j, seg in zip(experts.tolist(), torch.split(torch.arange(T * K), counts.tolist())):
            A_j, V_j = alpha[t_sorted[seg]], V[seg]  # [n_j, d], [n_j, h]
            torch.mm(A_j.T.float(), V_j.float(), out=buffer)  # [d, h]
            cast.copy_(buffer)
            param[j].add_(cast.T if adapter.is_transposed else cast)
            parts.append((j, A_j, V_j))
    return parts


def global_check(shape_name: str, per_batch: int, batches: int, log=print) -> dict:
    """Per layer-batch seconds (median over `batches`) at one layer of `shape_name`: MoTE's solve, factors and write
    (MoTE solves once per batch, so its per layer-batch time is solve / layers + factors + write), the plugin's
    sparse Global (solve_batch + write) and the independent `sparse_woodbury`; and how far the two Global updates
    are apart (float64 deltas of the routed experts, and the bf16 weights each wrote from the same start)."""
    shape = SHAPES[shape_name]
    adapter = ADAPTERS[shape.adapter]()
    gen = torch.Generator().manual_seed(2)
    block, W = make_block(shape, adapter, gen)
    basis, _ = make_basis(shape, W, gen)
    del W
    caps = [synthetic_capture(shape, per_batch, gen) for _ in range(batches + 1)]  # the first one warms up
    steps = {k: [] for k in ("mote_solve", "mote_factors", "mote_write", "global_solve", "global_factors",
                             "global_write", "reference")}

    def clock(key, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        steps[key].append(time.perf_counter() - t)
        return out

    for cap, R in caps:
        sol, _ = clock("mote_solve", solve_batch, "mote", 0, basis, cap, R, LAMBDA)
        update = clock("mote_factors", sol.update, basis, 0, 1.0)
        clock("mote_write", update.write, adapter, block)
        sol, _ = clock("global_solve", solve_batch, "global", 0, basis, cap, R, LAMBDA)
        update = clock("global_factors", sol.update, basis, 0, 1.0)
        clock("global_write", update.write, adapter, block)
        clock("reference", sparse_woodbury, adapter, block, basis.P, cap, R, LAMBDA)
    med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in steps.items()}
    mote = med["mote_solve"] / shape.layers + med["mote_factors"] + med["mote_write"]
    glob = med["global_solve"] + med["global_factors"] + med["global_write"]

    # numerics on the last batch: the plugin's update and the reference's, applied to the same weights
    cap, R = caps[-1]
    start = adapter.down_param(block).detach().clone()
    sol, _ = solve_batch("global", 0, basis, cap, R, LAMBDA)
    update = sol.update(basis, 0, 1.0)
    update.write(adapter, block)
    written_plugin = adapter.down_param(block).detach().clone()
    with torch.no_grad():
        adapter.down_param(block).copy_(start)
    parts = sparse_woodbury(adapter, block, basis.P, cap, R, LAMBDA)
    written_ref = adapter.down_param(block).detach()
    dense = update.dense(shape.E).double()  # [E, d, h]
    worst = 0.0
    for j, A_j, V_j in parts:
        ref_j = A_j.T @ V_j  # [d, h]
        worst = max(worst, float((dense[j] - ref_j).norm() / ref_j.norm()))
    touched = sorted(j for j, _, _ in parts)
    row = {"shape": shape_name, "T": per_batch, "layers": shape.layers, "batches": batches,
           "median_seconds": med, "mote_per_layer_batch": mote, "global_per_layer_batch": glob,
           "reference_per_layer_batch": med["reference"], "global_over_mote": glob / mote,
           "reference_over_mote": med["reference"] / mote,
           "delta_rel_error_max": worst, "same_experts": touched == sorted(update.experts.tolist()),
           "weights_differing_elements": int((written_plugin != written_ref).sum()),
           "weights_max_abs_diff": float((written_plugin.float() - written_ref.float()).abs().max())}
    log(f"[global check {shape_name}] per layer-batch: MoTE {mote:.3f} s, Global {glob:.3f} s ({glob / mote:.2f}x), "
        f"reference {med['reference']:.3f} s ({med['reference'] / mote:.2f}x); max relative delta difference "
        f"{worst:.1e}")
    return row


BASIS_RULES = {"weights (the paper's)": BasisRule(), "weights+edit": BasisRule(basis="weights+edit"),
               "auto, coverage 0.9": BasisRule(auto=(True, True, True), min_coverage=0.9)}


def random_orthonormal(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, generator=gen))[0]  # [n, r]


def basis_check(shape_name: str, per_batch: int, batches: int, log=print) -> dict:
    """Per layer-batch seconds (median over `batches`) of MoTE at one layer of `shape_name` for each basis of
    BASIS_RULES: the batch's factors and the solve (solve_batch), the update factors, the write into the bf16 layer
    and the coverage. Random orthonormal factors and random projectors of rank 7h/8 stand in for the HOSVD and the
    null space (their values do not change the work); `auto` starts from full-size factors."""
    shape = SHAPES[shape_name]
    adapter = ADAPTERS[shape.adapter]()
    gen = torch.Generator().manual_seed(3)
    block, W = make_block(shape, adapter, gen)
    del W
    P = torch.empty(shape.E, shape.h, shape.h)  # [E, h, h]
    for j in range(shape.E):
        Q = random_orthonormal(shape.h, shape.h - shape.h // 8, gen)  # [h, 7h/8]
        torch.matmul(Q, Q.T, out=P[j])
    full = TuckerFactors(*(random_orthonormal(n, n, gen) for n in (shape.E, shape.d, shape.h)))
    fixed = full.truncated(ranks(shape))
    bases = {"fixed": LayerBasis(P=P, factors=fixed, key_maps=key_maps_of(fixed, P)),
             "full": LayerBasis(P=P, factors=full, key_maps=None)}
    caps = [synthetic_capture(shape, per_batch, gen) for _ in range(batches + 1)]  # the first one warms up
    rows = {}
    for name, rule in BASIS_RULES.items():
        basis = bases["full" if any(rule.auto) else "fixed"]
        steps = {k: [] for k in ("solve", "factors", "write", "coverage")}
        chosen = set()
        for cap, R in caps:
            t0 = time.perf_counter()
            sol, _ = solve_batch("mote", 0, basis, cap, R, LAMBDA, rule=rule)
            t1 = time.perf_counter()
            update = sol.update(basis, 0, 1.0)
            t2 = time.perf_counter()
            update.write(adapter, block)
            t3 = time.perf_counter()
            sol.coverage(update, cap, R)
            t4 = time.perf_counter()
            for key, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                steps[key].append(seconds)
            chosen.add(sol.factors.ranks)
        med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in steps.items()}
        rows[name] = {"median_seconds": med, "per_layer_batch": sum(med.values()), "ranks": sorted(chosen)}
        log(f"[basis check {shape_name}] {name}: {rows[name]['per_layer_batch']:.3f} s per layer-batch, ranks "
            f"{sorted(chosen)[0]}..{sorted(chosen)[-1]}")
    return {"shape": shape_name, "T": per_batch, "batches": batches, "yaml_ranks": ranks(shape), "bases": rows}


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = ["# Solver speed at real MoE layer shapes", "",
             f"{run_line(report)}. Random bf16 weights, synthetic keys/gates/residuals, statistics "
             "precomputed; solve + writeback of every edited layer (v* and captures excluded). Ratios are to MoTE in "
             "the same run.",
             ""]
    for name, r in report["shapes"].items():
        s = r["shape"]
        mote = r["methods"].get("mote", {})
        lines += [f"## {name}: E={s['E']}, d={s['d']}, h={s['h']}, top-{s['k']}, {s['layers']} layers, "
                  f"{r['edits']} edits in batches of {r['per_batch']}, ranks (r_e, r_out, r_in) = {tuple(r['ranks'])}",
                  "",
                  "| method | time (s) | time / MoTE | peak extra memory (MiB) | memory / MoTE |",
                  "|---|---|---|---|---|"]
        for m, v in r["methods"].items():
            t_ratio = f"{v['seconds'] / mote['seconds']:.2f}" if mote else "-"
            m_ratio = f"{v['peak_bytes'] / max(mote['peak_bytes'], 1):.2f}" if mote else "-"
            note = " (extrapolated)" if "extrapolated" in v else ""
            lines.append(f"| {m}{note} | {v['seconds']:.2f} | {t_ratio} | {v['peak_bytes'] / 2**20:.0f} | {m_ratio} |")
        if "split" in mote:
            lines += ["", "Where MoTE's time goes (s): " + ", ".join(f"{k} {v:.2f}" for k, v in mote["split"].items())
                      + " (write = float32 delta matmul, cast to bf16, in-place add, chunk by chunk)"]
        one = r["one_time_per_layer"]
        lines += ["", "One-time cost per layer (s): " + ", ".join(f"{k} {v:.2f}" for k, v in one.items()), ""]
        if "moeedit-bcd" in r["methods"]:
            ex = r["methods"]["moeedit-bcd"]["extrapolated"]
            lines += [f"moeedit-bcd per layer and batch: {ex['blocks']} blocks x {ex['seconds_per_block']:.3f} s "
                      f"+ writeback {ex['writeback']:.2f} s = {ex['seconds']:.1f} s, x {s['layers']} layers x "
                      f"{r['batches']} batches.", ""]
    if report.get("growth"):
        g = report["growth"]
        lines += ["## Growth (one layer, one batch; seconds)", "", "| T | mote | global | bcd |", "|---|---|---|---|"]
        lines += [f"| {T} | {row['mote']:.2f} | {row['global']:.2f} | {row['bcd']:.2f} |" for T, row in g["T"].items()]
        lines += ["", "| E (T = 50) | mote | global | bcd | projectors (one-time) | HOSVD (one-time) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {E} | {row['mote']:.2f} | {row['global']:.2f} | {row['bcd']:.2f} | "
                  f"{row['one_time']['projectors']:.2f} | {row['one_time']['hosvd_whitened']:.2f} |"
                  for E, row in g["E"].items()]
    return "\n".join(lines) + "\n"


def check_markdown(report: dict) -> str:
    lines = ["# Global solver check: the plugin's sparse Global against an independent sparse Woodbury reference", "",
             f"{run_line(report)}. One layer, random bf16 weights, synthetic edits; median seconds per "
             "layer-batch (solve + update factors + write into the bf16 layer). MoTE solves once per batch for all "
             "layers: its per layer-batch time is solve / layers + factors + write.", "",
             "| shape | T | MoTE | Global (plugin) | reference | Global / MoTE | reference / MoTE | max rel. delta "
             "diff | bf16 weights differing |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["global_check"]:
        lines.append(f"| {r['shape']} | {r['T']} | {r['mote_per_layer_batch']:.3f} | {r['global_per_layer_batch']:.3f} "
                     f"| {r['reference_per_layer_batch']:.3f} | {r['global_over_mote']:.2f} | "
                     f"{r['reference_over_mote']:.2f} | {r['delta_rel_error_max']:.1e} | "
                     f"{r['weights_differing_elements']} (max {r['weights_max_abs_diff']:.1e}) |")
    for r in report["global_check"]:
        lines += ["",
                  f"{r['shape']} steps (median s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["median_seconds"].items())]
    return "\n".join(lines) + "\n"


def basis_markdown(report: dict) -> str:
    lines = ["# MoTE's basis per batch at real MoE layer shapes", "",
             f"{run_line(report)}. One layer, random bf16 weights, synthetic edits (T per batch), random orthonormal "
             "factors and projectors in place of the HOSVD and the null space (the work does not depend on their "
             "values); median seconds per layer-batch of the solve (with the batch's factors), the update factors, "
             "the write into the bf16 layer and the coverage report. `auto` on random residuals and keys needs "
             "nearly every factor; on a real model its ranks are what the coverage of its edits asks for.", "",
             "| shape | T | basis | ranks (r_e, r_out, r_in) | solve | factors | write | coverage | per layer-batch | "
             "/ paper's |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["basis_check"]:
        paper = r["bases"]["weights (the paper's)"]["per_layer_batch"]
        for name, row in r["bases"].items():
            m = row["median_seconds"]
            ranks_cell = " .. ".join(str(tuple(x)) for x in dict.fromkeys(map(tuple, (row["ranks"][0],
                                                                                      row["ranks"][-1]))))
            lines.append(f"| {r['shape']} | {r['T']} | {name} | {ranks_cell} | {m['solve']:.3f} | {m['factors']:.3f} | "
                         f"{m['write']:.3f} | {m['coverage']:.3f} | {row['per_layer_batch']:.3f} | "
                         f"{row['per_layer_batch'] / paper:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="*", choices=list(SHAPES), default=None, help="default: all three")
    parser.add_argument("--method", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--edits-per-batch", type=int, default=50)
    parser.add_argument("--sample-blocks", type=int, default=8, help="moeedit-bcd blocks actually timed per shape")
    parser.add_argument("--reduced", action="store_true", help="Qwen3-30B-A3B only, 200 edits")
    parser.add_argument("--growth", action="store_true", help="also the T and E growth sweeps (~5 more minutes)")
    parser.add_argument("--global-check", action="store_true",
                        help="only the Global check (see above) at --shape (default qwen3-30b-a3b), --check-batches "
                             "batches")
    parser.add_argument("--check-batches", type=int, default=10)
    parser.add_argument("--basis-check", action="store_true",
                        help="only the per-batch basis timings (weights, weights+edit, auto) at --shape (default: all "
                             "three), --check-batches batches; results/solver_speed_basis.{json,md}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(RESULTS / "solver_speed"))
    args = parser.parse_args(argv)
    if args.edits < args.edits_per_batch or args.edits_per_batch < 1:
        parser.error("--edits must be >= --edits-per-batch >= 1")
    shapes = args.shape or (["qwen3-30b-a3b"] if args.reduced else list(SHAPES))
    edits = 200 if args.reduced else args.edits
    torch.set_num_threads(args.threads)
    fixed_mmap_threshold()
    command = "python benchmarks/solver_speed.py" + (" --reduced" if args.reduced else "")
    report = run_info(command + (" --growth" if args.growth else "")) | {"shapes": {}}
    if args.basis_check:
        report["command"] = "python benchmarks/solver_speed.py --basis-check"
        report["basis_check"] = [basis_check(name, args.edits_per_batch, args.check_batches)
                                 for name in (args.shape or list(SHAPES))]
        write_results(args.out + "_basis", report, basis_markdown(report), json_default=str)
        print(basis_markdown(report))
        return
    if args.global_check:
        report["command"] = "python benchmarks/solver_speed.py --global-check"
        report["global_check"] = [global_check(name, args.edits_per_batch, args.check_batches)
                                  for name in (args.shape or ["qwen3-30b-a3b"])]
        write_results(args.out + "_global_check", report, check_markdown(report), json_default=str)
        print(check_markdown(report))
        return
    for name in shapes:
        report["shapes"][name] = bench_shape(name, SHAPES[name], edits, args.edits_per_batch, args.method,
                                             args.sample_blocks)
    if args.growth:
        report["growth"] = growth("qwen3-30b-a3b", [50, 200, 1000, 2000], [32, 64, 128, 256])
    write_results(args.out, report, markdown(report), json_default=str)
    print(markdown(report))


if __name__ == "__main__":
    main()
