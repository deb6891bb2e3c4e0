"""kvmem.stats.parallel: every task runs exactly once, on torch's OpenMP team or on a thread pool."""

import threading

import pytest
import torch

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


def test_torch_openmp_team_is_used_where_torch_runs_on_libgomp():
    """On this CPU build torch runs on libgomp: the tasks run on two different threads of its team."""
    assert "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert parallel._torch_gomp() is not None
    threads = []
    parallel.run_parallel([lambda: threads.append(threading.get_ident())] * 2)
    assert len(threads) == 2
    assert len(set(threads)) == (2 if torch.get_num_threads() > 1 else 1)


@pytest.mark.parametrize("use_omp", [True, False])
def test_errors_reach_the_caller(use_omp):
    def bad():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        parallel.run_parallel([lambda: 1, bad], use_omp=use_omp)
