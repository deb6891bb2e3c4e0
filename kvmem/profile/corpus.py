"""Corpus sources: where documents come from, before tokenization.

SOURCE is one of
  pydoc                   the reference-manual text in the standard library's ``pydoc_data.topics``
                          (about 465 KB of English prose, one document per topic; the default)
  FILE.txt                one document per blank-line-separated block
  FOLDER                  every ``*.txt`` file below it, one document per file (sorted by path)
  FILE.jsonl              one JSON object per line, text in ``text_field`` (default ``text``)
  FILE.parquet            a table with a ``text_field`` column
  hf:NAME[:CONFIG[:SPLIT]] a Hugging Face dataset, only when online
Bytes that are not valid UTF-8 are decoded with replacement characters and counted (per document).
Every source is streamed: files are read a line or a row group at a time (a folder's files one by
one), ``hf:`` datasets with ``streaming=True``, so memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kvmem.errors import KvmemError

DEFAULT_CORPUS = "pydoc"


@dataclass
class Corpus:
    source: str
    text_field: str = "text"
    invalid_utf8: int = field(default=0, init=False)  # documents that needed replacement characters

    def describe(self) -> str:
        return "pydoc_data.topics (Python reference manual)" if self.source == "pydoc" else self.source

    def documents(self) -> Iterator[str]:
        """Yield non-empty documents in a fixed order."""
        count = 0
        for doc in self._raw():
            if doc.strip():
                count += 1
                yield doc
        if count == 0:
            raise KvmemError(f"corpus {self.source!r} holds no text")

    def _raw(self) -> Iterator[str]:
        src = self.source
        if src == "pydoc":
            from pydoc_data.topics import topics

            yield from (topics[key] for key in sorted(topics))
            return
        if src.startswith("hf:"):
            yield from self._hub(src[3:])
            return
        path = Path(src).expanduser()
        if not path.exists():
            raise KvmemError(f"corpus {src!r}: no such file or directory")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise KvmemError(f"corpus folder {src!r} holds no .txt files")
            for p in files:
                yield self._decode(_read(p))
        elif path.suffix == ".txt":
            yield from self._blocks(path)
        elif path.suffix == ".jsonl":
            yield from self._jsonl(path)
        elif path.suffix == ".parquet":
            yield from self._parquet(path)
        else:
            raise KvmemError(f"corpus {src!r}: unknown format (use .txt, a folder of .txt, .jsonl, .parquet, "
                             "pydoc or hf:NAME)")

    def _blocks(self, path: Path) -> Iterator[str]:
        """The file's blocks as ``re.split(r"\n\s*\n", text)`` gives them, read line by line (memory: one
        block): a line of only whitespace after the first line and before the last one (the text after the
        last newline) separates blocks, a run of them once."""
        block: list[bytes] = []
        gap = False  # separator lines seen since the block's last line

        def line(body: bytes, last: bool):
            nonlocal block, gap
            if block and not last and not body.decode("utf-8", "replace").strip():
                gap = True
                return None
            if gap:
                done, block, gap = block, [body], False
                return self._decode(b"\n".join(done))
            block.append(body)
            return None

        tail = b""
        with _open(path) as f:
            for raw in f:  # binary lines end at b"\n" only, as the pattern's \n
                if raw.endswith(b"\n"):
                    if (doc := line(raw[:-1], False)) is not None:
                        yield doc
                else:
                    tail = raw
        if (doc := line(tail, True)) is not None:
            yield doc
        yield self._decode(b"\n".join(block))

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.invalid_utf8 += 1
            return data.decode("utf-8", errors="replace")

    def _jsonl(self, path: Path) -> Iterator[str]:
        n = 0
        with _open(path) as f:
            for raw in f:
                for line in raw.splitlines():  # bytes.splitlines: also a lone \r ends a line, as before
                    n += 1
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(self._decode(line))
                    except json.JSONDecodeError as e:
                        raise KvmemError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or self.text_field not in obj:
                        raise KvmemError(f"{path}:{n}: no {self.text_field!r} field (set --text-field)")
                    yield str(obj[self.text_field])

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
            if self.text_field not in table.schema_arrow.names:
                raise KvmemError(f"{path}: cannot read column {self.text_field!r}: no such column (set --text-field)")
            batches = table.iter_batches(batch_size=1024, columns=[self.text_field])
            for batch in batches:
                for value in batch.column(0).to_pylist():
                    if value is not None:
                        yield value if isinstance(value, str) else self._decode(value)
        except Exception as e:  # pyarrow raises several kinds for a missing column or a bad file
            if isinstance(e, KvmemError):
                raise
            raise KvmemError(f"{path}: cannot read column {self.text_field!r}: {str(e).splitlines()[0]}") from None

    def _hub(self, spec: str) -> Iterator[str]:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
                os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise KvmemError(f"corpus hf:{spec} needs the network, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
        name, config, split = (spec.split(":") + [None, None])[:3]
        try:
            import datasets

            ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
            for n, row in enumerate(ds, 1):  # streamed: rows arrive as they are read, nothing is downloaded first
                if self.text_field not in row:
                    raise KvmemError(f"corpus hf:{spec}: row {n} has no {self.text_field!r} field (set --text-field)")
                yield str(row[self.text_field])
        except KvmemError:
            raise
        except Exception as e:  # network or dataset errors: one line for the user
            raise KvmemError(f"corpus hf:{spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise KvmemError(f"cannot read corpus file {path}: {e.strerror}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KvmemError(f"cannot read corpus file {path}: {e.strerror}") from None
