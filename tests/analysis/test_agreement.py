"""Agreement (Geva et al. 2021 section 4) against brute force on real runs of tiny models (gated and not, and a
shard whose token store starts at offset > 0): per-document triggers, next tokens read with plain lists, value
distributions in float64, derangement draws redone by hand."""

import math
import sys

import numpy as np
import pytest
import torch

from kvmem.analysis.agreement import agreement, match_table, uniform_any
from kvmem.analysis.prefixes import next_in_doc
from kvmem.errors import KvmemError
from trigger_runs import RUNS, brute_doc_id, brute_next, make_runs


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    return make_runs(tiny_models, tmp_path_factory.mktemp("agreement"))


def test_trigger_at_document_end_is_excluded_not_a_miss():
    # neuron 0: its top trigger ends its document (no next token) -> ex1 not counted; its 2nd trigger matches
    # neuron 1: top trigger's next token is another token -> a miss
    value = torch.tensor([[5, 7], [5, 7]])
    nxt = torch.tensor([[-1, 5], [9, -1]])
    got = match_table(value, nxt)
    assert math.isnan(got["ex1"][0]) and got["ex1"][1] == 0
    assert got["any"].tolist() == [1.0, 0.0]
    assert got["topk"].tolist() == [1.0, 0.0]
    none = match_table(value, torch.full((2, 2), -1))
    assert torch.isnan(none["any"]).all() and torch.isnan(none["topk"]).all()


def test_next_in_doc_stops_at_document_ends(runs):
    for name in RUNS:
        store = runs[name].tokens
        idx = torch.arange(store.offset, store.offset + store.n_tokens)
        got = next_in_doc(store, idx).tolist()
        want = [brute_next(i, store) for i in idx.tolist()]
        assert got == [-1 if w is None else w for w in want]
        assert next_in_doc(store, torch.tensor([-1])).tolist() == [-1]


def test_uniform_any_is_exact():
    V, k = 20, 3
    got = uniform_any(torch.tensor([[4, 4, 9, -1], [-1, -1, -1, -1]]), k, V)
    # two distinct targets; brute force over all k-subsets of 20 ids
    from itertools import combinations
    subsets = list(combinations(range(V), k))
    assert got[0] == pytest.approx(sum(bool({4, 9} & set(s)) for s in subsets) / len(subsets))
    assert math.isnan(got[1])


@pytest.mark.parametrize("name,masked", [(name, False) for name in RUNS] + [("gpt2", True)])
def test_agreement_matches_brute_force(tiny_models, runs, name, masked, monkeypatch):
    model, run = tiny_models[RUNS[name][0]], runs[name]
    store = run.tokens
    k, n_perm = 3, 7
    defined = torch.ones(model.d_vocab, dtype=torch.bool)
    if masked:  # ids the tokenizer does not define (padded unembedding rows) are never a value token
        defined[::3] = False
        monkeypatch.setattr(sys.modules["kvmem.analysis.agreement"], "vocab_mask", lambda m: defined)
    res = agreement(model, run, k=k, n_perm=n_perm, n_boot=200)
    table, units = res["layers"].set_index("layer"), res["units"]
    V = int(defined.sum())
    assert res.meta["n_vocab"] == V
    for layer in run.profiled_layers:
        full = model.layers[layer].W_out.double() @ model.W_U.double()
        logits = full.masked_fill(~defined, float("-inf"))
        order = logits.argsort(-1, descending=True)
        docs = run.stats[layer].top_docs.index.tolist()
        bottom = run.stats[layer].bottom.index.tolist()
        nexts = [[brute_next(x, store) if x >= 0 else None for x in row] for row in docs]

        def rates(partner):
            out = {"ex1": [], "docs_any": [], "topk": [], "neg_any": []}
            for i in range(model.d_mlp):
                nx = nexts[partner(i)]
                top = order[i, :k].tolist()
                out["ex1"].append(np.nan if nx[0] is None else float(top[0] == nx[0]))
                if all(t is None for t in nx):
                    out["docs_any"].append(np.nan)
                    out["topk"].append(np.nan)
                else:
                    out["docs_any"].append(float(top[0] in nx))
                    out["topk"].append(float(any(t in nx for t in top)))
                bn = [brute_next(x, store) if x >= 0 else None for x in bottom[partner(i)]]
                out["neg_any"].append(np.nan if all(t is None for t in bn) else
                                      float(int(full[i].masked_fill(~defined, float("inf")).argmin()) in bn))
            return out

        own = rates(lambda i: i)
        u = units[units.layer == layer].set_index("neuron")
        for r in ("ex1", "docs_any", "topk") + (("neg_any",) if model.gated else ()):
            np.testing.assert_array_equal(u[r].to_numpy(), np.array(own[r]))
            want = np.nanmean(own[r])
            row = table.loc[layer]
            assert row[r] == pytest.approx(want)
            assert row[f"n_{r}"] == np.sum(~np.isnan(own[r]))
            assert row[f"{r}_lo"] <= row[r] + 1e-12 and row[r] <= row[f"{r}_hi"] + 1e-12
        # Figs. 5-6: rank and probability of the top trigger's next token in the value's distribution
        for i in range(model.d_mlp):
            t = nexts[i][0]
            if t is None:
                assert np.isnan(u.loc[i, "next_rank"]) and np.isnan(u.loc[i, "next_prob"])
                continue
            assert u.loc[i, "next_rank"] == 1 + int((logits[i] > logits[i, t]).sum())
            assert u.loc[i, "next_prob"] == pytest.approx(float(torch.softmax(logits[i], 0)[t]), rel=1e-5)
            assert u.loc[i, "next_top10"] == float(u.loc[i, "next_rank"] <= 10)
            assert u.loc[i, "doc"] == brute_doc_id(docs[i][0], store)
        assert table.loc[layer, "next_rank_median"] == pytest.approx(np.nanmedian(u.next_rank))
        u = u.copy()
        u["_pred"], u["_next"] = None, None
        u = u.astype({"_pred": object, "_next": object})
        if model.gated:  # sign-aware top-1: the larger of the best positive and the most negative m
            tv, bv = run.stats[layer].top_docs.value.tolist(), run.stats[layer].bottom.value.tolist()
            for i in range(model.d_mlp):
                neg = bottom[i][0] >= 0 and -bv[i][0] > (tv[i][0] if docs[i][0] >= 0 else -np.inf)
                x = bottom[i][0] if neg else docs[i][0]
                t = brute_next(x, store) if x >= 0 else None
                pred = int(full[i].masked_fill(~defined, float("inf")).argmin()) if neg else int(order[i, 0])
                assert u.loc[i, "abs_neg"] == neg
                u.loc[i, "_pred"], u.loc[i, "_next"] = pred, t
                if t is None:
                    assert np.isnan(u.loc[i, "ex1_abs"])
                else:
                    assert u.loc[i, "ex1_abs"] == float(pred == t) and u.loc[i, "abs_doc"] == brute_doc_id(x, store)
            assert table.loc[layer, "ex1_abs"] == pytest.approx(u.ex1_abs.mean())
            assert 0 < u.abs_neg.sum() < model.d_mlp  # both signs occur in the tiny SwiGLU model
        assert table.loc[layer, "uniform_ex1"] == 1 / V
        docs_ex1 = {u.loc[i, "doc"] for i in range(model.d_mlp) if nexts[i][0] is not None}
        assert table.loc[layer, "n_docs_ex1"] == len(docs_ex1)
        # the derangement null: every kept draw redone by hand; base = mean over draws; p = permutation p-value
        null = res["null"][res["null"].layer == layer].set_index("draw")
        assert list(null.index) == list(range(n_perm))
        lp = res["pairs"][res["pairs"].layer == layer]
        for draw, g in lp.groupby("draw"):
            partner = dict(zip(g.neuron, g.partner))
            assert all(a != b for a, b in partner.items()) and sorted(partner.values()) == list(range(model.d_mlp))
            other = rates(partner.__getitem__)
            for r in ("ex1", "docs_any", "topk") + (("neg_any",) if model.gated else ()):
                assert null.loc[draw, r] == pytest.approx(np.nanmean(other[r]))
            if model.gated:  # neuron i's sign-aware prediction against the partner's largest-|m| trigger
                hits = [float(p == t) for p, t in ((u.loc[i, "_pred"], u.loc[partner[i], "_next"])
                                                   for i in range(model.d_mlp)) if t is not None]
                assert null.loc[draw, "ex1_abs"] == pytest.approx(np.mean(hits))
        for r in ("ex1", "docs_any", "topk"):
            assert table.loc[layer, f"base_{r}"] == pytest.approx(null[r].mean())
            obs = table.loc[layer, r]
            assert table.loc[layer, f"p_{r}"] == pytest.approx((1 + (null[r] >= obs).sum()) / (1 + n_perm))
    assert ("neg_any" in table) == model.gated


def test_agreement_rejects_bad_input(tiny_models, runs):
    with pytest.raises(KvmemError, match="k must be"):
        agreement(tiny_models["gpt2"], runs["gpt2"], k=0)
    with pytest.raises(KvmemError, match="n_perm"):
        agreement(tiny_models["gpt2"], runs["gpt2"], n_perm=0)
