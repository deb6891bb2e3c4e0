"""Lexical keys (Geva et al. 2021 section 3) against brute force on real runs of tiny models (gated and not, and a
shard with offset > 0): shares over plain lists, every truncated input rebuilt by hand (the row's BOS kept where the
layout has one) and re-run alone through the model."""

import numpy as np
import pytest
import torch

from kvmem.analysis.lexical import KEPT, lexical
from kvmem.analysis.prefixes import layout_of
from kvmem.capture import run_capture
from kvmem.errors import KvmemError
from trigger_runs import RUNS, brute_doc, brute_doc_id, make_runs


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    return make_runs(tiny_models, tmp_path_factory.mktemp("lexical"))


@pytest.mark.parametrize("name", list(RUNS))
def test_lexical_matches_brute_force(tiny_models, runs, name):
    model, run = tiny_models[RUNS[name][0]], runs[name]
    store = run.tokens
    res = lexical(model, run, n_neurons=10, n_trunc=3, n_boot=200)
    table, units = res["layers"].set_index("layer"), res["units"]
    ids, base = store.ids.tolist(), store.offset
    for layer in run.profiled_layers:
        index = run.stats[layer].top.index.tolist()  # global
        shares, bishares = [], []
        for row in index:
            toks = [ids[x - base] for x in row]
            shares.append(max(toks.count(t) for t in toks) / len(toks))
            pairs = []
            for x in row:
                start, _ = brute_doc(x, store)
                prev = ids[x - base - 1] if x - base - 1 >= start else ("none", x)
                pairs.append((prev, ids[x - base]))
            bishares.append(max(pairs.count(p) for p in pairs) / len(pairs))
        u = units[(units.layer == layer) & (units.kind == "neuron")].set_index("neuron")
        np.testing.assert_allclose(u.same_token.to_numpy(), shares)
        np.testing.assert_allclose(u.same_bigram.to_numpy(), bishares)
        np.testing.assert_allclose(u.excess_token.to_numpy(), np.array(shares) - u.base_same_token.to_numpy())
        assert list(u.doc) == [brute_doc_id(row[0], store) for row in index]
        row = table.loc[layer]
        assert row.same_token == pytest.approx(np.mean(shares))
        assert row.same_bigram == pytest.approx(np.mean(bishares))
        assert row.excess_token == pytest.approx(np.mean(shares) - row.base_same_token)
        assert row.excess_token_lo - 1e-12 <= row.excess_token <= row.excess_token_hi + 1e-12
        assert 0 < row.base_same_token <= 1
        assert row.n_docs == len({brute_doc_id(r[0], store) for r in index})
    ex = res["truncation"]
    assert set(ex.L) == {1, 2} and len(ex) > 0
    layout = layout_of(run)
    bos = [] if layout.bos_id is None else [layout.bos_id]
    for row in ex.itertuples():  # each truncated run, rebuilt and redone by hand
        x = row.index - base
        seq = bos + ids[x - row.L + 1: x + 1]
        m = run_capture(model, torch.tensor([seq]), [row.layer]).coef[row.layer][0, -1, row.neuron]
        assert row.m_trunc == pytest.approx(float(m), rel=1e-4, abs=1e-5)
        assert int(layout.position(torch.tensor(row.index))) - len(bos) >= row.L  # context was longer than L
        top = run.stats[row.layer].top
        slot = top.index[row.neuron].tolist().index(row.index)
        assert row.m_stored == pytest.approx(float(top.value[row.neuron][slot]))
        assert row.doc == brute_doc_id(row.index, store)
    for L in (1, 2):
        g = ex[ex.L == L].groupby("layer").retain
        for layer, r in g:
            assert table.loc[layer, f"retain_{L}"] == pytest.approx(r.median())
            assert table.loc[layer, f"kept_{L}"] == pytest.approx((r >= KEPT).mean())
            assert table.loc[layer, f"n_kept_{L}"] == len(r)
            lo, hi = table.loc[layer, f"kept_{L}_lo"], table.loc[layer, f"kept_{L}_hi"]
            assert lo - 1e-12 <= table.loc[layer, f"kept_{L}"] <= hi + 1e-12


def test_runs_cover_bos_and_stream_rows(runs):
    assert layout_of(runs["gpt2"]).bos_id is not None and layout_of(runs["gpt2"]).doc_rows
    assert layout_of(runs["gpt2-shard"]).bos_id is not None and runs["gpt2-shard"].tokens.offset > 0
    assert layout_of(runs["gpt2-stream"]).bos_id is None and not layout_of(runs["gpt2-stream"]).doc_rows


def test_lexical_rejects_bad_input(tiny_models, runs):
    with pytest.raises(KvmemError, match="n_neurons"):
        lexical(tiny_models["gpt2"], runs["gpt2"], n_neurons=-1)
