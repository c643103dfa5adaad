"""The one-time basis at the real MoE layer shapes: null-space projectors and whitened HOSVD, this code against a
baseline commit's, on realistically conditioned statistics (seconds, peak memory, and how far the results are apart).

    python benchmarks/one_time.py --baseline bd9e197                 # the three shapes (~15 min, 2 CPU cores)
    python benchmarks/one_time.py --baseline bd9e197 --shape gpt-oss-20b --experts 2 --repeats 1

Projectors: `--experts` experts of each shape (their cost is per expert; the table scales it to all E), key moments
of keys drawn from a power-law spectrum (eigenvalues over ~5 decades, a random rotation per expert) with token counts
from a skewed routing of the shipped configs' 50,000 preservation tokens, including a rarely routed expert (fewer
tokens than h: a rank-deficient moment). Each rule of the shipped configs (absolute 2e-2) and the default (relative
1e-2). Accuracy: ||P - P_baseline||_2 per expert, next to the relative eigenvalue gap at the cut (a gap below float64
rounding leaves the projector undetermined there, in any implementation), and the share of preserved-key energy passed.
Also the rejected alternative, float32 eigen-decompositions, against the same reference.

HOSVD: the whole layer (random bf16 weights as in solver_speed.py, "in" whitening with the pooled moment, the shipped
ranks); accuracy: ||U U^T - U_baseline U_baseline^T||_2 per mode.

Timings: the baseline and this code alternate in one process (`--repeats` rounds, the minimum taken); peak memory is the
resident set above the level before each call (solver_speed.PeakRSS). Results: benchmarks/results/one_time.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mote_plugin.experiments.results import run_info, run_line, write_results  # noqa: E402
from mote_plugin.mote.algebra import nullspace, tucker  # noqa: E402
from solver_speed import PeakRSS, fixed_mmap_threshold  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# (E, d, h, top-k, ranks) of the real shapes; ranks as hparams/MoTE/*.yaml
SHAPES = {
    "qwen3-30b-a3b": (128, 2048, 768, 8, (16, 256, 128)),
    "gpt-oss-20b": (32, 2880, 2880, 4, (8, 256, 256)),
    "qwen3.6-35b-a3b": (256, 2048, 512, 8, (32, 256, 128)),
}
TOKENS = 50_000  # preservation_tokens of the shipped configs
RULES = (("absolute", 2e-2), ("relative", 1e-2))


def load_baseline(commit: str, workdir: Path) -> dict:
    """nullspace.py and tucker.py as of `commit`, imported under other names (they import only torch)."""
    modules = {}
    for name in ("nullspace", "tucker"):
        path = workdir / f"baseline_{name}.py"
        path.write_text(subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:mote_plugin/mote/{name}.py"],
                                       check=True, capture_output=True, text=True).stdout)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def expert_counts(E: int, k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Tokens routed to the first n of E experts: a lognormal load over all E (sum TOKENS * k), the last of the n
    rarely routed (h / 4 tokens at most)."""
    load = torch.exp(torch.randn(E, generator=gen, dtype=torch.float64))
    counts = (load / load.sum() * TOKENS * k).round().long()[:n]
    return counts


def realistic_moments(h: int, counts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """E[k k^T] of counts[j] keys k = Q_j diag(sigma_j) z, z ~ N(0, I): sigma_j^2 ~ i^-alpha_j (alpha_j in [1, 2],
    largest 1), Q_j a random rotation. [n, h, h] float32 (as the statistics are stored)."""
    moments = torch.empty(len(counts), h, h)
    for j, n in enumerate(counts.tolist()):
        alpha = 1.0 + float(torch.rand(1, generator=gen))
        sigma = torch.arange(1, h + 1, dtype=torch.float32) ** (-alpha / 2)  # [h]
        Q = torch.linalg.qr(torch.randn(h, h, generator=gen))[0]  # [h, h]
        keys = (torch.randn(n, h, generator=gen) * sigma) @ Q.T  # [n, h]
        moments[j] = keys.T @ keys / n
    return 0.5 * (moments + moments.transpose(1, 2))


def cut_gaps(moments: torch.Tensor, rule: str, threshold: float) -> tuple[list[float], list[int]]:
    """Relative eigenvalue gap at each expert's cut (lambda_removed_min - lambda_kept_max) / lambda_max, and the
    number of removed directions."""
    gaps, removed = [], []
    for C in moments.double():
        evals = torch.linalg.eigvalsh(C).clamp_min(0.0)
        k = nullspace.kept_directions(evals, rule, threshold)
        removed.append(len(evals) - k)
        gaps.append(float((evals[k] - evals[k - 1]) / evals[-1]) if 0 < k < len(evals) else float("inf"))
    return gaps, removed


def float32_projectors(moments: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    """The rejected alternative: the same rule on a float32 eigen-decomposition. [n, h, h] float64."""
    out = []
    for C in moments:
        evals, evecs = torch.linalg.eigh(C)  # float32
        k = nullspace.kept_directions(evals.double().clamp_min(0.0), rule, threshold)
        V = evecs[:, :k].double()
        out.append(V @ V.T)
    return torch.stack(out)


def op_norms(A: torch.Tensor) -> list[float]:
    """||A_j||_2 of symmetric [n, h, h] matrices."""
    return [float(torch.linalg.eigvalsh(a.double()).abs().max()) for a in A]


def timed_pair(new_fn, base_fn, repeats: int) -> dict:
    """Alternate baseline and new calls `repeats` times; minimum seconds and peak memory of each."""
    out, runs, peaks = {}, {"baseline": [], "new": []}, {}
    for _ in range(repeats):
        for name, fn in (("baseline", base_fn), ("new", new_fn)):
            with PeakRSS() as peak:
                t = time.perf_counter()
                result = fn()
                runs[name].append(time.perf_counter() - t)
            peaks[name] = max(peaks.get(name, 0), peak.peak)
            out[name] = result
            del result
    return {"results": out, "seconds": {k: min(v) for k, v in runs.items()}, "all_seconds": runs, "peak_bytes": peaks}


def bench_shape(name: str, base: dict, n_experts: int, repeats: int, log=print) -> dict:
    E, d, h, k, ranks = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    counts = expert_counts(E, k, n_experts, gen)
    counts[-1] = min(int(counts[-1]), h // 4)  # a rarely routed expert: a rank-deficient moment
    log(f"[{name}] moments of {n_experts} experts, tokens {counts.tolist()}")
    moments = realistic_moments(h, counts, gen)
    row = {"E": E, "d": d, "h": h, "k": k, "ranks": ranks, "experts_timed": n_experts, "tokens": counts.tolist(),
           "projectors": {}}
    for rule, threshold in RULES:
        # `moments` bound now: it is deleted below, after the calls
        new = lambda m=moments: nullspace.nullspace_projectors(m, counts, rule=rule, threshold=threshold)
        old = lambda m=moments: base["nullspace"].nullspace_projectors(m, counts, rule=rule, threshold=threshold)
        pair = timed_pair(new, old, repeats)
        results = pair.pop("results")
        P_new, P_base = results["new"], results["baseline"]
        gaps, removed = cut_gaps(moments, rule, threshold)
        P32 = float32_projectors(moments, rule, threshold)
        energy = nullspace.preserved_energy(P_new, moments).double()
        energy_base = nullspace.preserved_energy(P_base, moments).double()
        energy32 = nullspace.preserved_energy(P32.float(), moments).double()
        row["projectors"][f"{rule} {threshold:g}"] = pair | {
            "removed": removed, "cut_gap": gaps,
            "diff_op_norm": op_norms(P_new.double() - P_base.double()),
            "float32_diff_op_norm": op_norms(P32 - P_base.double()),
            "energy_passed": energy.tolist(), "energy_diff": (energy - energy_base).abs().tolist(),
            "float32_energy_diff": (energy32 - energy_base).abs().tolist()}
        del results, P_new, P_base, P32
        r = row["projectors"][f"{rule} {threshold:g}"]
        log(f"[{name}] projectors {rule} {threshold:g}: baseline {r['seconds']['baseline']:.2f} s, new "
            f"{r['seconds']['new']:.2f} s for {n_experts} experts; max ||dP||_2 {max(r['diff_op_norm']):.1e} (float32: "
            f"{max(r['float32_diff_op_norm']):.1e})")

    cov_in = (moments.double() * counts[:, None, None]).sum(0).float() / counts.sum()  # [h, h] pooled
    del moments
    W = (torch.randn(E, d, h, generator=gen) * 0.02).to(torch.bfloat16)  # [E, d, h] a layer's weights
    pair = timed_pair(lambda: tucker.tucker_factors(W, ranks, whitening="in", cov_in=cov_in, eps=1e-5),
                      lambda: base["tucker"].tucker_factors(W, ranks, whitening="in", cov_in=cov_in, eps=1e-5), repeats)
    results = pair.pop("results")
    dist = {mode: float(torch.linalg.matrix_norm(a.double() @ a.double().T - b.double() @ b.double().T, ord=2))
            for mode, a, b in zip(("e", "out", "in"), results["new"], results["baseline"])}
    row["hosvd"] = pair | {"subspace_diff": dist}
    log(f"[{name}] HOSVD: baseline {pair['seconds']['baseline']:.2f} s, new {pair['seconds']['new']:.2f} s; "
        f"subspace differences {dist}")
    return row


def markdown(report: dict) -> str:
    lines = ["# One-time basis at real MoE layer shapes: null-space projectors and whitened HOSVD", "",
             f"{run_line(report)}; baseline = commit {report['baseline']}. Minimum of {report['repeats']} "
             "alternating runs; peak = extra resident memory of the call. Projectors timed on a few experts of each "
             "shape (per-expert cost) and scaled to all E in the 'per layer' columns.", ""]
    lines += ["## Projectors", "",
              "| shape | rule | experts timed | baseline (s) | new (s) | new / baseline | per layer: baseline -> new "
              "(s) | peak MiB: baseline -> new | removed directions | min cut gap | max ||P - P_base||_2 | float32 "
              "eigh: max ||P - P_base||_2 | max energy diff (float32) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["shapes"].items():
        for rule, p in r["projectors"].items():
            s, scale = p["seconds"], r["E"] / r["experts_timed"]
            lines.append(
                f"| {name} | {rule} | {r['experts_timed']} | {s['baseline']:.2f} | {s['new']:.2f} | "
                f"{s['new'] / s['baseline']:.2f} | {s['baseline'] * scale:.1f} -> {s['new'] * scale:.1f} | "
                f"{p['peak_bytes']['baseline'] / 2**20:.0f} -> {p['peak_bytes']['new'] / 2**20:.0f} | "
                f"{min(p['removed'])}-{max(p['removed'])} | {min(p['cut_gap']):.1e} | {max(p['diff_op_norm']):.1e} | "
                f"{max(p['float32_diff_op_norm']):.1e} | {max(p['energy_diff']):.1e} "
                f"({max(p['float32_energy_diff']):.1e}) |")
    lines += ["", "## Whitened HOSVD (one layer, whitening \"in\")", "",
              "| shape | ranks | baseline (s) | new (s) | new / baseline | peak MiB: baseline -> new | ||U U^T - "
              "U_base U_base^T||_2 (e, out, in) |",
              "|---|---|---|---|---|---|---|"]
    for name, r in report["shapes"].items():
        hs = r["hosvd"]
        s = hs["seconds"]
        lines.append(f"| {name} | {tuple(r['ranks'])} | {s['baseline']:.2f} | {s['new']:.2f} | "
                     f"{s['new'] / s['baseline']:.2f} | {hs['peak_bytes']['baseline'] / 2**20:.0f} -> "
                     f"{hs['peak_bytes']['new'] / 2**20:.0f} | "
                     + ", ".join(f"{v:.1e}" for v in hs["subspace_diff"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git commit whose nullspace.py / tucker.py are the baseline")
    parser.add_argument("--shape", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--experts", type=int, default=8,
                        help="experts whose projectors are timed, per shape (8: one chunk of the baseline)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(RESULTS / "one_time"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixed_mmap_threshold()
    with tempfile.TemporaryDirectory() as tmp:
        base = load_baseline(args.baseline, Path(tmp))
    command = "python benchmarks/one_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run_info(command.strip()) | {"baseline": args.baseline, "repeats": args.repeats, "shapes": {}}
    for name in args.shape:
        report["shapes"][name] = bench_shape(name, base, args.experts, args.repeats)
    write_results(args.out, report, markdown(report), json_default=str)
    print(markdown(report))


if __name__ == "__main__":
    main()
