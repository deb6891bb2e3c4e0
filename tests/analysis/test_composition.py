"""Composition measures against plain loops over tokens, from the HF model's own hidden states and weights
(float64), on a tiny non-gated (GPT-2) and a gated (Llama) model."""

import copy

import numpy as np
import pytest
import torch

from kvmem.analysis.common import Sample, derangement
from kvmem.analysis.composition import COLUMNS, TOP_SUB, composition
from kvmem.models.kvmodel import from_hf
from tests.conftest import VOCAB, make_tiny

TAU = 0.1


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    from tests.conftest import _train_tokenizer

    return _train_tokenizer()


def make_sample():
    """6 rows of 16 ids; position 0 not counted (the BOS position), the last row padded after 10 tokens;
    documents: rows 0-1, 2-3, 4, 5."""
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(6, 16, dtype=torch.bool)
    mask[5, 10:] = False
    counted = mask.clone()
    counted[:, 0] = False
    doc = torch.tensor([0, 0, 1, 1, 2, 3])[:, None].expand(6, 16).clone()
    return Sample(torch.randint(0, VOCAB, (6, 16), generator=g), "test rows", mask=mask, counted=counted, doc=doc)


def hf_parts(family, hf):
    """(final norm module, list of MLP modules, m from the MLP input) read straight from HF's modules."""
    if family == "gemma2":
        mlps = [b.mlp for b in hf.model.layers]
        return hf.model.norm, mlps, lambda mlp, xin: mlp.act_fn(mlp.gate_proj(xin)) * mlp.up_proj(xin)
    if family == "gpt2":
        mlps = [b.mlp for b in hf.transformer.h]
        return hf.transformer.ln_f, mlps, lambda mlp, xin: mlp.act(mlp.c_fc(xin))
    mlps = [b.mlp for b in hf.model.layers]
    return hf.model.norm, mlps, lambda mlp, xin: mlp.act_fn(mlp.gate_proj(xin)) * mlp.up_proj(xin)


def raw_values(family, hf, layer):
    if family == "gpt2":
        return hf.transformer.h[layer].mlp.c_proj.weight.double()  # Conv1D [d_mlp, d_model]
    return hf.model.layers[layer].mlp.down_proj.weight.double().T


@torch.no_grad()
def brute_force(family, hf, sample):
    """Per layer, the per-token columns computed with loops in float64 (same token order as the units table:
    rows then positions, counted tokens only)."""
    norm, mlps, coef = hf_parts(family, hf)
    norm64 = copy.deepcopy(norm).double()
    U = hf.get_output_embeddings().weight.double().T  # [d_model, V]
    ids, mask, counted = sample.rows, sample.mask, sample.counted
    seen, post = {}, {}
    hooks = [mlp.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(i, (a[0], o)))
             for i, mlp in enumerate(mlps)]
    if family == "gemma2":  # the post-FFN norm's output is what the layer writes
        hooks += [b.post_feedforward_layernorm.register_forward_hook(lambda mod, a, o, i=i: post.__setitem__(i, o))
                  for i, b in enumerate(hf.model.layers)]
    bare = copy.deepcopy(hf)
    if family == "gpt2":
        bare.transformer.ln_f = torch.nn.Identity()
    else:
        bare.model.norm = torch.nn.Identity()
    with torch.no_grad():
        try:
            final = hf(input_ids=ids, attention_mask=mask).logits.double()[counted].argmax(-1)
        finally:
            for h in hooks:
                h.remove()
        hidden = bare(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ms = {i: coef(mlps[i], seen[i][0]).double()[counted] for i in seen}
    assert len(hidden) == len(mlps) + 1

    def logits(y):
        return norm64(y) @ U

    cap = getattr(hf.config, "final_logit_softcapping", None)

    def probs(raw):
        return (raw if cap is None else torch.tanh(raw / cap) * cap).softmax(-1)

    gen = torch.Generator().manual_seed(0)
    N = int(counted.sum())
    out = {}
    for layer in range(len(mlps)):
        V = raw_values(family, hf, layer)
        d = V.shape[0]
        x = hidden[layer + 1].double()[counted]
        y = seen[layer][1].double()[counted]
        o = post[layer].double()[counted] if family == "gemma2" else y
        if family == "gemma2":  # written value vectors (1 + w)·v_i; per token scale 1/rms(y)
            pn = hf.model.layers[layer].post_feedforward_layernorm
            V = V * (1 + pn.weight.double())
            s_post = 1 / torch.sqrt((y ** 2).mean(-1) + pn.eps)
        else:
            s_post = torch.ones(N, dtype=torch.float64)
        r = x - o
        m = ms[layer]
        maxabs = m.abs().max(0).values
        sub_top = {(i, s): int(logits((s * V[i])[None]).argmax()) for i in range(d) for s in (1, -1)}
        perm = derangement(N, gen) if N >= 2 else None
        score = torch.rand(N, d, generator=gen)
        col = {c: [] for c in COLUMNS}
        for t in range(N):
            lr, lo, lx = logits(r[t][None])[0], logits(o[t][None])[0], logits(x[t][None])[0]
            tr, to, tx = int(lr.argmax()), int(lo.argmax()), int(lx.argmax())
            col["case_residual"].append(tx == tr != to)
            col["case_ffn"].append(tx == to != tr)
            col["case_agreement"].append(tx == tr == to)
            col["case_composition"].append(tx != tr and tx != to)
            col["changed"].append(tx != tr)
            col["changed_to_ffn"].append(float(tx == to) if tx != tr else np.nan)
            top_of = lambda tt, i: sub_top[(i, 1 if m[tt, i] > 0 else -1)]  # noqa: E731
            act = [i for i in range(d) if abs(m[t, i]) > TAU * maxabs[i]]
            col["n_active"].append(len(act))
            col["novel_active"].append(all(top_of(t, i) != to for i in act))
            if perm is None:
                col["novel_paired"].append(np.nan)
            else:
                p = int(perm[t])
                col["novel_paired"].append(all(top_of(p, i) != to for i in range(d)
                                               if abs(m[p, i]) > TAU * maxabs[i]))
            strength = (m[t].abs() * V.norm(dim=1)).numpy()
            dom = list(np.argsort(-strength, kind="stable")[:TOP_SUB])
            col["novel_top10"].append(all(top_of(t, i) != to for i in dom))
            rnd = sorted(act, key=lambda i: -float(score[t, i]))[:TOP_SUB]
            # exact additive split of the normalised update: f(o) = gamma*P(o)/s(o) + beta
            if family == "gpt2":
                g, b, eps = norm.weight.double(), norm.bias.double(), norm.eps
                P = lambda y: y - y.mean()  # noqa: E731
                s_o = torch.sqrt(o[t].var(unbiased=False) + eps)
            elif family == "gemma2":
                g, b, eps = 1 + norm.weight.double(), torch.zeros_like(o[t]), norm.eps
                P = lambda y: y  # noqa: E731
                s_o = torch.sqrt((o[t] ** 2).mean() + eps)
            else:
                g, b, eps = norm.weight.double(), torch.zeros_like(o[t]), norm.variance_epsilon
                P = lambda y: y  # noqa: E731
                s_o = torch.sqrt((o[t] ** 2).mean() + eps)
            contrib = {i: float((g * P(m[t, i] * V[i] * s_post[t]) / s_o) @ U[:, to]) for i in range(d)}
            own = float(lo[to] - b @ U[:, to])
            for name, group, ok in (("dom", dom, True), ("rand", rnd, len(act) >= TOP_SUB)):
                hits = [top_of(t, i) == to for i in group]
                total = sum(contrib[i] for i in group)
                col[f"{name}_has_top"].append(float(any(hits)) if ok else np.nan)
                col[f"{name}_top_share"].append(float(np.mean(hits)) if ok else np.nan)
                col[f"{name}_logit"].append(total if ok else np.nan)
                col[f"{name}_logit_share"].append(total / own if ok else np.nan)
            pr, px = probs(lr), probs(lx)
            col["saturation"].append(tx == tr and px[tr] > pr[tr])
            col["elimination"].append(tx != tr and px[tr] < pr[tr])
            col["resid_is_final"].append(tr == int(final[t]))
            col["resid_top_prob"].append(float(pr[tr]))
            col["resid_final_prob"].append(float(pr[int(final[t])]))
            if layer == len(mlps) - 1:  # the readout of the last block output is the model's own head
                assert tx == int(final[t])
        out[layer] = {c: np.asarray(v, dtype=np.float64) for c, v in col.items()}
    return out


FLOAT_COLS = {"dom_logit", "rand_logit", "dom_logit_share", "rand_logit_share", "resid_top_prob", "resid_final_prob"}


@pytest.mark.parametrize("family,cache", [("gpt2", True), ("llama", True), ("llama", False), ("gemma2", True)])
def test_composition_matches_brute_force(tok, family, cache):
    """GPT-2 (LayerNorm with bias), Llama (RMSNorm), Gemma 2 (post-FFN norm, (1 + w) gains, soft-capping)."""
    from tests.conftest import make_tiny_new

    hf = (make_tiny_new(family) if family == "gemma2" else make_tiny(family)).requires_grad_(False)
    model = from_hf(copy.deepcopy(hf), tok)
    sample = make_sample()
    res = composition(model, sample, tokens_per_batch=10_000, n_boot=200, cache=cache)
    units, table = res["units"], res["layers"].set_index("layer")
    brute = brute_force(family, hf, sample)
    N = int(sample.counted.sum())
    for layer, want in brute.items():
        got = units[units.layer == layer]
        assert len(got) == N and table.loc[layer, "n_tokens"] == N and table.loc[layer, "n_docs"] == 4
        assert got.doc.tolist() == sample.doc[sample.counted].tolist()
        for c in COLUMNS:
            a, b = got[c].to_numpy(), want[c]
            assert np.array_equal(np.isnan(a), np.isnan(b)), (layer, c)
            ok = ~np.isnan(b)
            if c in FLOAT_COLS:
                np.testing.assert_allclose(a[ok], b[ok], rtol=1e-3, atol=1e-4, err_msg=f"{layer} {c}")
            else:
                np.testing.assert_allclose(a[ok], b[ok], rtol=0, atol=1e-6, err_msg=f"{layer} {c}")
            mean = np.nanmean(b) if ok.any() else np.nan
            assert table.loc[layer, c] == pytest.approx(mean, rel=1e-3, abs=1e-4, nan_ok=True), (layer, c)
            if ok.any():
                assert table.loc[layer, f"{c}_lo"] <= table.loc[layer, c] + 1e-12 <= table.loc[layer, f"{c}_hi"] + 2e-12
        cases = sum(table.loc[layer, c] for c in ("case_residual", "case_ffn", "case_agreement", "case_composition"))
        assert cases == pytest.approx(1.0)
    assert res.meta["tau"] == TAU and "final norm" in res.meta["readout"]


def test_composition_bad_input(tok):
    from kvmem.errors import KvmemError

    model = from_hf(make_tiny("gpt2"), tok)
    sample = make_sample()
    with pytest.raises(KvmemError):
        composition(model, sample, tau=1.5)
    sample.counted[:] = False
    with pytest.raises(KvmemError, match="counted"):
        composition(model, sample)


def test_readout_masks_padded_ids_and_is_float32(tok):
    from kvmem.analysis.readout import Readout
    from tests.test_vocab import PAD, padded_llama

    model = padded_llama(tok)
    rd = Readout(model)
    assert rd.symmetric and not rd.centred
    y = torch.randn(20, model.d_model)
    lg = rd.logits(y)
    assert lg.dtype == torch.float32 and torch.isinf(lg[:, VOCAB:]).all() and torch.isfinite(lg[:, :VOCAB]).all()
    pos, neg = rd.value_tops(model.layers[1].W_out, chunk=7)
    V = model.layers[1].W_out.double()
    norm64 = copy.deepcopy(model.final_norm).double()
    U = model.W_U.double()[:, :VOCAB]
    assert pos.tolist() == (norm64(V) @ U).argmax(-1).tolist()
    assert neg.tolist() == (norm64(-V) @ U).argmax(-1).tolist()
    assert model.d_vocab == VOCAB + PAD
    res = composition(model, make_sample(), n_boot=50)  # runs; every readout top is a defined id
    assert res["layers"].n_tokens.eq(int(make_sample().counted.sum())).all()


def test_composition_on_a_bf16_model(tok):
    """A bf16 model: the readout runs in float32 and the last layer's top token is the model's own."""
    model = from_hf(make_tiny("llama"), tok, dtype=torch.bfloat16)
    res = composition(model, make_sample(), n_boot=50, cache=False)
    table = res["layers"].set_index("layer")
    assert np.isfinite(table.case_residual).all()
    cases = table[["case_residual", "case_ffn", "case_agreement", "case_composition"]].sum(1)
    assert np.allclose(cases, 1.0)


# the columns of one token that do not depend on the other tokens of the sample (the activity scale and the
# random pairing do)
OWN_COLS = ("case_residual", "case_ffn", "case_agreement", "case_composition", "changed", "changed_to_ffn",
            "novel_top10", "dom_has_top", "dom_top_share", "dom_logit", "dom_logit_share", "saturation",
            "elimination", "resid_is_final", "resid_top_prob", "resid_final_prob")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_composition_on_bos_rows_of_a_shard_matches_rows_run_alone(tok, family):
    """A shard (offset > 0, document ids from doc_base) cut into BOS-first document rows, padded in one batch:
    every per-token column equals the brute force over each row run alone without padding, BOS never counted,
    clusters are the global document ids."""
    from kvmem.analysis.common import sample_from_run
    from tests.analysis.test_samples import brute_doc, fake_run

    hf = make_tiny(family).requires_grad_(False)
    model = from_hf(copy.deepcopy(hf), tok)
    run = fake_run(bos=0, offset=1000, doc_base=7)
    sample = sample_from_run(run, 60, seed=2)
    assert sample.padded and (sample.rows[:, 0] == 0).all()
    res = composition(model, sample, tokens_per_batch=10_000, n_boot=100)
    units = res["units"]
    assert (units["index"] >= 1000).all()
    assert units.groupby("layer").size().eq(sample.n_tokens).all()
    offset = 0
    for r in range(sample.rows.shape[0]):
        n = int(sample.mask[r].sum())
        counted = sample.counted[r, :n]
        if not counted.any():
            continue
        alone = Sample(sample.rows[r:r + 1, :n], "row", counted=counted[None], doc=sample.doc[r:r + 1, :n])
        want = brute_force(family, hf, alone)
        k = int(counted.sum())
        for layer, cols in want.items():
            got = units[units.layer == layer].iloc[offset:offset + k]
            assert got.doc.tolist() == [brute_doc(run.tokens, int(i)) for i in got["index"]]
            for c in OWN_COLS:
                a, b = got[c].to_numpy(), cols[c]
                assert np.array_equal(np.isnan(a), np.isnan(b)), (r, layer, c)
                ok = ~np.isnan(b)
                np.testing.assert_allclose(a[ok], b[ok], rtol=1e-3, atol=1e-4, err_msg=f"row {r} layer {layer} {c}")
        offset += k
