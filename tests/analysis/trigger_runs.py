"""Test helpers for the trigger-based measures (agreement, lexical, mutation, annotation): small real runs of the
tiny models, and brute-force readers of a token store written with plain Python lists."""

from __future__ import annotations

import kvmem

SEQ, K = 32, 6
# name -> (family, shard, rows): document-aligned BOS rows (the tiny tokenizer has a BOS), a shard of them with
# offset > 0, and the legacy stream rows (no BOS, rows across documents)
RUNS = {"gpt2": ("gpt2", None, "doc"), "llama": ("llama", None, "doc"), "gpt2-shard": ("gpt2", "1/2", "doc"),
        "gpt2-stream": ("gpt2", None, "stream")}


def profiled(model, out, shard=None, rows="doc", n_tokens=640, seq_len=SEQ, top_k=K):
    """A real profile run of ``model`` over the first tokens of pydoc."""
    cfg = kvmem.ProfileConfig(corpus="pydoc", tokens=n_tokens, seq_len=seq_len, top_k=top_k, batch_size=4,
                              checkpoint_every=1e9, shard=shard, rows=rows)
    return kvmem.profile(cfg, out, model=model)


def make_runs(tiny_models, root, runs=RUNS):
    return {name: profiled(tiny_models[fam], root / name, shard, rows) for name, (fam, shard, rows) in runs.items()}


def brute_doc(i, store):
    """(local start, local end) of the document holding global index i."""
    off = store.doc_offsets.tolist()
    x = i - store.offset
    d = max(j for j in range(len(off) - 1) if off[j] <= x)
    return off[d], off[d + 1]


def brute_next(i, store):
    """The token after global index i in its document, or None."""
    ids = store.ids.tolist()
    x = i - store.offset
    _, end = brute_doc(i, store)
    return ids[x + 1] if x + 1 < end else None


def brute_doc_id(i, store):
    off = store.doc_offsets.tolist()
    x = i - store.offset
    return store.doc_base + max(j for j in range(len(off) - 1) if off[j] <= x)
