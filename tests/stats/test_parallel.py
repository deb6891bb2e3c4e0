"""kvmem.stats.parallel: every task runs exactly once, on torch's OpenMP team or on a thread pool."""

import threading

import pytest
import torch

from kvmem import tuning
from kvmem.stats import parallel


@pytest.mark.parametrize("use_omp", [True, False])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_every_task_runs_once_in_order(use_omp, n):
    calls = []

    def task(i):
        calls.append(i)
        return torch.arange(1000).sum().item() + i  # torch inside a task (serial in an OpenMP region)

    out = parallel.run_parallel([lambda i=i: task(i) for i in range(n)], use_omp=use_omp)
    assert out == [499500 + i for i in range(n)]
    assert sorted(calls) == list(range(n))


def test_torch_openmp_team_is_used_while_the_tuning_is_on():
    """On this CPU build torch runs on libgomp: with the profiler's tuning on, the tasks run on two
    threads of its team; with it off, on the pool."""
    assert "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    try:
        assert tuning.apply(True)["omp_team"] is True and tuning.omp_team() is not None
        threads = []
        parallel.run_parallel([lambda: threads.append(threading.get_ident())] * 2)
        assert len(threads) == 2
        assert len(set(threads)) == (2 if torch.get_num_threads() > 1 else 1)
    finally:
        tuning.apply(False)
    assert tuning.omp_team() is None


@pytest.mark.parametrize("use_omp", [True, False])
def test_errors_reach_the_caller(use_omp):
    def bad():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        parallel.run_parallel([lambda: 1, bad], use_omp=use_omp)
