"""Independent eigen-decompositions of the one-time basis (null-space projectors, Tucker factors), run side by side.

LAPACK's symmetric eigen-solvers scale poorly over threads: the tridiagonalisation is level-2 BLAS with a
synchronisation per column, so a multi-threaded `torch.linalg.eigh` of an h x h matrix waits at thousands of barriers,
and when the cores are shared with other work (a descheduled thread holds up every barrier) it runs several times
slower than on one thread (measured: `benchmarks/one_time.py`). The basis needs many independent decompositions (one
per expert, one per Tucker mode), so on the CPU they run one per thread, each single-threaded, on as many worker
threads as torch's intra-op threads. Elsewhere (GPU) they run one after the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

R = TypeVar("R")


def run_side_by_side(tasks: Sequence[Callable[[], R]], device: torch.device | str = "cpu") -> list[R]:
    """[task() for task in tasks], on the CPU spread over `torch.get_num_threads()` worker threads with one intra-op
    thread each (torch's thread count is set to 1 for the duration and restored after; LAPACK calls release the GIL).

    Tasks must be independent (e.g. each writes its own slice of a preallocated output). Results in task order.
    """
    if torch.device(device).type != "cpu":
        return [task() for task in tasks]
    threads = torch.get_num_threads()

    def single_threaded(task: Callable[[], R]) -> R:
        torch.set_num_threads(1)  # this worker's OpenMP threads (the MKL setting is process-wide)
        return task()

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, min(threads, len(tasks)))) as pool:
            return list(pool.map(single_threaded, tasks))
    finally:
        torch.set_num_threads(threads)
