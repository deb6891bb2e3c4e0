"""Warm-up candidate finders against brute force."""

import numpy as np
import torch
from stats_reference import docs_ref, quadrants_ref, topk_ref

from kvmem.stats.keys import decode_index, decode_value
from kvmem.stats.warmup import batch_doc_rows, batch_topk_rows, quadrant_best


def test_batch_topk_rows_ties_in_row_order():
    g = torch.Generator().manual_seed(0)
    m = torch.round(torch.randn(300, 9, generator=g) * 2) / 2
    m[:, 0] = 0.0  # every row ties
    m[:, 1] = torch.relu(m[:, 1])
    ti = torch.arange(300) * 2
    for largest in (True, False):
        for k in (1, 4, 400):
            rows, cols = batch_topk_rows(m, k, largest)
            _, ref_idx = topk_ref(m, ti, k, largest)
            got = np.full_like(ref_idx, -1)
            for c in range(9):
                r = rows[cols == c]
                vals = m[r, c] if largest else -m[r, c]
                o = np.lexsort((r.numpy(), -vals.numpy()))
                got[c, : len(r)] = ti[r[o]].numpy()
            np.testing.assert_array_equal(got, ref_idx)


def test_batch_doc_rows_and_quadrants():
    g = torch.Generator().manual_seed(1)
    n, d = 400, 7
    m = torch.round(torch.randn(n, d, generator=g) * 2) / 2
    m[:, 0] = 0.0
    ti = torch.arange(n) * 3 + 5
    doc = torch.sort(torch.randint(0, 30, (n,), generator=g)).values
    cols, key, docs = batch_doc_rows(m, ti, doc, 4)
    val, ind, rdocs = docs_ref(m, ti, doc, 4)
    for c in range(d):
        sel = cols == c
        o = torch.argsort(key[sel], descending=True)
        np.testing.assert_array_equal(decode_index(key[sel][o]).numpy(), ind[c])
        np.testing.assert_array_equal(decode_value(key[sel][o]).numpy(), val[c])
        np.testing.assert_array_equal(docs[sel][o].numpy(), rdocs[c])
    gate = torch.round(torch.randn(n, d, generator=g))
    up = torch.round(torch.randn(n, d, generator=g))
    gate[:, 1] = 1.0  # two quadrants empty in column 1
    best = quadrant_best(m, ti, gate, up)
    _, qv, qi = quadrants_ref(m, ti, gate, up)
    np.testing.assert_array_equal(decode_index(best).numpy(), qi)
    np.testing.assert_array_equal(decode_value(best).numpy(), np.abs(qv))
    assert (decode_index(best[1, 2:]) == -1).all()
