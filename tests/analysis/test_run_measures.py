"""Agreement and lexical keys against brute force, on runs profiled from the tiny models (whose top stores are
checked here against a plain top-k over captured coefficients), one of them a shard of its stream."""

import numpy as np
import pytest
import torch

import kvmem
from kvmem.analysis.agreement import agreement, next_tokens
from kvmem.analysis.lexical import lexical
from kvmem.capture import run_capture

SEQ, K = 32, 6
RUNS = {"gpt2": ("gpt2", None), "llama": ("llama", None), "gpt2-shard": ("gpt2", "1/2")}


def profiled(model, out, shard=None, n_tokens=640):
    """A real run of ``model`` over the first tokens of pydoc; its top store checked against brute force."""
    cfg = kvmem.ProfileConfig(corpus="pydoc", tokens=n_tokens, seq_len=SEQ, top_k=K, batch_size=4,
                              checkpoint_every=1e9, shard=shard)
    run = kvmem.profile(cfg, out, model=model)
    store = run.tokens
    assert store.n_tokens % SEQ == 0 and store.offset == (n_tokens // 2 if shard else 0)
    cap = run_capture(model, store.ids.long().view(-1, SEQ))
    for layer in run.profiled_layers:
        m = cap.coef[layer].reshape(-1, model.d_mlp)  # [local token, neuron]
        top = run.stats[layer].top
        want = m.topk(K, dim=0).values.T
        assert torch.allclose(top.value, want, rtol=1e-4, atol=1e-5)
        local = top.index - store.offset
        assert torch.allclose(m.gather(0, local.T).T, top.value, rtol=1e-4, atol=1e-5)
    return run


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("measures")
    return {name: profiled(tiny_models[fam], root / name, shard) for name, (fam, shard) in RUNS.items()}


def brute_next(i, store):
    """The token after global index i in its document, or None."""
    ids, off = store.ids.tolist(), store.doc_offsets.tolist()
    i -= store.offset
    doc = max(d for d in range(len(off) - 1) if off[d] <= i)
    return ids[i + 1] if i + 1 < off[doc + 1] else None


@pytest.mark.parametrize("name", list(RUNS))
def test_agreement_matches_brute_force(tiny_models, runs, name):
    model, run = tiny_models[RUNS[name][0]], runs[name]
    logits = torch.stack([model.layers[layer].W_out.double() @ model.W_U.double() for layer in range(model.n_layers)])
    value_top = logits.argsort(-1, descending=True)[..., :5]
    value_bottom = logits.argsort(-1)[..., :2]
    res = agreement(run, value_top, k=3, n_perm=4, value_bottom_ids=value_bottom)
    table, pairs = res["layers"].set_index("layer"), res["pairs"]

    def rate(layer, partner_of, kind):
        hits, count = 0, 0
        for i in range(model.d_mlp):
            j = partner_of(i)
            store = run.stats[layer].bottom if kind == "neg" else run.stats[layer].top
            nxt = [brute_next(x, run.tokens) for x in store.index[j].tolist()]
            if all(t is None for t in nxt):
                continue
            count += 1
            vt = value_top[layer, i].tolist()
            if kind == "neg":
                hits += value_bottom[layer, i, 0].item() in nxt
            elif kind == "ex1":
                hits += nxt[0] == vt[0]
            elif kind == "top1":
                hits += vt[0] in nxt
            else:
                hits += any(t in nxt for t in vt[:3])
        return hits / count

    for layer in range(model.n_layers):
        for kind in ("ex1", "top1", "topk"):
            assert table.loc[layer, f"agree_{kind}"] == pytest.approx(rate(layer, lambda i: i, kind))
        assert table.loc[layer, "agree_neg_top1"] == pytest.approx(rate(layer, lambda i: i, "neg"))
        # the baseline pairs every neuron with another neuron's examples, and is the mean over those pairings
        lp = pairs[pairs.layer == layer]
        assert (lp.partner != lp.neuron).all()
        assert sorted(lp.draw.unique()) == [0, 1, 2, 3]
        for draw, g in lp.groupby("draw"):
            assert sorted(g.partner) == list(range(model.d_mlp))
        want = np.mean([rate(layer, dict(zip(g.neuron, g.partner)).__getitem__, "top1") for _, g in lp.groupby("draw")])
        assert table.loc[layer, "base_top1"] == pytest.approx(want)
        want = np.mean([rate(layer, dict(zip(g.neuron, g.partner)).__getitem__, "neg") for _, g in lp.groupby("draw")])
        assert table.loc[layer, "base_neg_top1"] == pytest.approx(want)
    assert res.meta["n_tokens"] == run.tokens.n_tokens


def test_next_tokens_stop_at_document_ends(runs):
    store = runs["gpt2"].tokens
    ends = store.doc_offsets[1:] - 1
    got = next_tokens(torch.cat([ends, torch.tensor([-1, 0])]), store.ids, store.doc_offsets)
    assert (got[:-1] == -1).all()
    assert got[-1] == store.ids[1]


@pytest.mark.parametrize("name", list(RUNS))
def test_lexical_matches_brute_force(tiny_models, runs, name):
    model, run = tiny_models[RUNS[name][0]], runs[name]
    res = lexical(model, run, n_neurons=10, n_trunc=3)
    table = res["layers"].set_index("layer")
    ids, off, base = run.tokens.ids.tolist(), run.tokens.doc_offsets.tolist(), run.tokens.offset
    for layer in range(model.n_layers):
        index = run.stats[layer].top.index - base  # local
        shares, bishares = [], []
        for i in range(model.d_mlp):
            toks = [ids[x] for x in index[i].tolist()]
            shares.append(max(toks.count(t) for t in toks) / len(toks))
            pairs = []
            for x in index[i].tolist():
                doc_start = max(o for o in off if o <= x)
                pairs.append((ids[x - 1] if x - 1 >= doc_start else ("none", x), ids[x]))
            bishares.append(max(pairs.count(p) for p in pairs) / len(pairs))
        assert table.loc[layer, "same_token"] == pytest.approx(np.mean(shares))
        assert table.loc[layer, "same_bigram"] == pytest.approx(np.mean(bishares))
        assert 0 < table.loc[layer, "base_same_token"] <= 1
    ex = res["truncation"]
    assert set(ex.L) == {1, 2} and len(ex) > 0
    for row in ex.sample(12, random_state=0).itertuples():  # each truncated run, redone by hand
        seq = torch.tensor([ids[row.index - base - row.L + 1: row.index - base + 1]])
        m = run_capture(model, seq, [row.layer]).coef[row.layer][0, -1, row.neuron]
        assert row.m_trunc == pytest.approx(float(m), rel=1e-4, abs=1e-6)
        assert row.index % SEQ >= row.L
        top = run.stats[row.layer].top
        slot = top.index[row.neuron].tolist().index(row.index)
        assert row.m_stored == pytest.approx(float(top.value[row.neuron][slot]))
    g = ex[ex.L == 1].groupby("layer").retain.median()
    for layer, med in g.items():
        assert table.loc[layer, "retain_1"] == pytest.approx(med)
