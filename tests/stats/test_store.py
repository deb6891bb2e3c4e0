"""merge_entries (padded topk and segmented-sort paths, dedupe) against brute force."""

import pytest
import torch

from kvmem.stats import store
from kvmem.stats.keys import EMPTY


def brute(keys, docs, cand_row, cand_key, cand_doc, k, dedupe):
    d = keys.shape[0]
    out_k = torch.full((d, k), EMPTY, dtype=torch.int64)
    out_d = torch.full((d, k), -1, dtype=torch.int64)
    for r in range(d):
        entries = [(int(a), int(b)) for a, b in zip(keys[r], docs[r]) if a != EMPTY]
        entries += [(int(a), int(b)) for a, b, c in zip(cand_key, cand_doc, cand_row) if c == r]
        if dedupe:
            best = {}
            for key, doc in entries:
                best[doc] = max(best.get(doc, EMPTY), key)
            entries = [(key, doc) for doc, key in best.items()]
        entries.sort(reverse=True)
        for j, (key, doc) in enumerate(entries[:k]):
            out_k[r, j], out_d[r, j] = key, doc
    return out_k, out_d


@pytest.mark.parametrize("dedupe", [None, 0])
@pytest.mark.parametrize("slack", [4096, -(10**9)])  # padded topk path / sorted fallback
def test_merge_entries(monkeypatch, dedupe, slack):
    monkeypatch.setattr(store, "PAD_SLACK", slack)
    g = torch.Generator().manual_seed(0)
    d, k = 9, 4
    for trial in range(20):
        keys = torch.full((d, k), EMPTY, dtype=torch.int64)
        docs = torch.full((d, k), -1, dtype=torch.int64)
        # a store built by the brute force itself from random entries, some rows part full
        c0 = int(torch.randint(0, 40, (1,), generator=g))
        base = torch.randperm(10**6, generator=g)[:c0] * 7  # distinct keys
        rows0 = torch.randint(0, d, (c0,), generator=g)
        docs0 = torch.randint(0, 6, (c0,), generator=g)
        keys, docs = brute(keys, docs, rows0, base, docs0, k, dedupe is not None)
        c = int(torch.randint(0, 30, (1,), generator=g))
        ck = torch.randperm(10**6, generator=g)[:c] * 7 + 3  # distinct from the store's keys
        cr = torch.randint(0, d, (c,), generator=g)
        cd = torch.randint(0, 6, (c,), generator=g)
        got_k, (got_d,) = store.merge_entries(keys, [docs], [-1], cr, ck, [cd], dedupe=dedupe)
        exp_k, exp_d = brute(keys, docs, cr, ck, cd, k, dedupe is not None)
        assert torch.equal(got_k, exp_k), trial
        assert torch.equal(got_d, exp_d), trial


def test_column_topk_drops_empty():
    keys = torch.tensor([[5, EMPTY], [7, EMPTY], [1, EMPTY]])
    col, key, row = store.column_topk(keys, 2)
    assert col.tolist() == [0, 0] and key.tolist() == [7, 5] and row.tolist() == [1, 0]


def test_threaded_bincount_matches(monkeypatch):
    x = torch.randint(0, 5000, (3_000_000,), dtype=torch.int32)
    expect = torch.bincount(x, minlength=6000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert torch.equal(store.bincount(x, 6000), expect)


def test_nonzero_flat():
    g = torch.Generator().manual_seed(1)
    for n in (8, 64, 1000, 4099):
        for p in (0.0, 0.001, 0.1, 1.0):
            mask = torch.rand(n, generator=g) < p
            assert torch.equal(store.nonzero_flat(mask), mask.nonzero().squeeze(1))
    big = torch.zeros(10, 16, dtype=torch.bool)
    big[3, 5] = big[9, 15] = big[0, 0] = True
    assert store.nonzero_flat(big).tolist() == [0, 3 * 16 + 5, 9 * 16 + 15]
    assert store.nonzero_flat(big[1:]).tolist() == [2 * 16 + 5, 8 * 16 + 15]  # offset view


def test_work_buffers_are_reused_and_released():
    a = store.work_buffer("t", (4, 5), torch.float32, torch.device("cpu"))
    b = store.work_buffer("t", (2, 3), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr()  # the smaller request reuses the buffer
    store.release_buffers()
    c = store.work_buffer("t", (2, 3), torch.float32, torch.device("cpu"))
    assert c.shape == (2, 3)
