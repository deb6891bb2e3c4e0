"""Corpus profiling: sources, the token store, the streaming runner, run folders, merge and torchrun."""

from kvmem.profile.run import Run, open_run
from kvmem.profile.runner import ProfileConfig


def profile(cfg: ProfileConfig, out, **kwargs):
    """Profile a model over a corpus into the run folder ``out`` (see kvmem.profile.job.profile)."""
    from kvmem.profile.job import profile as _profile

    return _profile(cfg, out, **kwargs)


def merge(paths, out, **kwargs):
    """Merge runs over disjoint token streams into one (see kvmem.profile.job.merge)."""
    from kvmem.profile.job import merge as _merge

    return _merge(paths, out, **kwargs)


__all__ = ["ProfileConfig", "Run", "merge", "open_run", "profile"]


from kvmem.callable_module import make_callable  # noqa: E402

make_callable(__name__)  # kvmem.profile(cfg, out) calls profile(); kvmem.profile stays the package
