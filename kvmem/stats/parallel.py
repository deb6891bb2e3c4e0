"""Run a few GIL-releasing CPU tasks at once: on torch's own OpenMP team while the profiler's CPU tuning
is on (kvmem.tuning explains why), on a ThreadPoolExecutor otherwise. Results are the same either way;
only the threads differ.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from kvmem import tuning

_pool: ThreadPoolExecutor | None = None


def run_parallel(tasks: list, use_omp: bool = True) -> list:
    """Call each of tasks (callables that release the GIL) at once; returns their results in order."""
    global _pool
    if len(tasks) < 2:
        return [t() for t in tasks]
    omp = tuning.omp_team() if use_omp else None
    if omp is not None:
        results: list = [None] * len(tasks)
        errors: list = []

        def body(_):  # on every thread of the team; a smaller team than asked for still runs all
            try:
                for i in range(omp.omp_get_thread_num(), len(tasks), omp.omp_get_num_threads()):
                    results[i] = tasks[i]()
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                errors.append(e)

        omp.GOMP_parallel(tuning._CALLBACK(body), None, len(tasks), 0)
        if errors:
            raise errors[0]
        return results
    if _pool is None or _pool._max_workers < len(tasks) - 1:
        _pool = ThreadPoolExecutor(max_workers=len(tasks) - 1, thread_name_prefix="kvmem-stats")
    futures = [_pool.submit(t) for t in tasks[1:]]
    first = tasks[0]()
    return [first] + [f.result() for f in futures]
