"""Sparsity, co-activation and knock-outs against brute-force computations on tiny models (composition:
tests/analysis/test_composition.py)."""

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
        norms = model.layers[layer].W_out.double().norm(dim=1).numpy()
        row = table.loc[layer]
        assert row.n_tokens == m.shape[0]
        assert row.active_gt0 == pytest.approx((m > 0).mean(), abs=1e-6)
        mx = np.abs(m).max(0)
        for f, name in ((0.01, "active1"), (0.1, "active10")):  # magnitude: |m| > f * max |m|
            want = np.mean([[abs(m[t, i]) > f * mx[i] and mx[i] > 0 for i in range(m.shape[1])]
                            for t in range(m.shape[0])])
            assert row[name] == pytest.approx(want, abs=1e-6)
            assert row[f"{name}_lo"] - 1e-9 <= row[name] <= row[f"{name}_hi"] + 1e-9
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
            assert row[f"{tag}_share"] == pytest.approx(np.mean(counts) / model.d_mlp, abs=1e-6)
            assert row[f"{tag}_share_lo"] - 1e-9 <= row[f"{tag}_share"] <= row[f"{tag}_share_hi"] + 1e-9
        if model.gated:
            g = cap["gate"][layer].reshape(-1, model.d_mlp) > 0
            u = cap["pre"][layer].reshape(-1, model.d_mlp) > 0
            assert row.q_gate_pos_up_neg == pytest.approx(float((g & ~u).double().mean()), abs=1e-9)
    assert res["model"].active_gt0[0] == pytest.approx(table.active_gt0.mean())  # equal tokens per layer
    model_row = res["model"].iloc[0]
    assert model_row.active10_lo - 1e-9 <= model_row.active10 <= model_row.active10_hi + 1e-9
    assert model_row.carry90_mean == pytest.approx(table.carry90_mean.mean())
    assert res.meta["n_tokens"] == sample.n_tokens
    units = res["units"]
    assert len(units) == model.n_layers * sample.n_tokens and units.doc.nunique() == table.n_docs.iloc[0]
    assert units.groupby("layer").active10.mean().to_numpy() == pytest.approx(table.active10.to_numpy(), abs=1e-6)


def _brute_loss(hf, rows):
    logits = hf(input_ids=rows).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_knockouts_match_edited_weights(tiny_models, samples, family):
    model, sample = tiny_models[family], samples[family]
    stats = neuron_stats(model, sample)
    res = knockouts(model, sample, layers=[1], stats=stats, ks=(3,), n_random=3, seed=4, tokens_per_batch=64,
                    n_boot=200)
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
        # top_max ranks by max |m| (a gated neuron's largest coefficient may be negative), measured directly
        m = run_capture(model, sample.rows, layers=[1]).coef[1].reshape(-1, model.d_mlp)
        mx = m.abs().max(0).values
        top_max = np.argsort(-mx.numpy(), kind="stable")[:3].tolist()
        assert long.loc[("top_max", 3), "loss"] == pytest.approx(edited(zero(top_max)), rel=1e-5)
        rate = (m.abs() > 0.1 * mx).double().mean(0).numpy()
        if len(set(rate)) == len(rate):  # ties would make the set ambiguous
            top_rate = np.argsort(-rate, kind="stable")[:3].tolist()
            assert long.loc[("top_rate", 3), "loss"] == pytest.approx(edited(zero(top_rate)), rel=1e-5)
        gen = torch.Generator().manual_seed(4)  # the documented draws: layer by layer, k by k, n_random each
        draws = [edited(zero(torch.randperm(model.d_mlp, generator=gen)[:3].tolist())) for _ in range(3)]
        assert long.loc[("random", 3), "delta"] == pytest.approx(np.mean(draws) - base, rel=1e-4, abs=1e-6)
        assert long.loc[("random", 3), "delta_sd"] == pytest.approx(np.std(draws, ddof=1), rel=1e-3, abs=1e-6)
        assert long.loc[("random", 3), "draws"] == 3
    assert long.loc[("remove", 0), "delta"] == pytest.approx(long.loc[("remove", 0), "loss"] - base, rel=1e-4)
    for (kind, k), row in long.iterrows():  # every delta has an interval that brackets it
        assert row.delta_lo - 1e-9 <= row.delta <= row.delta_hi + 1e-9
    # the skipped blocks (kept from the unmodified pass) are restored afterwards
    assert all("forward" not in b.__dict__ for b in model.adapter.blocks())
    with torch.no_grad():
        assert _brute_loss(model.hf, sample.rows) == pytest.approx(base, rel=1e-6)
    wide = res["layers"].iloc[0]
    assert {"remove", "remove_lo", "remove_hi", "linear", "top_rate_k3", "top_max_k3", "random_k3", "random_k3_sd",
            "top_max_k3_excess", "top_rate_k3_excess"} <= set(res["layers"].columns)
    assert wide.remove == pytest.approx(long.loc[("remove", 0), "delta"], rel=1e-5)
    units = res["units"]
    assert len(units) == res.meta["n_tokens"] and units.top_max_k3_excess.mean() == pytest.approx(
        wide.top_max_k3 - wide.random_k3, abs=1e-5)
    assert res.meta["forward_passes"] == res.meta["full_passes"] * (1 + 2 + 2 + 3)


def test_neuron_stats_brute_force(tiny_models, samples):
    model, sample = tiny_models["gpt2"], samples["gpt2"]
    st = neuron_stats(model, sample, layers=[2], tokens_per_batch=64)
    m = run_capture(model, sample.rows, layers=[2]).coef[2].reshape(-1, model.d_mlp)
    assert np.allclose(st.firing_rate, (m > 0).double().mean(0).numpy())
    assert np.allclose(st["max"], m.max(0).values.numpy())
    mx = m.abs().max(0).values
    assert np.allclose(st.max_abs, mx.numpy())
    assert np.allclose(st.active_rate, (m.abs() > 0.1 * mx).double().mean(0).numpy())
    assert np.allclose(st.mean_abs, m.abs().double().mean(0).numpy(), rtol=1e-5)


def test_coactivation_matches_brute_force(tiny_models, samples):
    from kvmem.analysis.coactivation import coactivation

    model, sample = tiny_models["gpt2"], samples["gpt2"]
    res = coactivation(model, sample, ["1.5", "2.7"], top=4, rel=0.25, tokens_per_batch=64)
    cap = run_capture(model, sample.rows)
    m = {layer: cap.coef[layer].reshape(-1, model.d_mlp).numpy() for layer in range(model.n_layers)}
    fired = {layer: (np.abs(x) > 0.25 * np.abs(x).max(0)) & (np.abs(x).max(0) > 0) for layer, x in m.items()}
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
