"""Corpus sources: where documents come from, before tokenization.

SOURCE is one of
  pydoc                   the reference-manual text in the standard library's ``pydoc_data.topics``
                          (about 465 KB of English prose, one document per topic; the default)
  FILE.txt                one document per blank-line-separated block
  FOLDER                  every ``*.txt`` file below it, one document per file (sorted by path)
  FILE.jsonl              one JSON object per line, text in ``text_field`` (default ``text``)
  FILE.parquet            a table with a ``text_field`` column
  hf:NAME[:CONFIG[:SPLIT]] a Hugging Face dataset, only when online
Bytes that are not valid UTF-8 are decoded with replacement characters and counted.
"""

from __future__ import annotations

import json
import os
import re
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
            yield from re.split(r"\n\s*\n", self._decode(_read(path)))
        elif path.suffix == ".jsonl":
            yield from self._jsonl(path)
        elif path.suffix == ".parquet":
            yield from self._parquet(path)
        else:
            raise KvmemError(f"corpus {src!r}: unknown format (use .txt, a folder of .txt, .jsonl, .parquet, "
                             "pydoc or hf:NAME)")

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.invalid_utf8 += 1
            return data.decode("utf-8", errors="replace")

    def _jsonl(self, path: Path) -> Iterator[str]:
        for n, line in enumerate(_read(path).splitlines(), 1):
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
            table = pq.read_table(path, columns=[self.text_field])
        except Exception as e:  # pyarrow raises several kinds for a missing column or a bad file
            raise KvmemError(f"{path}: cannot read column {self.text_field!r}: {str(e).splitlines()[0]}") from None
        for value in table.column(0).to_pylist():
            if value is not None:
                yield value if isinstance(value, str) else self._decode(value)

    def _hub(self, spec: str) -> Iterator[str]:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
                os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise KvmemError(f"corpus hf:{spec} needs the network, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
        name, config, split = (spec.split(":") + [None, None])[:3]
        try:
            import datasets

            ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
            for row in ds:
                yield str(row[self.text_field])
        except KvmemError:
            raise
        except Exception as e:  # network or dataset errors: one line for the user
            raise KvmemError(f"corpus hf:{spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KvmemError(f"cannot read corpus file {path}: {e.strerror}") from None
