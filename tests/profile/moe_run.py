"""A synthetic run folder with one dense and one mixture-of-experts layer, written by the run's own writer
(kvmem.profile.job.finalize) from statistics fed with the synthetic MoE stream of tests/stats/moe_reference.py:
the run side (schema, open_run, report) tested without a model. Every token of the corpus is a hostile HTML string."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from kvmem.profile.job import finalize
from kvmem.profile.runner import ProfileConfig
from kvmem.profile.tokens import RowLayout, TokenStore
from kvmem.stats import LayerStats
from tests.stats.moe_reference import D, E, EXPERT_OF, MoEStream, make_moe_stream

HOSTILE = ["<script>window.__pwned=1</script>", "&amp;", "\"onmouseover=\"x", "<b>bold</b>"]
VOCAB = HOSTILE + [f"tok{i}" for i in range(36)]
N, SEQ, DENSE_D, K = 300, 16, 8, 6
DENSE_LAYER, MOE_LAYER = 0, 1


def synthetic_moe_run(out: Path, lo: int = 0, hi: int = N, gated: bool = False):
    """(run, stream): the run opened with kvmem.open_run, and the MoE layer's MoEStream (token i = index i).
    lo, hi: a shard of the stream, local tokens [lo, hi) (cut at a document boundary), as kvmem profile
    --shard writes it. gated: the dense layer is a gated FFN (m = silu(gate)·up; the model then "gated")."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, len(HOSTILE), (N,), generator=g, dtype=torch.int64).to(torch.int32)  # all hostile
    offsets = torch.tensor([0, 40, 41, 130, 200, N], dtype=torch.int64)
    whole = TokenStore(ids, offsets)
    store = whole if (lo, hi) == (0, N) else whole.slice_tokens(lo, hi)
    layout = RowLayout.build(whole, SEQ, None, doc_rows=True, skip_first=False)
    index = torch.arange(N)
    st = make_moe_stream(seed=12, n=N, max_pos=SEQ)
    st = MoEStream(st.m, index, whole.doc_of(index), layout.position(index), st.logits, st.idx, st.weight,
                   [0, 37, 150, N])
    dense_m = torch.randn(N, DENSE_D, generator=g)
    dense = LayerStats(DENSE_D, k=K, max_pos=SEQ, gated=gated)
    gate = up = None
    if gated:
        gate, up = dense_m[lo:hi], torch.randn(N, DENSE_D, generator=g)[lo:hi]
        dense_m = torch.cat([dense_m[:lo], torch.nn.functional.silu(gate) * up, dense_m[hi:]])
    dense.update(dense_m[lo:hi], st.ti[lo:hi], st.doc[lo:hi], st.pos[lo:hi], gate=gate, up=up)
    moe = st.feed(LayerStats(D, k=K, max_pos=SEQ, n_experts=E, expert_of=EXPERT_OF), lo, hi)
    meta = {"model": "synthetic-moe", "source": "tests", "family": "synthetic", "model_type": "synthetic",
            "n_layers": 2, "d_model": 4, "d_mlp": D, "d_vocab": len(VOCAB), "activation": "silu", "gated": gated,
            "fingerprint": "0", "dtype": "float32", "device": "cpu"}
    cfg = ProfileConfig(model="synthetic-moe", corpus="synthetic", seq_len=SEQ, top_k=K, bos="none", skip_first=False)
    settings = asdict(cfg) | {"layers": [DENSE_LAYER, MOE_LAYER], "batch_size": 4, "bos_id": None}
    corpus = {"source": "synthetic", "description": "random ids", "n_docs": store.n_docs, "invalid_utf8_docs": 0,
              "ran_out": False}
    run = finalize(meta, settings, store, {DENSE_LAYER: dense, MOE_LAYER: moe}, corpus, Path(out), 1.0,
                   vocab=VOCAB, layout=RowLayout.build(store, SEQ, None, doc_rows=True, skip_first=False).settings())
    run.dense_gate_up = (gate, up)  # the gated dense layer's inputs (tests)
    return run, st
