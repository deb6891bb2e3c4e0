"""``tokens.safetensors`` on disk: written incrementally, read memory-mapped (kvmem.profile.tokens.TokenStore).

The file is a plain safetensors file (schema.TOKENS): ``ids`` [n_tokens] int32, ``doc_offsets`` [n_docs + 1]
int64 and optionally ``shard`` [3] int64. Any safetensors writer's file is read (runs written before this
module used ``safetensors.torch.save_file``: int64 tensors first, then ``ids``); this module writes

  [8-byte header length][JSON header padded with spaces to HEADER_BYTES - 8][ids][doc_offsets][shard]

so ``ids`` starts on a page boundary and can be streamed to disk while the corpus is tokenized, before its
length is known; the header is written last. ``doc_offsets`` is streamed to a side file meanwhile and
appended at the end. A reader maps ``ids`` (numpy memmap, copy-on-write: nothing is read until used) and
reads ``doc_offsets`` into memory (8 bytes per document).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import weakref
from pathlib import Path

import numpy as np
import torch

from kvmem.errors import KvmemError

HEADER_BYTES = 4096  # the data of a file written here starts at this offset (a page boundary)
_DTYPES = {"I32": np.int32, "I64": np.int64}


def read_header(path: Path) -> tuple[dict, int]:
    """({name: {"dtype", "shape", "data_offsets"}}, file offset of the data) of a safetensors file, checked
    against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise KvmemError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise KvmemError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise KvmemError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    start = 8 + n
    for name, t in header.items():
        a, b = t["data_offsets"]
        if t["dtype"] not in _DTYPES or not 0 <= a <= b <= size - start or \
                b - a != int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(_DTYPES[t["dtype"]]).itemsize:
            raise KvmemError(f"{path}: tensor {name!r} is not an int32/int64 tensor inside the file")
    return header, start


class MappedIds:
    """``ids`` of a tokens file: a copy-on-write memory map (pages are read when touched) and an open file
    descriptor for ``read`` (pread: copies a range without mapping it, so reading the whole store in
    order leaves the process's resident memory flat). The descriptor stays valid if the file is renamed
    or removed; it is closed with this object."""

    def __init__(self, path: Path, start: int, n: int):
        self.path, self.start, self.n = Path(path), int(start), int(n)
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        if n:
            self.array = np.memmap(path, dtype=np.int32, mode="c", offset=start, shape=(n,))
        else:
            self.array = np.zeros(0, dtype=np.int32)

    def tensor(self) -> torch.Tensor:
        """[n] int32 sharing the map (no copy)."""
        return torch.from_numpy(self.array)

    def read(self, a: int, b: int) -> np.ndarray:
        """ids[a:b] (local to the file's ids) copied into a fresh int32 array."""
        a, b = max(int(a), 0), min(int(b), self.n)
        if b <= a:
            return np.zeros(0, dtype=np.int32)
        data = os.pread(self.fd, 4 * (b - a), self.start + 4 * a)
        if len(data) != 4 * (b - a):
            raise KvmemError(f"{self.path}: the token file is shorter than its header says")
        return np.frombuffer(data, dtype=np.int32).copy()


def open_tokens(path: Path) -> tuple[MappedIds, np.ndarray, np.ndarray | None]:
    """(mapped ids, doc_offsets [n_docs + 1] int64 in memory, shard [3] int64 or None) of a tokens file."""
    header, start = read_header(path)
    for name in ("ids", "doc_offsets"):
        if name not in header:
            raise KvmemError(f"{path}: no {name!r} tensor")
    t = header["ids"]
    if t["dtype"] != "I32" or len(t["shape"]) != 1:
        raise KvmemError(f"{path}: 'ids' is not a 1-d int32 tensor")
    ids = MappedIds(path, start + t["data_offsets"][0], t["shape"][0])

    def small(name):
        a, b = header[name]["data_offsets"]
        data = os.pread(ids.fd, b - a, start + a)
        return np.frombuffer(data, dtype=_DTYPES[header[name]["dtype"]]).astype(np.int64)

    return ids, small("doc_offsets"), small("shard") if "shard" in header else None


class TokenWriter:
    """Write a tokens file incrementally: ``add`` documents' ids as they come, ``close`` writes the header.

    Memory: the arrays given to ``add`` only; ``doc_offsets`` go to a side file ``PATH.offsets.tmp``,
    removed by ``close`` or ``abort``. A writer is a context manager: an error aborts (removes) the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.n_tokens, self.n_docs = 0, 0
        self._side_path = self.path.with_name(self.path.name + ".offsets.tmp")
        self._f = open(self.path, "wb")
        self._f.seek(HEADER_BYTES)
        self._side = open(self._side_path, "wb")
        self._side.write(np.zeros(1, dtype=np.int64).tobytes())

    def add(self, ids: np.ndarray, doc_ends: np.ndarray) -> None:
        """Append ``ids`` (int32 [n]) and the ends of the documents they complete (int64, local to ``ids``,
        increasing, each in [1, n]; a document may continue into the next ``add``, its end given there)."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        self._f.write(memoryview(ids).cast("B"))
        ends = np.asarray(doc_ends, dtype=np.int64) + self.n_tokens
        self._side.write(np.ascontiguousarray(ends).tobytes())
        self.n_tokens += int(ids.size)
        self.n_docs += int(ends.size)

    def add_doc_ends(self, ends: np.ndarray) -> None:
        """Append document ends given as positions in the whole file's ids (increasing, at most n_tokens)."""
        ends = np.ascontiguousarray(ends, dtype=np.int64)
        self._side.write(ends.tobytes())
        self.n_docs += int(ends.size)

    def close(self, shard: tuple[int, int, int] = (0, 0, 0)) -> None:
        """Finish the file: ``doc_offsets`` after ``ids``, then ``shard`` (continues_doc, offset, doc_base)."""
        self._side.close()
        ids_bytes, off_bytes = 4 * self.n_tokens, 8 * (self.n_docs + 1)
        with open(self._side_path, "rb") as side:
            shutil.copyfileobj(side, self._f, 1 << 22)
        self._f.write(np.asarray(shard, dtype=np.int64).tobytes())
        header = {
            "doc_offsets": {"dtype": "I64", "shape": [self.n_docs + 1], "data_offsets": [ids_bytes, ids_bytes + off_bytes]},
            "ids": {"dtype": "I32", "shape": [self.n_tokens], "data_offsets": [0, ids_bytes]},
            "shard": {"dtype": "I64", "shape": [3], "data_offsets": [ids_bytes + off_bytes, ids_bytes + off_bytes + 24]},
        }
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > HEADER_BYTES - 8:
            raise KvmemError(f"{self.path}: the tokens header does not fit in {HEADER_BYTES} bytes")
        text += b" " * (HEADER_BYTES - 8 - len(text))  # safetensors allows trailing spaces in the header
        self._f.seek(0)
        self._f.write(struct.pack("<Q", len(text)) + text)
        self._f.close()
        self._side_path.unlink(missing_ok=True)

    def abort(self) -> None:
        for f in (self._f, self._side):
            f.close()
        self.path.unlink(missing_ok=True)
        self._side_path.unlink(missing_ok=True)

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()
