"""What the model saw before a stored token, for the analyses that re-run examples (lexical truncation, the
mutation test, the annotation export) and the next token after it (agreement).

Axes: a *global index* is a token's place in the run's whole token stream (kvmem.profile.tokens); a *prefix* is
the list of ids the model had in that token's input row up to and including the token (the BOS first where the
run's row layout prepends one). Batches of prefixes are right-padded: ``ids [b, L]``, ``mask [b, L]`` (False on
padding) and ``last [b]`` (the position of each prefix's last real token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvmem.profile.run import Run
from kvmem.profile.tokens import RowLayout, TokenStore

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


def layout_of(run: Run) -> RowLayout:
    """The run's row layout (kvmem.profile.tokens.RowLayout; runs of format <= 2 get the legacy stream rows)."""
    return run.layout


def n_bos(layout) -> int:
    """How many BOS tokens open a prefix of this layout (0 or 1)."""
    return 0 if layout.bos_id is None else 1


def next_in_doc(store: TokenStore, index: torch.Tensor) -> torch.Tensor:
    """The id of the token after each global index [...] in the same document; -1 where the index is -1, is the
    last token of its document, or the next token lies outside this store."""
    valid = index >= 0
    idx = torch.where(valid, index, torch.full_like(index, store.offset))
    local = idx - store.offset
    doc = store.local_doc_of(local)
    end = store.doc_offsets[(doc + 1).clamp(max=store.n_docs)]  # local index after the document's last token
    ok = valid & (local + 1 < end)
    nxt = store.ids.long()[(local + 1).clamp(max=store.n_tokens - 1)]
    return torch.where(ok, nxt, torch.full_like(nxt, -1))


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch of id lists: ids [b, L] int64, mask [b, L] bool, last [b] (last real position)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = True
    return ids, mask, mask.sum(1) - 1


def pad_id(model: KVModel) -> int:
    """The id padding positions carry (never attended to): the tokenizer's pad, else EOS, else 0."""
    tok = model.tokenizer
    for v in (tok.pad_token_id, tok.eos_token_id):
        if v is not None:
            return int(v)
    return 0


@torch.inference_mode()
def last_coef(model: KVModel, layer: int, seqs: list[list[int]], neurons: torch.Tensor,
              tokens_per_batch: int = 4096) -> torch.Tensor:
    """m of ``neurons`` [n] (one per sequence) at the last token of each of ``seqs`` (n id lists, each run alone
    with right padding and an attention mask), float32 [n]. Sequences are batched by length (about
    ``tokens_per_batch`` tokens per forward pass, stopped after ``layer``)."""
    from kvmem.capture import run_capture

    out = torch.empty(len(seqs), dtype=torch.float32)
    if not seqs:
        return out
    order = sorted(range(len(seqs)), key=lambda r: len(seqs[r]))
    p, start = pad_id(model), 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * len(seqs[order[stop]]) <= tokens_per_batch:
            stop += 1
        rows = order[start:stop]
        ids, mask, last = pad([seqs[r] for r in rows], p)
        dev = model.device
        cap = run_capture(model, ids.to(dev), [layer], attention_mask=mask.long().to(dev))
        coef = cap.coef[layer].float().cpu()  # [b, L, d_mlp]
        out[rows] = coef[torch.arange(len(rows)), last, neurons[rows]]
        start = stop
    return out
