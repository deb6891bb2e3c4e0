"""The memory-mapped token store (kvmem.profile.tokens / tokenfile) and streamed corpora, against brute force:
the tokenizer called on each document alone, ``re.split`` on the whole text, safetensors' own reader."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import kvmem
from kvmem.errors import KvmemError
from kvmem.profile import schema
from kvmem.profile.corpus import Corpus
from kvmem.profile.runner import ProfileConfig
from kvmem.profile.run import slots
from kvmem.profile.tokenfile import TokenWriter, read_header
from kvmem.profile.tokens import RowLayout, TokenStore, tokenize

WORDS = ["alpha", "beta", "gamma", "loop", "iterator", "the", "of", "value", "key", "memory", "neuron", "é", "日本"]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _brute(tokenizer, docs: list[str]) -> list[list[int]]:
    """Each document tokenized alone by the tokenizer's own call, EOS after it."""
    return [tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in docs]


def _memory_store(pieces: list[list[int]]) -> TokenStore:
    flat = torch.tensor(sum(pieces, []), dtype=torch.int32)
    return TokenStore(flat, torch.tensor([0, *np.cumsum([len(p) for p in pieces])], dtype=torch.int64))


def _mapped_kb(path: Path) -> int:
    """Resident kB of this process's maps of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):  # a mapping's first line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- tokenize -> mapped store ------------------------------------------------------------------
def test_tokenize_to_a_mapped_store_matches_brute_force_over_many_batches(tmp_path, tiny_tokenizer):
    docs = _docs(120)
    expected = _brute(tiny_tokenizer, docs)
    store, ran_out = tokenize(Corpus(str(_jsonl(tmp_path / "c.jsonl", docs))), tiny_tokenizer, None,
                              path=tmp_path / "t.safetensors", batch_docs=7, batch_chars=300)
    assert not ran_out and store.mapped and isinstance(store.file.array, np.memmap)
    assert store.n_docs == len(docs) > 7 * 10  # many more documents than one batch holds
    assert store.ids.tolist() == sum(expected, [])
    assert store.doc_offsets.tolist() == [0, *np.cumsum([len(e) for e in expected]).tolist()]
    # safetensors' own reader sees the same tensors in the file we wrote incrementally
    plain = load_file(str(tmp_path / "t.safetensors"))
    assert plain["ids"].tolist() == sum(expected, []) and torch.equal(plain["doc_offsets"], store.doc_offsets)
    assert plain["shard"].tolist() == [0, 0, 0]
    assert set(plain) <= set(schema.TOKENS) | set(schema.TOKENS_OPTIONAL)
    # rows (BOS, one document per row) from the mapped store = rows cut by hand from the documents
    bos, seq = tiny_tokenizer.bos_token_id, 9
    lay = RowLayout.build(store, seq, bos)
    rows, at = [], 0
    for piece in expected:
        rows += [(at + s, piece[s:s + seq - 1]) for s in range(0, len(piece), seq - 1)]
        at += len(piece)
    assert lay.starts.tolist() == [s for s, _ in rows] and lay.lengths.tolist() == [len(r) for _, r in rows]
    pick = torch.tensor([0, 3, 4, len(rows) - 1, 17])
    got = lay.batch(store, pick)
    want = RowLayout.build(_memory_store(expected), seq, bos).batch(_memory_store(expected), pick)
    for name in ("ids", "mask", "index", "counted"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for k, r in enumerate(pick.tolist()):
        n = len(rows[r][1])
        assert got.ids[k, 0] == bos and got.ids[k, 1:1 + n].tolist() == rows[r][1]


def test_fast_batch_call_gives_the_tokenizers_own_ids(tiny_tokenizer):
    from kvmem.profile.tokens import _encoder

    docs = _docs(40, seed=3) + ["  leading and trailing  ", "line\nbreaks\n\nand\ttabs", "<|endoftext|> inside"]
    assert _encoder(tiny_tokenizer)(docs) == tiny_tokenizer(docs, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("where", ["boundary", "inside", "one", "beyond"])
def test_token_limit_cuts_exactly_and_stops_reading(tmp_path, tiny_tokenizer, where):
    docs = _docs(50, seed=1)
    expected = _brute(tiny_tokenizer, docs)
    flat, ends = sum(expected, []), np.cumsum([len(e) for e in expected]).tolist()
    limit = {"boundary": ends[20], "inside": ends[20] + 2, "one": 1, "beyond": len(flat) + 5}[where]
    pulled = []

    class Lazy:  # a corpus that records how far it was read
        def documents(self):
            for d in docs:
                pulled.append(d)
                yield d

    store, ran_out = tokenize(Lazy(), tiny_tokenizer, limit, path=tmp_path / "t.safetensors", batch_docs=4)
    n = min(limit, len(flat))
    assert store.ids.tolist() == flat[:n] and ran_out is (where == "beyond")
    want_offsets = [0] + [e for e in ends if e < n] + [n]
    assert store.doc_offsets.tolist() == want_offsets
    if where != "beyond":  # documents are read a batch at a time, not to the end
        assert len(pulled) <= len(want_offsets) - 1 + 4


def test_tokenize_without_path_leaves_no_file_behind(tmp_path, tiny_tokenizer, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    docs = _docs(10, seed=2)
    store, _ = tokenize(Corpus(str(_jsonl(tmp_path / "c.jsonl", docs))), tiny_tokenizer, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # the map keeps the removed file alive
    assert store.mapped and store.ids.tolist() == sum(_brute(tiny_tokenizer, docs), [])
    with pytest.raises(KvmemError, match="no tokens"):
        tokenize(Corpus(str(_jsonl(tmp_path / "c.jsonl", docs))), tiny_tokenizer, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # nor after an error


# --- the mapped store's read-outs ------------------------------------------------------------------
def test_contexts_prefixes_shards_save_and_concat_of_a_mapped_store(tmp_path):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=60)
    flat = rng.integers(0, 1000, size=int(sizes.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    mem = TokenStore(torch.from_numpy(flat.copy()), torch.from_numpy(offsets))
    mem.save(tmp_path / "t.safetensors")
    store = TokenStore.load(tmp_path / "t.safetensors")
    assert store.mapped and store.ids.tolist() == flat.tolist()
    for i in rng.integers(0, flat.size, size=50).tolist():
        d = int(np.searchsorted(offsets, i, side="right") - 1)
        lo, hi = max(offsets[d], i - 5), min(offsets[d + 1], i + 3)
        assert store.context(i, 5, 2) == (flat[lo:hi].tolist(), i - lo)  # never past its document
    lay = RowLayout.build(store, 8, 7)
    for i in rng.integers(0, flat.size, size=20).tolist():
        r = int(lay.row_of(torch.tensor([i]))[0])
        assert lay.prefix(store, i) == [7] + flat[int(lay.starts[r]):i + 1].tolist()
    # a shard is a view of the map; its global indices and its saved file are those of the whole
    cut = int(offsets[20]) + 3
    a, b = store.slice_tokens(0, cut), store.slice_tokens(cut, flat.size)
    assert b.mapped and b.continues_doc and b.offset == cut and b.doc_base == 20
    assert b.context(cut + 3, 2, 2) == store.context(cut + 3, 2, 2)  # (a shard ends its documents at its edges)
    assert b.read(0, 5).tolist() == flat[cut:cut + 5].tolist()
    b.save(tmp_path / "b.safetensors")
    back = TokenStore.load(tmp_path / "b.safetensors")
    assert (back.continues_doc, back.offset, back.doc_base) == (True, cut, 20)
    assert torch.equal(back.ids, b.ids) and torch.equal(back.doc_offsets, b.doc_offsets)
    whole = a.concat(back, path=tmp_path / "whole.safetensors")
    assert whole.mapped and whole.ids.tolist() == flat.tolist() and whole.doc_offsets.tolist() == offsets.tolist()
    assert torch.equal(a.concat(back).ids, whole.ids)  # the in-memory concatenation agrees
    parts = [store.slice_tokens(0, 10), store.slice_tokens(10, cut), b]  # three at once, streamed
    joined = TokenStore.join(parts, path=tmp_path / "joined.safetensors")
    assert joined.ids.tolist() == flat.tolist() and joined.doc_offsets.tolist() == offsets.tolist()
    with pytest.raises(KvmemError, match="not contiguous"):
        TokenStore.join([parts[0], parts[2]])
    idx = torch.tensor([[0, 5], [cut, flat.size - 1]])
    assert store.take(idx).tolist() == flat[idx.numpy()].tolist() and store.take(idx).dtype == torch.int64


def test_old_store_files_still_load(tmp_path):
    """Stores written by ``safetensors.torch.save_file`` (every run before the mapped store) load, mapped."""
    ids, offsets = torch.arange(11, dtype=torch.int32) * 3, torch.tensor([0, 4, 11])
    save_file({"ids": ids, "doc_offsets": offsets}, str(tmp_path / "old.safetensors"))
    save_file({"ids": ids, "doc_offsets": offsets, "shard": torch.tensor([1, 100, 7])}, str(tmp_path / "s.safetensors"))
    old = TokenStore.load(tmp_path / "old.safetensors")
    assert old.mapped and torch.equal(old.ids, ids) and torch.equal(old.doc_offsets, offsets)
    assert (old.continues_doc, old.offset, old.doc_base) == (False, 0, 0)
    s = TokenStore.load(tmp_path / "s.safetensors")
    assert (s.continues_doc, s.offset, s.doc_base) == (True, 100, 7) and s.context(105, 1, 1) == ([12, 15, 18], 1)


def test_an_old_run_still_opens(tmp_path, tiny_models, corpus):
    cfg = ProfileConfig(corpus=str(corpus), seq_len=16, top_k=4, batch_size=4, layers=(0,), checkpoint_every=1e9)
    run = kvmem.profile(cfg, tmp_path / "new", model=tiny_models["gpt2"])
    shutil.copytree(run.path, tmp_path / "old")
    plain = load_file(str(run.path / schema.TOKENS_FILE))
    save_file(plain, str(tmp_path / "old" / schema.TOKENS_FILE))  # the file as runs were written before
    old, new = kvmem.open_run(tmp_path / "old"), kvmem.open_run(run.path)
    assert read_header(tmp_path / "old" / schema.TOKENS_FILE)[0]["ids"]["data_offsets"][0] > 0  # the old layout
    assert old.tokens.mapped and torch.equal(old.tokens.ids, new.tokens.ids)
    assert torch.equal(old.tokens.doc_offsets, new.tokens.doc_offsets)
    i = int(slots(new.stats[0], "top").index[0, 0])  # the first neuron's best example
    assert old.tokens.context(i) == new.tokens.context(i) and old.layout.prefix(old.tokens, i)[-1] == plain["ids"][i]


def test_a_bad_tokens_file_is_refused_in_one_line(tmp_path):
    TokenStore(torch.arange(10, dtype=torch.int32), torch.tensor([0, 10])).save(tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-30])
    with pytest.raises(KvmemError, match="inside the file"):
        TokenStore.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05" * 20)
    with pytest.raises(KvmemError, match="not a safetensors file"):
        TokenStore.load(tmp_path / "junk.safetensors")


def test_loading_a_big_store_reads_nothing_and_reading_it_keeps_memory_flat(tmp_path):
    n, chunk = 20_000_000, 1 << 21
    with TokenWriter(tmp_path / "big.safetensors") as w:  # written a chunk at a time: ~80 MB on disk
        for a in range(0, n, chunk):
            w.add(np.arange(a, min(a + chunk, n), dtype=np.int32), np.array([min(a + chunk, n) - a]))
        w.close()
    before = _rss_kb()
    store = TokenStore.load(tmp_path / "big.safetensors")
    assert store.n_tokens == n and store.n_docs == -(-n // chunk) and isinstance(store.file.array, np.memmap)
    assert _rss_kb() - before < 8_000  # far below the 80 MB of ids: nothing was read
    assert _mapped_kb(tmp_path / "big.safetensors") < 1_000  # mapped (so it is listed), nothing resident
    lay = RowLayout.build(store, 1024, None)
    peak = _rss_kb()
    for k in range(0, lay.n_rows, 256):  # every row, as a profile reads them: copies, the map untouched
        b = lay.batch(store, torch.arange(k, min(k + 256, lay.n_rows)))
        assert torch.equal(b.ids[b.mask], b.index[b.mask])  # ids were written equal to their index
        peak = max(peak, _rss_kb())
    assert _mapped_kb(tmp_path / "big.safetensors") < 1_000
    assert peak - before < 48_000  # the layout and a batch's tensors (allocator slack included), not 80 MB
    assert store.context(n - 3, 4, 4) == (list(range(n - 7, n)), 4)


# --- streamed corpus sources ---------------------------------------------------------------------
def test_txt_blocks_read_line_by_line_match_the_regex_split(tmp_path):
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\n", "\n", "\t", "\x0b", "\x1c", "\u00a0", "\u2028", "\r", "é"]
    path = tmp_path / "x.txt"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        path.write_text(text, encoding="utf-8", newline="")
        assert list(Corpus(str(path))._blocks(path)) == re.split(r"\n\s*\n", text), repr(text)


def test_jsonl_and_parquet_stream_every_row(tmp_path):
    docs = _docs(3000, seed=4)
    assert list(Corpus(str(_jsonl(tmp_path / "c.jsonl", docs))).documents()) == docs
    pd.DataFrame({"text": docs}).to_parquet(tmp_path / "c.parquet", row_group_size=700)
    assert list(Corpus(str(tmp_path / "c.parquet")).documents()) == docs  # several row groups and batches
    with pytest.raises(KvmemError, match="no such column"):
        list(Corpus(str(tmp_path / "c.parquet"), text_field="body").documents())


def test_hub_datasets_are_streamed(tmp_path, monkeypatch):
    """``hf:NAME`` asks the datasets library for a streamed dataset; a local dataset folder stands in for the Hub."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    (tmp_path / "ds").mkdir()
    docs = _docs(30, seed=5)
    _jsonl(tmp_path / "ds" / "train.jsonl", docs)
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert list(Corpus(f"hf:{tmp_path / 'ds'}").documents()) == docs
    assert calls and all(kw.get("streaming") is True for kw in calls)
    assert isinstance(real(str(tmp_path / "ds"), split="train", streaming=True), datasets.IterableDataset)
    with pytest.raises(KvmemError, match="no 'body' field"):
        list(Corpus(f"hf:{tmp_path / 'ds'}", text_field="body").documents())
