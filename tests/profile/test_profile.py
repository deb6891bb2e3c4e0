"""kvmem profile end to end on tiny models, every statistic against a brute-force cache of all activations."""

import pytest
import torch

import kvmem
from kvmem.profile.runner import ProfileConfig
from kvmem.stats import HIST_EDGES, ZERO_BIN

SEQ, BATCH, K = 16, 3, 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Short documents, one long repetitive document spanning many rows, and more short ones."""
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    docs = [
        "The built-in function abs returns the absolute value of a number.",
        "class attributes are looked up in the dictionary of the class. " * 12,
        "Exceptions are raised with the raise statement and handled with try.",
        "A for loop iterates over the items of any sequence.",
        "Names refer to objects; names are introduced by name binding operations.",
    ]
    path.write_text("\n\n".join(docs))
    return path


def brute_force(model, run):
    """Every activation of the run's tokens, cached whole (rows [n_tokens, d_mlp] in token order) with each
    token's row position [n_tokens]: each document cut into pieces of SEQ - 1 tokens, every piece run
    through the model alone after the tokenizer's BOS (the layout the run states), position 0 dropped."""
    store = run.tokens
    bos = model.tokenizer.bos_token_id
    assert bos is not None and run.layout.bos_id == bos and run.layout.doc_rows and run.layout.skip_first
    what = ("coef", "gate", "pre") if model.gated else ("coef",)
    acts = {kind: {layer: [] for layer in range(model.n_layers)} for kind in what}
    pos = []
    for d in range(store.n_docs):
        a, b = int(store.doc_offsets[d]), int(store.doc_offsets[d + 1])
        for s in range(a, b, SEQ - 1):
            piece = store.ids[s:min(s + SEQ - 1, b)].long()
            x = torch.cat([torch.tensor([bos]), piece])[None]
            cap = kvmem.run_capture(model, x, what=what)
            for kind in what:
                for layer in range(model.n_layers):
                    acts[kind][layer].append(cap[kind][layer][0, 1:].reshape(-1, model.d_mlp))
            pos.append(torch.arange(1, piece.numel() + 1))
    return {kind: {layer: torch.cat(v) for layer, v in d.items()} for kind, d in acts.items()}, torch.cat(pos)


def close(a, b) -> bool:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return True


def _value_norms(model, layer: int) -> torch.Tensor:
    """‖v_i‖ from the HF module itself: GPT-2's Conv1D c_proj stores [d_mlp, d_model], Llama's down_proj
    nn.Linear [d_model, d_mlp]."""
    if model.hf.config.model_type == "gpt2":
        return model.hf.transformer.h[layer].mlp.c_proj.weight.detach().double().norm(dim=1)
    return model.hf.model.layers[layer].mlp.down_proj.weight.detach().double().norm(dim=0)


def hist_bins(a: torch.Tensor) -> torch.Tensor:
    """Bins of HIST_EDGES by their documented rule, with torch.bucketize."""
    pos = torch.bucketize(a, HIST_EDGES, right=True) - 1
    neg = torch.bucketize(a, HIST_EDGES, right=False) - 1
    out = torch.where(a > 0, pos, neg)
    return torch.where(a.abs() < 2.0**-126, torch.full_like(out, ZERO_BIN), out)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_statistic_matches_brute_force(tmp_path, corpus, tiny_models, family):
    model = tiny_models[family]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    run = kvmem.profile(cfg, tmp_path / "run", model=model)
    acts, pos = brute_force(model, run)
    store = run.tokens
    n = store.n_tokens
    assert store.n_docs == 5 and int(store.doc_offsets.diff().max()) > SEQ  # the long document spans rows
    index = torch.arange(n)
    doc = store.doc_of(index)
    for layer in range(model.n_layers):
        A, s = acts["coef"][layer], run.stats[layer]
        # top-k and bottom-k: value desc (asc), ties to the lower token index
        order = torch.sort(-A, dim=0, stable=True).indices[:K].T
        # (the profiler runs padded batches of rows, the brute force one row alone: m agrees to rounding)
        assert torch.equal(s.top.index, order) and close(s.top.value, A.gather(0, order.T).T)
        order = torch.sort(A, dim=0, stable=True).indices[:K].T
        assert torch.equal(s.bottom.index, order) and close(s.bottom.value, A.gather(0, order.T).T)
        # per-document store: each document once, with its max and the first token reaching it
        for i in range(0, model.d_mlp, 7):
            best = []
            for d in range(store.n_docs):
                in_doc = (doc == d).nonzero().flatten()
                v = A[in_doc, i]
                best.append((-v.max().item(), in_doc[int(v.argmax())].item(), d))
            best.sort()
            expected = best[:K]
            assert s.top_docs.doc[i].tolist() == [d for _, _, d in expected]
            assert s.top_docs.index[i].tolist() == [t for _, t, _ in expected]
        # moments and counts
        assert s.n == n
        assert torch.equal(s.count_pos, (A > 0).sum(0))
        # float32 partial sums over blocks of 16 rows, then float64: ~1e-7 relative
        torch.testing.assert_close(s.mean(), A.double().mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s.std(), A.double().std(0, correction=0), rtol=1e-5, atol=1e-6)
        assert close(s.max, A.max(0).values) and close(s.min, A.min(0).values)
        # histogram
        bins = hist_bins(A)
        expected_hist = torch.stack([torch.bincount(bins[:, i], minlength=len(HIST_EDGES) - 1)
                                     for i in range(model.d_mlp)])
        assert torch.equal(s.hist, expected_hist)
        # L0: neurons with m > 0 per token, overall and by position in the row
        l0 = (A > 0).sum(1)
        assert torch.equal(s.l0_hist, torch.bincount(l0, minlength=model.d_mlp + 1))
        assert not (pos == 0).any()  # the BOS position never enters the statistics
        assert torch.equal(s.l0_pos_sum[:SEQ], torch.zeros(SEQ, dtype=torch.int64).index_add_(0, pos, l0))
        assert torch.equal(s.l0_pos_count[:SEQ], torch.bincount(pos, minlength=SEQ))
        # the random sample holds activating tokens with their true values
        smp = s.sample
        ok = smp.index >= 0
        nrn = torch.arange(model.d_mlp)[:, None].expand_as(smp.index)
        assert ok.any() and (A[smp.index[ok], nrn[ok]] > 0).all()
        assert close(smp.value[ok], A[smp.index[ok], nrn[ok]])
        # mass-L0: per token the fewest neurons whose |m_i|·‖v_i‖ reach 50% / 90% of the sum, ‖v_i‖ read off
        # the HF module's own down-projection weight
        c = A.double().abs() * _value_norms(model, layer)
        srt = torch.sort(c, dim=1, descending=True).values.cumsum(1)
        total = srt[:, -1:]
        for f in (0.5, 0.9):
            k = torch.where(total[:, 0] > 0, 1 + (srt < f * total).sum(1), 0)
            assert torch.equal(s.mass.distribution(f), torch.bincount(k, minlength=model.d_mlp + 1))
            by_pos = torch.zeros(SEQ, dtype=torch.float64).index_add_(0, pos, k.double()) / torch.bincount(pos, minlength=SEQ)
            torch.testing.assert_close(s.mass.by_position(f)[1:SEQ], by_pos[1:])  # position 0: no token
        # gated: the four sign quadrants of gate and up
        if model.gated:
            G, U = acts["gate"][layer], acts["pre"][layer]
            quads = torch.stack([((G > 0) & (U > 0)).sum(0), ((G > 0) & (U <= 0)).sum(0),
                                 ((G <= 0) & (U > 0)).sum(0), ((G <= 0) & (U <= 0)).sum(0)], 1)
            assert torch.equal(s.quadrant_count, quads)
    # the neuron table agrees with the statistics and shows the top example's token
    table = run.neurons
    assert len(table) == model.n_layers * model.d_mlp
    row = table.iloc[5]
    A = acts["coef"][int(row.layer)][:, int(row.neuron)]
    assert row.firing_rate == pytest.approx((A > 0).double().mean().item())
    assert row.top_token == run.vocab[int(store.ids[int(A.argmax())])]


def test_examples_show_the_activating_token_in_context(tmp_path, corpus, tiny_models):
    model = tiny_models["gpt_neox"]
    run = kvmem.profile(ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K,
                                      checkpoint_every=1e9), tmp_path / "run", model=model)
    ex = run.examples(2, 7, "top", before=4, after=2)
    assert len(ex) == K
    for row in ex.itertuples():
        assert row.context[row.at] == run.vocab[int(run.tokens.ids[row.index])]
        assert "⟦" + row.token + "⟧" in row.text
    docs = run.examples(2, 7, "top_docs")
    assert docs.doc.is_unique


def test_layers_subset_and_manifest(tmp_path, corpus, tiny_models):
    model = tiny_models["opt"]
    run = kvmem.profile(ProfileConfig(corpus=str(corpus), seq_len=SEQ, top_k=K, layers=(1,), tokens=100),
                        tmp_path / "run", model=model)
    m = run.manifest
    assert sorted(run.stats) == [1] and m["settings"]["layers"] == [1]
    assert m["corpus"]["n_tokens"] == 100 and not m["corpus"]["ran_out"]
    assert m["model"]["family"] == "opt" and m["time"]["tokens_per_second"] > 0
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert set(run.layers.layer) == {1}
