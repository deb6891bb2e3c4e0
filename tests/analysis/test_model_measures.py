"""Sparsity and knock-outs against brute-force computations on tiny models."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvmem.analysis.common import derangement, sample_from_corpus, sample_from_ids, thirds
from kvmem.analysis.knockout import knockouts
from kvmem.analysis.sparsity import neuron_stats, sparsity
from kvmem.capture import run_capture


@pytest.fixture(scope="module")
def samples(tiny_models):
    return {fam: sample_from_corpus(tiny_models[fam], "pydoc", tokens=192, seq_len=32) for fam in ("gpt2", "llama")}


def test_derangement_has_no_fixed_point():
    g = torch.Generator().manual_seed(1)
    for n in (2, 3, 5, 48, 1000):
        for _ in range(20):
            p = derangement(n, g)
            assert sorted(p.tolist()) == list(range(n))
            assert (p != torch.arange(n)).all()


def test_thirds_and_rows():
    t = thirds(list(range(30)), 30)
    assert t["lower"] == list(range(10)) and t["upper"] == list(range(20, 30))
    s = sample_from_ids(torch.arange(100), 32)
    assert s.rows.shape == (3, 32) and s.rows[1, 0] == 32


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sparsity_matches_brute_force(tiny_models, samples, family):
    model, sample = tiny_models[family], samples[family]
    res = sparsity(model, sample, tokens_per_batch=64)
    cap = run_capture(model, sample.rows, what=("coef", "gate", "pre") if model.gated else ("coef",))
    table = res["layers"].set_index("layer")
    for layer in range(model.n_layers):
        m = cap.coef[layer].reshape(-1, model.d_mlp).double().numpy()
        mx = m.max(0)
        norms = model.layers[layer].W_out.double().norm(dim=1).numpy()
        row = table.loc[layer]
        assert row.n_tokens == m.shape[0]
        assert row.active_gt0 == pytest.approx((m > 0).mean(), abs=1e-6)
        for f, name in ((0.01, "active_gt1pct_max"), (0.1, "active_gt10pct_max")):
            want = np.mean([[(m[t, i] > f * mx[i]) and mx[i] > 0 for i in range(m.shape[1])] for t in range(m.shape[0])])
            assert row[name] == pytest.approx(want, abs=1e-6)
        a = np.abs(m)
        assert row["abs_gt_1x_mean"] == pytest.approx((a > a.mean(1, keepdims=True)).mean(), abs=1e-6)
        for p, tag in ((0.5, "carry50"), (0.9, "carry90")):
            counts = []
            for t in range(m.shape[0]):  # brute force: add neurons largest first until the share is reached
                c = np.sort(a[t] * norms)[::-1]
                total, acc, k = c.sum(), 0.0, 0
                while acc < p * total:
                    acc += c[k]
                    k += 1
                counts.append(k)
            assert row[f"{tag}_mean"] == pytest.approx(np.mean(counts), abs=1e-9)
            assert row[f"{tag}_median"] == int(np.sort(counts)[(len(counts) - 1) // 2])  # the lower median
        if model.gated:
            g = cap["gate"][layer].reshape(-1, model.d_mlp) > 0
            u = cap["pre"][layer].reshape(-1, model.d_mlp) > 0
            assert row.q_gate_pos_up_neg == pytest.approx(float((g & ~u).double().mean()), abs=1e-9)
    assert res["model"].active_gt0[0] == pytest.approx(table.active_gt0.mean())
    assert res.meta["n_tokens"] == sample.n_tokens


def _brute_loss(hf, rows):
    logits = hf(input_ids=rows).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_knockouts_match_edited_weights(tiny_models, samples, family):
    model, sample = tiny_models[family], samples[family]
    stats = neuron_stats(model, sample)
    res = knockouts(model, sample, layers=[1], stats=stats, ks=(3,), tokens_per_batch=64)
    long = res["long"].set_index(["intervention", "k"])
    with torch.no_grad():
        base = _brute_loss(model.hf, sample.rows)
        assert res.meta["baseline_loss"] == pytest.approx(base, rel=1e-5)
        assert res.meta["n_tokens"] == sample.rows.shape[0] * (sample.seq_len - 1)

        def edited(edit):
            hf = copy.deepcopy(model.hf)
            mlp = hf.transformer.h[1].mlp if family == "gpt2" else hf.model.layers[1].mlp
            edit(mlp)
            return _brute_loss(hf, sample.rows)

        def remove(mlp):
            out = mlp.c_proj if family == "gpt2" else mlp.down_proj
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()

        def linear(mlp):
            if family == "gpt2":
                mlp.act = torch.nn.Identity()
            else:
                mlp.act_fn = torch.nn.Identity()

        def zero(idx):
            def f(mlp):
                if family == "gpt2":
                    mlp.c_proj.weight[idx, :] = 0
                else:
                    mlp.down_proj.weight[:, idx] = 0
            return f

        assert long.loc[("remove", 0), "loss"] == pytest.approx(edited(remove), rel=1e-5)
        assert long.loc[("linear", 0), "loss"] == pytest.approx(edited(linear), rel=1e-5)
        g = stats[stats.layer == 1].sort_values("neuron")
        top_rate = g.sort_values(["firing_rate"], ascending=False, kind="stable")
        top_max = np.argsort(-g["max"].to_numpy(), kind="stable")[:3].tolist()
        assert long.loc[("top_max", 3), "loss"] == pytest.approx(edited(zero(top_max)), rel=1e-5)
        rate = g["firing_rate"].to_numpy()
        if len(set(rate)) == len(rate):  # ties would make the set ambiguous
            assert long.loc[("top_rate", 3), "loss"] == pytest.approx(edited(zero(top_rate.neuron[:3].tolist())), rel=1e-5)
    assert long.loc[("remove", 0), "delta"] == pytest.approx(long.loc[("remove", 0), "loss"] - base, rel=1e-4)
    # the skipped blocks (kept from the unmodified pass) are restored afterwards
    assert all("forward" not in b.__dict__ for b in model.adapter.blocks())
    with torch.no_grad():
        assert _brute_loss(model.hf, sample.rows) == pytest.approx(base, rel=1e-6)
    assert set(res["layers"].columns) >= {"remove", "linear", "top_rate_k3", "top_max_k3", "random_k3"}


def test_neuron_stats_brute_force(tiny_models, samples):
    model, sample = tiny_models["gpt2"], samples["gpt2"]
    st = neuron_stats(model, sample, layers=[2], tokens_per_batch=64)
    m = run_capture(model, sample.rows, layers=[2]).coef[2].reshape(-1, model.d_mlp)
    assert np.allclose(st.firing_rate, (m > 0).double().mean(0).numpy())
    assert np.allclose(st["max"], m.max(0).values.numpy())
    assert np.allclose(st.mean_abs, m.abs().double().mean(0).numpy(), rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_composition_matches_brute_force(tiny_models, samples, family):
    from kvmem.analysis.composition import composition

    model, sample = tiny_models[family], samples[family]
    res = composition(model, sample, cache=False, tokens_per_batch=64)
    table = res["layers"].set_index("layer")
    cap = run_capture(model, sample.rows, what=("coef", "out"), stop=False)
    with torch.no_grad():
        hidden = model.hf(input_ids=sample.rows, output_hidden_states=True).hidden_states
        W_U = model.W_U.double()
        for layer in range(model.n_layers):
            m = cap.coef[layer].reshape(-1, model.d_mlp).double()
            W_out = model.layers[layer].W_out.double()
            sub_logits = (m[:, :, None] * W_out[None]) @ W_U  # [N, d_mlp, d_vocab]: every m_i v_i W_U
            sub_top = sub_logits.argmax(-1)
            ffn_top = (m @ W_out @ W_U).argmax(-1)
            contrib = m.abs() * W_out.norm(dim=1)
            novel10, novel_all = [], []
            for t in range(m.shape[0]):
                order = np.argsort(-contrib[t].numpy(), kind="stable")[:10]
                novel10.append(all(sub_top[t, i] != ffn_top[t] for i in order))
                novel_all.append(all(sub_top[t, i] != ffn_top[t] for i in range(model.d_mlp) if m[t, i] != 0))
            row = table.loc[layer]
            assert row.n_tokens == m.shape[0]
            assert row.novel_top10 == pytest.approx(np.mean(novel10), abs=1e-9)
            assert row.novel_all == pytest.approx(np.mean(novel_all), abs=1e-9)
            if layer < model.n_layers - 1:  # hidden_states[-1] is after the final norm
                post = hidden[layer + 1].reshape(-1, model.d_model)
                mid = post - cap["out"][layer].reshape(-1, model.d_model)
                top_post = (model.final_norm(post) @ model.W_U).argmax(-1)
                top_mid = (model.final_norm(mid) @ model.W_U).argmax(-1)
                keep = (top_post == top_mid).double().mean()
                promo = ((top_post != top_mid) & (top_post == ffn_top)).double().mean()
                assert row.keep == pytest.approx(float(keep), abs=1e-9)
                assert row.promotion == pytest.approx(float(promo), abs=1e-9)
            assert row.keep + row.promotion + row.elimination == pytest.approx(1.0)


def test_coactivation_matches_brute_force(tiny_models, samples):
    from kvmem.analysis.coactivation import coactivation

    model, sample = tiny_models["gpt2"], samples["gpt2"]
    res = coactivation(model, sample, ["1.5", "2.7"], top=4, rel=0.25, tokens_per_batch=64)
    cap = run_capture(model, sample.rows)
    m = {layer: cap.coef[layer].reshape(-1, model.d_mlp).numpy() for layer in range(model.n_layers)}
    fired = {layer: (x > 0.25 * x.max(0)) & (x.max(0) > 0) for layer, x in m.items()}
    table = res["partners"]
    for qa, qb in ((1, 5), (2, 7)):
        fq = fired[qa][:, qb]
        scores = []
        for layer in range(model.n_layers):
            for j in range(model.d_mlp):
                if (layer, j) == (qa, qb):
                    continue
                fp = fired[layer][:, j]
                union = (fq | fp).sum()
                scores.append(((fq & fp).sum() / union if union else 0.0, layer, j, (fq & fp).sum()))
        scores.sort(key=lambda s: -s[0])
        got = table[table["query"] == f"{qa}.{qb}"]
        assert len(got) == 4 and f"{qa}.{qb}" not in set(got.partner)
        assert np.allclose(got.jaccard.to_numpy(), [s[0] for s in scores[:4]])
        first = got.iloc[0]
        assert first.co == (fq & fired[first.layer][:, first.neuron]).sum()
        assert first.lift == pytest.approx(first.co * len(fq) / (fq.sum() * fired[first.layer][:, first.neuron].sum()))
