"""Replies cached by the sha256 of their request, in ``RUN/explain_cache/replies.jsonl`` (one JSON object
per line: {"key", "reply"}), appended and flushed as each reply arrives, so a killed or repeated run skips
what is done. Failed replies (None) are not cached: a later run tries them again. A torn last line (a
killed writer) is ignored when read."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

DIR = "explain_cache"
FILE = "replies.jsonl"


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
    def __init__(self, run_path: Path | None):
        self.path = None if run_path is None else Path(run_path) / DIR / FILE
        self.data: dict[str, object] = {}
        self.hits = 0
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["reply"]
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, k: str):
        with self._lock:
            if k in self.data:
                self.hits += 1
                return True, self.data[k]
        return False, None

    def put(self, k: str, reply) -> None:
        if reply is None:
            return
        with self._lock:
            self.data[k] = reply
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": k, "reply": reply}, ensure_ascii=False) + "\n")
