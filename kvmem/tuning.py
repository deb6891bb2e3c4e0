"""Process-wide CPU tuning for the profiling pass, in one place, applied by the profiler only.

Two settings make ``kvmem profile`` about a fifth faster on a small CPU (measured on 2 cores, see the
README's benchmarks); both change the whole process, so nothing applies them on import or outside
``Profiler.run``:

- **torch's own OpenMP team for the statistics kernel** (``omp_team``). torch's idle OpenMP workers
  keep spinning for a while after each op (libgomp's default wait policy), so a thread pool of ours
  started right after a forward pass shares the cores with them and gains nothing. With the tuning on,
  ``kvmem.stats.parallel.run_parallel`` starts its tasks as one OpenMP parallel region of torch's own
  libgomp (``GOMP_parallel`` through ctypes, found in ``/proc/self/maps``: Linux, torch built with
  OpenMP); the spinning workers pick them up at once. Otherwise a ThreadPoolExecutor runs them. The
  results are the same either way.
- **glibc's allocator told to keep large buffers** (``tune_allocator``). The capture hooks keep gate,
  up and m of a layer alive until its statistics are updated; with glibc's dynamic thresholds that
  peak makes every layer's activations come from fresh mmap'ed memory, and a 2-core CPU spends about a
  tenth of the forward pass in page faults (1.6M minor faults per 16k SmolLM2 tokens, measured). A
  fixed 32 MiB mmap threshold and a 1 GiB trim threshold remove them; freed large buffers then stay
  with the process until it exits. glibc's settings cannot be undone, so this one is once per process.

**The switch**: ``KVMEM_CPU_TUNING=0`` in the environment (or ``ProfileConfig(cpu_tuning=False)``)
turns both off; ``apply(False)`` turns the OpenMP team off again for the rest of the process.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

ENV = "KVMEM_CPU_TUNING"
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_gomp = None  # torch's libgomp (ctypes); False when not available
_omp_on = False
_allocator_tuned = False


def enabled(requested: bool = True) -> bool:
    """Whether the tuning may be applied: requested, and not switched off by ``KVMEM_CPU_TUNING=0``."""
    return requested and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def apply(requested: bool = True) -> dict:
    """Called by the profiler before a CPU pass: turn the tuning on (or off), as far as this machine
    allows. Returns what is in effect: {"omp_team": bool, "allocator": bool}."""
    global _omp_on
    on = enabled(requested)
    _omp_on = on and _torch_gomp() is not None
    if on:
        tune_allocator()
    return {"omp_team": _omp_on, "allocator": _allocator_tuned}


def omp_team():
    """torch's libgomp when the OpenMP team is switched on, else None (run_parallel uses threads)."""
    return _gomp if _omp_on and _gomp else None


def _torch_gomp():
    """torch's libgomp loaded through ctypes, or None (another OpenMP runtime, no /proc, ...)."""
    global _gomp
    if _gomp is None:
        _gomp = False
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
                    _gomp = lib
        except (OSError, AttributeError):
            _gomp = False
    return _gomp or None


def tune_allocator() -> bool:
    """glibc: serve large CPU buffers from the heap and keep freed ones (process-wide, once; see the
    module docstring). Returns whether it is in effect."""
    global _allocator_tuned
    if _allocator_tuned or not sys.platform.startswith("linux"):
        return _allocator_tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _allocator_tuned = (bool(libc.mallopt(m_mmap_threshold, 32 << 20))
                            and bool(libc.mallopt(m_trim_threshold, 1 << 30)))
    except (OSError, AttributeError):
        _allocator_tuned = False
    return _allocator_tuned


def state() -> dict:
    """What is in effect now, without changing anything."""
    return {"omp_team": omp_team() is not None, "allocator": _allocator_tuned}
