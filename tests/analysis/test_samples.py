"""Samples drawn from a run's row layout (BOS rows, document-aligned, padded, a shard with offset > 0) and the
|m|-based measures on them, against brute force: every row run alone without padding, the gated case of a
neuron whose coefficients are all negative, and the run-side neuron statistics from a LayerStats."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvmem.analysis.coactivation import coactivation
from kvmem.analysis.common import sample_from_run
from kvmem.analysis.knockout import knockouts
from kvmem.analysis.neurons import default_queries, run_neuron_stats
from kvmem.analysis.sparsity import neuron_stats, sparsity
from kvmem.capture import run_capture
from kvmem.profile.tokens import RowLayout, TokenStore
from kvmem.stats.layer import LayerStats

SEQ = 12


def fake_run(bos=0, doc_rows=True, skip_first=True, offset=0, doc_base=0, seed=3):
    """A run-like object (path, tokens, layout) over 14 documents of 2..30 random tokens; a shard when
    ``offset`` > 0 (its token indices and document ids are global)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 31, (14,), generator=g)
    ids = torch.randint(1, 384, (int(sizes.sum()),), generator=g).int()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    store = TokenStore(ids, offsets, offset=offset, doc_base=doc_base)
    layout = RowLayout.build(store, SEQ, bos_id=bos, doc_rows=doc_rows, skip_first=skip_first)
    return SimpleNamespace(path="fake", tokens=store, layout=layout)


def brute_doc(store, index):
    local = index - store.offset
    off = store.doc_offsets.tolist()
    return max(d for d in range(len(off) - 1) if off[d] <= local) + store.doc_base


def test_sample_from_run_draws_rows_across_documents():
    run = fake_run(offset=1000, doc_base=7)
    s = sample_from_run(run, 60, seed=1)
    again, other = sample_from_run(run, 60, seed=1), sample_from_run(run, 60, seed=2)
    assert torch.equal(s.rows, again.rows) and torch.equal(s.index, again.index)  # reproducible
    assert not torch.equal(s.index[:, 1], other.index[:, 1])  # the seed matters
    assert "seed 1" in s.source and "at random" in s.source
    store = run.tokens
    # the fewest rows holding at least 60 counted tokens, in random order (not the store's first rows)
    per_row = s.counted.sum(1)
    assert int(per_row.sum()) >= 60 > int(per_row[:-1].sum())
    first = s.index[:, 1].tolist()
    assert first != sorted(first) or first[0] != store.offset
    assert s.n_docs > 1
    # counted: real store tokens, never BOS (position 0) or padding; their ids and documents match the store
    assert not s.counted[:, 0].any() and (s.rows[:, 0] == 0).all()
    idx = s.index[s.counted]
    assert (idx >= 0).all() and s.mask[s.counted].all()
    assert torch.equal(s.rows[s.counted], store.ids[idx - store.offset].long())
    assert s.doc[s.counted].tolist() == [brute_doc(store, int(i)) for i in idx]
    assert (s.index[~s.mask] == -1).all() and not s.counted[~s.mask].any()
    # a row lies in one document
    for r in range(s.rows.shape[0]):
        assert len(set(s.doc[r][s.index[r] >= 0].tolist())) == 1
    h = s.head(20)
    assert h.n_tokens >= 20 > int(h.counted.sum(1)[:-1].sum()) and torch.equal(h.rows, s.rows[:h.rows.shape[0]])
    full = sample_from_run(run, None)
    assert full.n_tokens == store.n_tokens  # every token once (a BOS precedes each row)


def test_sample_from_legacy_stream_rows_counts_every_token():
    run = fake_run(bos=None, doc_rows=False, skip_first=False)
    s = sample_from_run(run, None, seed=0)
    assert s.n_tokens == run.tokens.n_tokens and s.counted[s.mask].all()
    assert sorted(s.index[s.counted].tolist()) == list(range(run.tokens.n_tokens))


def rows_alone(sample):
    """[(ids [1, len], counted [len], doc [len])] each row without its padding."""
    out = []
    for r in range(sample.rows.shape[0]):
        n = int(sample.mask[r].sum())
        out.append((sample.rows[r:r + 1, :n], sample.counted[r, :n], sample.doc[r, :n]))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sparsity_on_bos_rows_matches_rows_run_alone(tiny_models, family):
    model = tiny_models[family]
    s = sample_from_run(fake_run(), 120, seed=5)
    assert s.padded
    ms = []
    for ids, counted, _ in rows_alone(s):  # brute force: no padding, no mask, position 0 (BOS) dropped
        ms.append(run_capture(model, ids).coef[1][0][counted].double())
    m = torch.cat(ms).numpy()
    mx = np.abs(m).max(0)
    res = sparsity(model, s, layers=[1], tokens_per_batch=48, n_boot=100)
    row = res["layers"].iloc[0]
    assert row.n_tokens == m.shape[0] == s.n_tokens and row.n_docs == s.n_docs
    assert row.active10 == pytest.approx(((np.abs(m) > 0.1 * mx) & (mx > 0)).mean(), abs=1e-6)
    assert row.active_gt0 == pytest.approx((m > 0).mean(), abs=1e-6)
    st = neuron_stats(model, s, layers=[1], tokens_per_batch=48)
    assert np.allclose(st.max_abs, mx, rtol=1e-5)  # BOS activations are not among them
    assert np.allclose(st.active_rate, (np.abs(m) > 0.1 * mx).mean(0))


def _loss_rows_alone(hf, sample):
    """Mean next-token loss over every row run alone: predictors at counted positions (not the BOS)."""
    total, n = 0.0, 0
    for ids, counted, _ in rows_alone(sample):
        logits = hf(input_ids=ids).logits[0]
        nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        keep = counted[:-1]
        total, n = total + float(nll[keep].sum()), n + int(keep.sum())
    return total / n, n


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_knockouts_on_bos_rows_match_edited_copies(tiny_models, family):
    model = tiny_models[family]
    s = sample_from_run(fake_run(), 100, seed=2)
    stats = neuron_stats(model, s, layers=[1])
    res = knockouts(model, s, layers=[1], stats=stats, ks=(2,), n_random=2, tokens_per_batch=48, n_boot=100)
    long = res["long"].set_index(["intervention", "k"])
    with torch.no_grad():
        base, n = _loss_rows_alone(model.hf, s)
        assert res.meta["baseline_loss"] == pytest.approx(base, rel=1e-5) and res.meta["n_tokens"] == n
        hf = copy.deepcopy(model.hf)
        mlp = hf.transformer.h[1].mlp if family == "gpt2" else hf.model.layers[1].mlp
        out = mlp.c_proj if family == "gpt2" else mlp.down_proj
        top = stats[stats.layer == 1].sort_values("neuron").max_abs.to_numpy().argsort(kind="stable")[::-1][:2]
        if family == "gpt2":
            out.weight[top.tolist(), :] = 0
        else:
            out.weight[:, top.tolist()] = 0
        assert long.loc[("top_max", 2), "loss"] == pytest.approx(_loss_rows_alone(hf, s)[0], rel=1e-5)
        out.weight.zero_()
        if out.bias is not None:
            out.bias.zero_()
        assert long.loc[("remove", 0), "loss"] == pytest.approx(_loss_rows_alone(hf, s)[0], rel=1e-5)
    assert res["layers"].n_docs.iloc[0] == res.meta["n_docs"] > 1
    for _, row in long.iterrows():
        assert row.delta_lo - 1e-9 <= row.delta <= row.delta_hi + 1e-9


@pytest.fixture(scope="module")
def negative_llama(tiny_models):
    """The tiny Llama with neuron 0 of layer 1 rewired so that up = -3·gate: m = silu(g)·(-3g) <= 0 at every
    token, and large (a SwiGLU neuron that is strongly active with negative coefficients only)."""
    model = copy.deepcopy(tiny_models["llama"])
    mlp = model.hf.model.layers[1].mlp
    with torch.no_grad():
        mlp.up_proj.weight[0] = -3 * mlp.gate_proj.weight[0]
    return model


def test_negative_swiglu_neuron_counts_as_active(negative_llama):
    model = negative_llama
    s = sample_from_run(fake_run(), 120, seed=5)
    m = torch.cat([run_capture(model, ids).coef[1][0][c].double() for ids, c, _ in rows_alone(s)])
    assert (m[:, 0] <= 0).all() and m[:, 0].min() < -1
    mx = m.abs().max(0).values
    st = neuron_stats(model, s, layers=[1]).set_index("neuron")
    want = float((m[:, 0].abs() > 0.1 * mx[0]).double().mean())
    assert want > 0.2 and st.loc[0, "active_rate"] == pytest.approx(want)  # m > 0 rules would say 0
    res = sparsity(model, s, layers=[1], n_boot=50)
    assert res["layers"].active10.iloc[0] == pytest.approx(float((m.abs() > 0.1 * mx).double().mean()), abs=1e-6)
    co = coactivation(model, s, ["1.0"], layers=[1], top=3)["partners"]
    fired = m.abs() > 0.25 * mx
    assert len(co) == 3 and co.n_query.iloc[0] == int(fired[:, 0].sum()) > 0


def test_run_neuron_stats_from_layer_stats(negative_llama):
    model = negative_llama
    s = sample_from_run(fake_run(), None, seed=0)
    order = s.index[s.counted].argsort()
    cap = run_capture(model, s.rows, what=("coef", "gate", "pre"), attention_mask=s.mask)
    stats = {}
    for layer in range(model.n_layers):
        ls = LayerStats(model.d_mlp, k=4, gated=True, max_pos=64)
        pick = [cap[k][layer][s.counted][order] for k in ("coef", "gate", "pre")]
        pos = torch.arange(s.seq_len).expand_as(s.rows)[s.counted][order]
        ls.update(pick[0], s.index[s.counted][order], s.doc[s.counted][order], pos, gate=pick[1], up=pick[2])
        stats[layer] = ls
    run = SimpleNamespace(layer_stats=lambda layer: stats[layer])
    table = run_neuron_stats(run, [1, 2])
    m = cap.coef[1][s.counted].double()
    g = table[table.layer == 1].sort_values("neuron")
    mx = m.abs().max(0).values
    assert np.allclose(g.max_abs, mx.numpy(), rtol=1e-5)
    truth = (m.abs() > 0.1 * mx).double().mean(0).numpy()
    assert (np.abs(g.active_rate - truth) <= g.active_rate_bound + 1e-9).all()  # within the histogram's bound
    assert np.allclose(g.firing_rate, (m > 0).double().mean(0).numpy())
    assert g.active_rate.iloc[0] > 0.05 and g.firing_rate.iloc[0] == 0  # the all-negative neuron is active
    q = dict(default_queries(run, [1, 2], table))
    assert q[1] == 0  # the largest max |m| (its max m is <= 0: a signed ranking would never pick it)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "gemma", "gpt_neox", "opt"])
def test_every_family_on_bos_rows(tiny_models, family):
    """Padding and BOS handled alike in every family: active10 and the baseline / FFN-removed losses equal
    those of each row run alone (removal by zeroing a deep copy's W_out and b_out)."""
    model = tiny_models[family]
    s = sample_from_run(fake_run(), 60, seed=7)
    m = torch.cat([run_capture(model, ids, layers=[1]).coef[1][0][c].double() for ids, c, _ in rows_alone(s)])
    mx = m.abs().max(0).values
    res = sparsity(model, s, layers=[1], tokens_per_batch=48, n_boot=20)
    assert res["layers"].active10.iloc[0] == pytest.approx(float((m.abs() > 0.1 * mx).double().mean()), abs=1e-6)
    ko = knockouts(model, s, layers=[1], stats=neuron_stats(model, s, layers=[1]), ks=(1,), n_random=1,
                   tokens_per_batch=48, n_boot=20)["long"].set_index(["intervention", "k"])
    assert abs(ko.loc[("remove", 0), "delta"]) > 1e-4
    edited = copy.deepcopy(model)
    assert edited.layers[1].out_module is not model.layers[1].out_module
    with torch.no_grad():
        out = edited.layers[1].out_module
        out.weight.zero_()
        if out.bias is not None:
            out.bias.zero_()
        assert ko.loc[("remove", 0), "baseline_loss"] == pytest.approx(_loss_rows_alone(model.hf, s)[0], rel=1e-5)
        assert ko.loc[("remove", 0), "loss"] == pytest.approx(_loss_rows_alone(edited.hf, s)[0], rel=1e-5)


def _carry(contrib, share):
    """Brute force: per token, add contributions largest first until ``share`` of the total is reached."""
    out = []
    for row in contrib:
        c = np.sort(row)[::-1]
        total, acc, k = c.sum(), 0.0, 0
        while acc < share * total:
            acc += c[k]
            k += 1
        out.append(k)
    return np.array(out)


def test_carry_counts_what_a_post_norm_layer_writes():
    """Gemma 2 passes the FFN output through an RMSNorm with gain (1 + w): neuron i writes m_i·(1+w)⊙v_i/rms(y),
    so its share of the update is |m_i|·‖(1+w)⊙v_i‖ (the per-token 1/rms is common to all neurons), read here
    from the HF module's own weights."""
    import kvmem
    from tests.conftest import make_tiny_new

    model = kvmem.from_hf(make_tiny_new("gemma2"), None)
    s = sample_from_run(fake_run(), 60, seed=4)
    m = torch.cat([run_capture(model, ids, layers=[1]).coef[1][0][c].double() for ids, c, _ in rows_alone(s)])
    block = model.hf.model.layers[1]
    v = block.mlp.down_proj.weight.double().T  # [d_mlp, d_model]
    gain = 1 + block.post_feedforward_layernorm.weight.double()
    want = _carry((m.abs() * (v * gain).norm(dim=1)).numpy(), 0.9)
    plain = _carry((m.abs() * v.norm(dim=1)).numpy(), 0.9)
    assert abs(plain.mean() - want.mean()) > 1e-3  # the gain matters on this model (old code: plain)
    row = sparsity(model, s, layers=[1], n_boot=20)["layers"].iloc[0]
    assert row.carry90_mean == pytest.approx(want.mean(), abs=1e-9)


def test_spread_keeps_per_row_counted_positions_and_cuts_rows():
    from kvmem.analysis.common import Sample

    rows = torch.arange(40).view(4, 10)
    counted = torch.ones(4, 10, dtype=torch.bool)
    counted[:, 0] = False  # position 0 never counted
    s = Sample(rows, "t", counted=counted)
    t = s.spread(per_row=3, length=8, seed=1)
    assert t.rows.shape == (4, 8) and torch.equal(t.rows, rows[:, :8])
    assert t.counted.sum(1).tolist() == [3, 3, 3, 3]
    assert not t.counted[:, 0].any()  # only counted positions are drawn
    assert torch.equal(t.counted, s.spread(per_row=3, length=8, seed=1).counted)  # seeded
    assert not torch.equal(t.counted, s.spread(per_row=3, length=8, seed=2).counted)
    assert t.head(6).rows.shape[0] == 2  # head counts the kept positions: more rows for the same budget
    assert s.head(6).rows.shape[0] == 1
