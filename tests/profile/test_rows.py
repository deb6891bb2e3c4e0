"""RowLayout / RowBatch (kvmem.profile.tokens) against a brute-force construction from the documents."""

import pytest
import torch

from kvmem.errors import KvmemError
from kvmem.profile.tokens import RowLayout, TokenStore

BOS, PAD = 99, 98


def _store(sizes, offset=0, doc_base=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (sum(sizes),), generator=g, dtype=torch.int32)
    off = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int64)
    return TokenStore(ids, off, False, offset, doc_base)


def brute_rows(store, seq_len, bos):
    """[(global start, [ids])] walking the documents one by one, each cut into pieces of
    seq_len - (1 if bos) tokens."""
    per = seq_len - (1 if bos is not None else 0)
    rows = []
    for d in range(store.n_docs):
        a, b = int(store.doc_offsets[d]), int(store.doc_offsets[d + 1])
        for s in range(a, b, per):
            rows.append((s + store.offset, store.ids[s:min(s + per, b)].tolist()))
    return rows


@pytest.mark.parametrize("bos", [BOS, None])
@pytest.mark.parametrize("skip_first", [True, False])
def test_doc_rows_against_brute_force(bos, skip_first):
    store = _store([3, 17, 1, 8, 9, 30], offset=1000, doc_base=7)
    S = 8
    lay = RowLayout.build(store, S, bos, doc_rows=True, skip_first=skip_first, pad_id=PAD)
    rows = brute_rows(store, S, bos)
    assert lay.starts.tolist() == [s for s, _ in rows]
    assert lay.lengths.tolist() == [len(t) for _, t in rows]
    # every row within one document
    doc_first = store.doc_of(lay.starts)
    doc_last = store.doc_of(lay.starts + lay.lengths - 1)
    assert torch.equal(doc_first, doc_last)
    order = [4, 0, 2, 7] if lay.n_rows > 7 else list(range(lay.n_rows))
    b = lay.batch(store, order)
    L = max(len(rows[r][1]) for r in order) + (1 if bos is not None else 0)
    assert b.ids.shape == (len(order), L) and b.mask.dtype == torch.bool and b.counted.dtype == torch.bool
    for k, r in enumerate(order):
        start, toks = rows[r]
        want = ([bos] if bos is not None else []) + toks
        n = len(want)
        assert b.ids[k, :n].tolist() == want and b.mask[k, :n].all() and not b.mask[k, n:].any()
        assert (b.ids[k, n:] == PAD).all()
        f = 1 if bos is not None else 0
        idx = ([-1] if bos is not None else []) + list(range(start, start + len(toks)))
        assert b.index[k, :n].tolist() == idx and (b.index[k, n:] == -1).all()
        counted = [i >= 0 for i in idx]
        if skip_first:
            counted[0] = False
        assert b.counted[k, :n].tolist() == counted and not b.counted[k, n:].any()
        # position and prefix of every store token of the row
        for p in range(f, n):
            g = idx[p]
            assert int(lay.position(torch.tensor([g]))[0]) == p
            assert lay.prefix(store, g) == want[:p + 1]


def test_long_document_rows_and_bos_counted_once():
    store = _store([40])
    lay = RowLayout.build(store, 10, BOS)
    assert lay.starts.tolist() == [0, 9, 18, 27, 36] and lay.lengths.tolist() == [9, 9, 9, 9, 4]
    b = lay.batch(store, range(lay.n_rows))
    # with a BOS every store token is counted exactly once, position 0 never
    got = b.index[b.counted]
    assert got.tolist() == list(range(40)) and not b.counted[:, 0].any()
    assert torch.equal(b.ids[b.mask & (b.index >= 0)], store.ids.long())


def test_without_bos_skip_first_leaves_each_row_start_out():
    store = _store([5, 12])
    lay = RowLayout.build(store, 5, None, skip_first=True)
    b = lay.batch(store, range(lay.n_rows))
    assert sorted(b.index[b.counted].tolist()) == sorted(set(range(17)) - set(lay.starts.tolist()))
    keep = RowLayout.build(store, 5, None, skip_first=False).batch(store, range(lay.n_rows))
    assert sorted(keep.index[keep.counted].tolist()) == list(range(17))


def test_stream_rows_are_the_legacy_cut():
    store = _store([3, 17, 1, 8], offset=64)
    lay = RowLayout.build(store, 8, None, doc_rows=False, skip_first=False)
    assert lay.starts.tolist() == [64, 72, 80, 88] and lay.lengths.tolist() == [8, 8, 8, 5]
    assert lay.position(torch.tensor([64, 71, 75, 92])).tolist() == [0, 7, 3, 4]


def test_shard_cut_at_row_boundaries_keeps_the_rows():
    store = _store([3, 17, 1, 8, 9, 30])
    whole = RowLayout.build(store, 6, BOS)
    a, b = 3, 9  # rows 3..8: starts inside the 17-token document
    lo, hi = int(whole.starts[a]), int(whole.starts[b])
    shard = store.slice_tokens(lo, hi)
    assert shard.continues_doc and shard.offset == lo
    part = RowLayout.build(shard, 6, BOS)
    assert torch.equal(part.starts, whole.starts[a:b]) and torch.equal(part.lengths, whole.lengths[a:b])
    for r in range(part.n_rows):
        x, y = part.batch(shard, [r]), whole.batch(store, [a + r])
        assert torch.equal(x.ids, y.ids) and torch.equal(x.index, y.index)


def test_settings_round_trip_and_bad_input():
    store = _store([4, 9])
    lay = RowLayout.build(store, 4, BOS, skip_first=False)
    again = RowLayout.from_settings(store, lay.settings())
    assert again.settings() == lay.settings() and torch.equal(again.starts, lay.starts)
    with pytest.raises(KvmemError, match="seq_len"):
        RowLayout.build(store, 1, BOS)
    with pytest.raises(KvmemError, match="not in this layout"):
        lay.position(torch.tensor([13]))
