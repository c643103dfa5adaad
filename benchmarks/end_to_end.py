"""End-to-end editing speed on the fact model: N CounterFact edits in sequential batches, v* included.

    python benchmarks/end_to_end.py                       # 1000 edits in batches of 50 on the qwen3_moe quality build
    python benchmarks/end_to_end.py --edits 200 --compare 50

The edits are the build's known facts, then records of the shipped CounterFact subset on subjects the model never saw
(their v* may not reach the target: such a request is warned about and left out, as in any edit). The preservation
statistics are computed first and timed apart (a one-time cost per model); then every batch runs `apply_mote_to_model`
with the MoTE YAML of the arch (v* computed at each batch on the model as it then is), and the seconds of every stage
are summed. Side by side, on the unedited model and the first `--compare` requests: v* batched (all requests of a
batch together) against v* one request at a time (`v_batch_size: 1`), the same objective: the time of each and the
relative difference of their targets z. Results: benchmarks/results/end_to_end.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from mote_plugin import MoTEEditor, MoTEHyperParams, apply_mote_to_model, last_edited, last_timings
from mote_plugin.adapters import get_adapter
from mote_plugin.experiments.results import run_info, run_line, write_results
from mote_plugin.mote.model.requests import normalise_requests
from mote_plugin.mote.model.stats import preservation_stats
from mote_plugin.testbed.data import edit_records

sys.path.insert(0, str(Path(__file__).resolve().parent))
from editing import key_value  # noqa: E402  (KEY=VALUE read as YAML)
from quality import fact_model, load_config, request  # noqa: E402  (the protocol's builds)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "end_to_end"
STAGES = ("vstar", "capture", "solve", "writeback")


def vstar_side_by_side(model, tok, requests: list[dict], hp: MoTEHyperParams, batch_size: int) -> dict:
    """v* of the same requests on the same weights, in batches and one at a time: seconds and relative z differences."""
    editor = MoTEEditor(model, tok, hp)
    reqs = normalise_requests(requests)
    editor.context_templates()  # generated once, outside both timings
    t = time.perf_counter()
    batched = torch.cat([editor.targets(reqs[i : i + batch_size], progress=False)[0]
                         for i in range(0, len(reqs), batch_size)])
    seconds_batched = time.perf_counter() - t
    t = time.perf_counter()
    single, _ = MoTEEditor(model, tok, hp.updated(v_batch_size=1)).targets(reqs, progress=False)
    seconds_single = time.perf_counter() - t
    rel = ((batched - single).norm(dim=1) / single.norm(dim=1)).double()
    return {"requests": len(reqs), "seconds_batched": seconds_batched, "seconds_one_at_a_time": seconds_single,
            "speedup": seconds_single / seconds_batched,
            "z_rel_diff": {"max": float(rel.max()), "median": float(rel.median()),
                                                                           "p90": float(rel.quantile(0.9))}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen3_moe")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--compare", type=int, default=1000,
                        help="requests of the batched vs one-at-a-time v* comparison")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "configs" / "quality.yaml"))
    parser.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the arch's testbed YAML (read as YAML)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, facts, _ = fact_model(args.arch, load_config(args.config))
    requests = [request(r) for r in edit_records(facts, max(args.edits, args.compare))]
    hp = MoTEHyperParams.from_hparams(ROOT / "hparams" / "MoTE" / f"testbed-{args.arch}")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as stats_dir:
        hp = hp.updated("--set", **dict(args.set)).updated(stats_dir=stats_dir, vstar_cache_dir=None)
        t = time.perf_counter()
        preservation_stats(model, tok, get_adapter(model), hp.layers, hp.preservation_corpus, hp.preservation_tokens,
                           hp.max_length, hp.stats_dir)
        statistics = time.perf_counter() - t
        MoTEEditor(model).record_history = False  # no edit-patch history over a thousand edits
        seconds, edited = dict.fromkeys(["statistics", "basis", *STAGES], 0.0), 0
        t0 = time.perf_counter()
        for i in range(0, args.edits, args.batch_size):
            apply_mote_to_model(model, tok, requests[i : i + args.batch_size], hp)
            timings = last_timings(model)
            edited += last_edited(model)
            seconds["basis"] += timings["statistics"]  # projectors and factors from the cached statistics
            for s in STAGES:
                seconds[s] += timings[s]
        total = time.perf_counter() - t0
        seconds["statistics"] = statistics
        model.load_state_dict(original)
        MoTEEditor(model).reset()
        side = vstar_side_by_side(model, tok, requests[: args.compare], hp, args.batch_size)
    report = run_info(shlex.join(["python", "benchmarks/end_to_end.py", *(argv if argv is not None else sys.argv[1:])]))
    report |= {"arch": args.arch, "edits": args.edits,
              "batch_size": args.batch_size, "edited": edited, "total_seconds": total, "seconds": seconds,
              "vstar": side,
              "hparams": hp.to_dict()}
    per_edit_single = side["seconds_one_at_a_time"] / side["requests"]
    estimate = total - seconds["vstar"] + per_edit_single * args.edits
    lines = ["# End-to-end editing speed on the fact model", "",
             f"{run_line(report)}.",
             f"{args.edits} CounterFact edits on the {args.arch} quality build in sequential batches of "
             f"{args.batch_size} ({edited} edited"
             + ("; the rest left out because their v* did not reach the target" if edited < args.edits else
                (", v_keep_failed: those whose v* did not reach the target too" if hp.v_keep_failed else ""))
             + f"), v* computed at each batch, testbed-{args.arch}.yaml settings.", "",
             "| stage | seconds |", "|---|---|",
             f"| preservation statistics (one-time, before the edits) | {statistics:.1f} |",
             *[f"| {name} | {seconds[key]:.1f} |" for key, name in (
                 ("basis", "projectors and Tucker factors (first batch)"), ("vstar", "v* (batched)"),
                 ("capture", "key capture"), ("solve", "solve"), ("writeback", "writeback"))],
             f"| **all {args.edits} edits** (wall, statistics excluded) | **{total:.1f}** |", "",
             f"v* side by side on the unedited model, the first {side['requests']} requests, same objective: batched "
             f"{side['seconds_batched']:.1f} s, one request at a time {side['seconds_one_at_a_time']:.1f} s "
             f"(**{side['speedup']:.1f}x**); relative difference of z: median {side['z_rel_diff']['median']:.1e}, "
             f"p90 {side['z_rel_diff']['p90']:.1e}, max {side['z_rel_diff']['max']:.1e}. With one-at-a-time v* the "
             f"{args.edits} edits would take about {estimate:.0f} s ({estimate / total:.1f}x).", ""]
    write_results(args.out, report, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
