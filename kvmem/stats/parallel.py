"""Run a few GIL-releasing CPU tasks at once, on torch's own OpenMP threads when it has them.

torch's CPU ops run on an OpenMP team whose idle workers keep spinning for a while after each op
(libgomp's default wait policy). Work started on threads of our own right after a forward pass
therefore shares the cores with those spinning workers, and on a small CPU gains nothing from its
extra threads (measured on 2 cores: the fused statistics kernel took as long on two threads of a
ThreadPoolExecutor as on one). So when torch runs on libgomp, ``run_parallel`` starts the tasks as one
OpenMP parallel region of torch's own runtime (``GOMP_parallel`` through ctypes): the spinning
workers pick them up at once. Anywhere else (another OpenMP runtime, no /proc, a failure to load it)
a ThreadPoolExecutor runs them. Results are the same either way; only the threads differ.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None
_omp = None  # torch's libgomp (ctypes), False when not available
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _torch_gomp():
    """torch's libgomp loaded through ctypes, or None."""
    global _omp
    if _omp is None:
        _omp = False
        try:
            if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
                with open("/proc/self/maps") as f:
                    libs = {line.split()[-1] for line in f if "libgomp" in line}
                mine = [p for p in libs if "torch" in p] or (list(libs) if len(libs) == 1 else [])
                if mine:
                    lib = ctypes.CDLL(mine[0])
                    lib.omp_get_thread_num.restype = ctypes.c_int
                    lib.omp_get_num_threads.restype = ctypes.c_int
                    lib.GOMP_parallel.argtypes = [_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    lib.GOMP_parallel.restype = None
                    _omp = lib
        except (OSError, AttributeError):
            _omp = False
    return _omp or None


def run_parallel(tasks: list, use_omp: bool = True) -> list:
    """Call each of tasks (callables that release the GIL) at once; returns their results in order."""
    global _pool
    if len(tasks) < 2:
        return [t() for t in tasks]
    omp = _torch_gomp() if use_omp else None
    if omp is not None:
        results: list = [None] * len(tasks)
        errors: list = []

        def body(_):  # on every thread of the team; a smaller team than asked for still runs all
            try:
                for i in range(omp.omp_get_thread_num(), len(tasks), omp.omp_get_num_threads()):
                    results[i] = tasks[i]()
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                errors.append(e)

        omp.GOMP_parallel(_CALLBACK(body), None, len(tasks), 0)
        if errors:
            raise errors[0]
        return results
    if _pool is None or _pool._max_workers < len(tasks) - 1:
        _pool = ThreadPoolExecutor(max_workers=len(tasks) - 1, thread_name_prefix="kvmem-stats")
    futures = [_pool.submit(t) for t in tasks[1:]]
    first = tasks[0]()
    return [first] + [f.result() for f in futures]
