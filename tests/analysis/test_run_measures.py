"""Runs profiled from the tiny models (one of them a shard of its stream): their top stores against a plain top-k
over captured coefficients. The agreement and lexical brute-force tests that lived here moved to
tests/analysis/test_agreement.py and test_lexical.py (per-document triggers, a trigger at a document end excluded
rather than counted as a miss -- issue 12 defect 10 --, truncation through the run's row layout with BOS)."""

import pytest
import torch

import kvmem
from kvmem.capture import run_capture

SEQ, K = 32, 6
RUNS = {"gpt2": ("gpt2", None), "llama": ("llama", None), "gpt2-shard": ("gpt2", "1/2")}


@pytest.mark.parametrize("name", list(RUNS))
def test_top_store_matches_brute_force(tiny_models, tmp_path, name):
    family, shard = RUNS[name]
    model = tiny_models[family]
    cfg = kvmem.ProfileConfig(corpus="pydoc", tokens=640, seq_len=SEQ, top_k=K, batch_size=4,
                              checkpoint_every=1e9, shard=shard)
    run = kvmem.profile(cfg, tmp_path / name, model=model)
    store, layout = run.tokens, run.layout
    assert (store.offset > 0) == (shard is not None)
    b = layout.batch(store, torch.arange(layout.n_rows))
    cap = run_capture(model, b.ids, attention_mask=b.mask.long())
    index = b.index[b.counted]  # global index of every counted position
    for layer in run.profiled_layers:
        m = cap.coef[layer][b.counted]  # [counted tokens, neuron]
        top = run.stats[layer].top
        want = m.topk(K, dim=0).values.T
        assert torch.allclose(top.value, want, rtol=1e-4, atol=1e-5)
        where = {int(g): t for t, g in enumerate(index.tolist())}
        got = torch.stack([m[[where[int(g)] for g in row], i] for i, row in enumerate(top.index.tolist())])
        assert torch.allclose(got, top.value, rtol=1e-4, atol=1e-5)
