"""eig.run_side_by_side: independent tasks on worker threads, one intra-op thread each, thread count restored."""

import threading

import pytest
import torch

from mote_plugin.mote.algebra.eig import run_side_by_side


def test_results_in_order_single_threaded_workers_and_restored_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def task(i):
            seen.append((threading.get_ident(), torch.get_num_threads()))
            A = torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            return i, torch.linalg.eigvalsh(A + A.T)

        out = run_side_by_side([lambda i=i: task(i) for i in range(6)])
        assert [i for i, _ in out] == list(range(6))
        assert all(threads == 1 for _, threads in seen)
        assert torch.get_num_threads() == 2
        assert run_side_by_side([]) == []
    finally:
        torch.set_num_threads(before)


def test_a_failing_task_raises_and_restores_the_thread_count():
    before = torch.get_num_threads()

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_side_by_side([boom, lambda: 1])
    assert torch.get_num_threads() == before
