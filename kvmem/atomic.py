"""Atomic writes for every file and folder kvmem makes: a kill or an error never leaves half a result.

Files: ``write_file(path, write)`` calls ``write(tmp)`` on a temporary name in the same folder and
renames it onto ``path`` (``write_json``, ``write_text``, ``write_parquet`` are the usual cases).

Folders: a folder result (a run, a report, an analysis, a cache entry) is built in its **staging
sibling** ``NAME.partial`` beside ``NAME`` and moved into place only when complete:

    with staged(target, "report") as tmp:   # tmp = NAME.partial beside target
        ... write into tmp ...
    # on success: target is the new folder (an old one is swapped out and deleted only now)

- The staging folder carries a marker file (``.kvmem-partial``, JSON: kind, target) written first, so
  kvmem recognises its own unfinished output and a re-run replaces it. A profile keeps its staging
  folder across a kill to continue it (``open_staging`` + ``publish``, without ``staged``). A
  ``NAME.partial`` without the marker is not kvmem's and is refused, untouched.
- ``target`` itself only ever holds a complete result: the new folder is swapped in with one
  ``renameat2(RENAME_EXCHANGE)`` on Linux (two renames elsewhere), and the old one is deleted after.
- ``check_target`` is the one place that decides whether an existing ``target`` may be replaced, by
  what the folder holds (kvmem's own finished result, or anything else) and ``--force``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from kvmem.errors import KvmemError

MARKER = ".kvmem-partial"
SUFFIX = ".partial"
_UMASK = os.umask(0)
os.umask(_UMASK)


# --- files ------------------------------------------------------------------------------------
def write_file(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename the result onto ``path`` (same folder, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj, **kw) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, **kw) + "\n")


def write_parquet(path: Path, df) -> None:
    write_file(path, lambda p: df.to_parquet(p, index=False))


# --- folders ----------------------------------------------------------------------------------
def staging_of(target: Path) -> Path:
    """The staging sibling of a folder result: ``runs/NAME`` -> ``runs/NAME.partial``."""
    target = Path(target)
    return target.with_name(target.name + SUFFIX)


def is_own_partial(path: Path, kind: str | None = None) -> bool:
    """Whether ``path`` is an unfinished folder of kvmem's (of ``kind``, if given)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    if kind is None:
        return True
    try:
        return json.loads(marker.read_text()).get("kind") == kind
    except (OSError, ValueError):
        return False


def open_staging(target: Path, kind: str, *, fresh: bool) -> Path:
    """The staging folder of ``target``, made (with its marker) if missing; emptied first when ``fresh``.
    Refuses a sibling of that name that kvmem did not make."""
    tmp = staging_of(target)
    if tmp.exists() and not is_own_partial(tmp):
        raise KvmemError(f"{tmp} exists and was not made by kvmem; move it away (kvmem builds {target} there)")
    if tmp.exists() and fresh:
        shutil.rmtree(tmp)
    if not tmp.exists():
        tmp.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{tmp.name}."))
        (scratch / MARKER).write_text(json.dumps({"kind": kind, "target": target.name}) + "\n")
        os.chmod(scratch, 0o777 & ~_UMASK)
        os.replace(scratch, tmp)  # the staging folder appears with its marker in it
    return tmp


def publish(tmp: Path, target: Path) -> None:
    """Move the finished staging folder ``tmp`` onto ``target``; an old ``target`` goes only after."""
    (tmp / MARKER).unlink(missing_ok=True)
    if not target.exists():
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path) -> None:
    if is_own_partial(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged(target: Path, kind: str):
    """Build a folder result in a fresh staging sibling; publish it on success, discard it on error."""
    target = Path(target)
    tmp = open_staging(target, kind, fresh=True)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, target)


def check_target(target: Path, finished, *, force: bool) -> None:
    """Refuse to replace ``target`` unless it is absent, or ``finished(target)`` says it holds kvmem's
    own finished result (which a re-run replaces), or ``force``. ``finished`` is None when
    a finished result of this kind must not be replaced without ``force`` either (profile runs)."""
    target = Path(target)
    if not target.exists() or force:
        return
    if not target.is_dir():
        raise KvmemError(f"{target} exists and is not a folder")
    if not any(target.iterdir()):
        return
    own = finished is not None and finished(target)
    if not own:
        raise KvmemError(f"{target} already holds {_describe(target)}; choose another --out or pass "
                         f"--force to replace it")


def _describe(target: Path) -> str:
    if (target / "manifest.json").is_file():
        return "a kvmem run"
    if (target / "checkpoint").is_dir():
        return "an unfinished run of an older kvmem"
    return "other files"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
