"""Composition (Geva et al. 2021 section 6; 2022): is the FFN's prediction more than its biggest memories'?

For every token of the sample and every layer, with m [N, d_mlp] and u = m·W_out [N, d_model] (the
update without b_out), projected with the raw unembedding (no final norm, as Geva et al.):
  ffn_top      argmax(u·W_U): the token the layer's FFN update predicts
  sub-update i writes m_i·v_i; its top token is argmax(v_i·W_U) if m_i > 0, argmin if m_i < 0
  novel_top10  share of tokens where none of the 10 largest sub-updates (by |m_i|·‖v_i‖) has ffn_top as
               its top token: the layer's prediction is a composition, not one memory's
  novel_all    the same against every sub-update with m_i != 0
  top1_agrees  share where the single largest sub-update's top token is ffn_top
  chance_top10 the baseline of novel_top10: 1 - (mean number of distinct top tokens among the 10
               sub-updates) / d_vocab, the share a uniformly random token would give
Residual stream (logit lens through the final norm): r = the block output, r - FFN output = the stream
the FFN saw; top(r - out) versus top(r):
  keep         same top token
  promotion    top changed and the new top is ffn_top (the FFN pushed its own token up)
  elimination  top changed to a token that is not ffn_top (the old top was pushed down)
"""

from __future__ import annotations

import pandas as pd
import torch

from kvmem.analysis.common import Sample, batches
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import capture, check_layers

TOP_SUB = 10


def value_top_tokens(model, layers, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax and argmin of v_i·W_U for every neuron: [n_layers, d_mlp] each (rows of unlisted layers: -1)."""
    from kvmem.vocab import compute_projection, project_values

    if cache:
        p = project_values(model, k=10, cache=True)  # the k agreement uses: one cached projection serves both
        return p["top_ids"][..., 0].to(model.device), p["bottom_ids"][..., 0].to(model.device)
    t = compute_projection(model, k=1, layers=layers)
    top = torch.full((model.n_layers, model.d_mlp), -1, dtype=torch.long)
    bottom = top.clone()
    top[layers], bottom[layers] = t["top_ids"][..., 0], t["bottom_ids"][..., 0]
    return top.to(model.device), bottom.to(model.device)


def _blocks_output(model, layers, kept):
    blocks = model.adapter.blocks()

    def hook(i):
        def f(mod, args, out):
            kept[i] = (out[0] if isinstance(out, tuple) else out).detach()
        return f

    return [blocks[i].register_forward_hook(hook(i)) for i in layers]


@torch.inference_mode()
def composition(model, sample: Sample, layers=None, *, cache: bool = True, tokens_per_batch: int = 1024,
                progress=None) -> AnalysisResult:
    """Per-layer composition and residual-stream shares over every token of the sample (see module doc)."""
    layers = check_layers(model, layers)
    top1, bottom1 = value_top_tokens(model, layers, cache)
    W_U, d = model.W_U, model.d_mlp
    keys = ("novel_top10", "novel_all", "top1_agrees", "distinct_top10", "keep", "promotion", "elimination")
    acc = {layer: dict.fromkeys(keys, 0.0) for layer in layers}
    n_tok = 0
    for rows in batches(sample, model.device, tokens_per_batch):
        kept: dict[int, torch.Tensor] = {}
        handles = _blocks_output(model, layers, kept)
        try:
            with capture(model, layers, ("coef", "out"), stop=False) as cap:  # block outputs needed
                model.hf(input_ids=rows, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        n_tok += rows.numel()
        for layer in layers:
            lay = model.layers[layer]
            m = cap.coef[layer].reshape(-1, d)
            out = cap["out"][layer].reshape(-1, model.d_model)
            post = kept[layer].reshape(-1, model.d_model)
            ffn_top = ((m @ lay.W_out) @ W_U).argmax(-1)  # [N]
            sub_tok = torch.where(m > 0, top1[layer], bottom1[layer])  # [N, d]
            hit = (sub_tok == ffn_top[:, None]) & (m != 0)
            contrib = m.float().abs() * model.value_norms(layer).to(m.device)
            big = contrib.topk(min(TOP_SUB, d), dim=1).indices
            big_tok = sub_tok.gather(1, big)
            distinct = (big_tok.sort(1).values.diff(dim=1) != 0).sum(1) + 1
            a = acc[layer]
            a["novel_top10"] += float((~hit.gather(1, big).any(1)).sum())
            a["novel_all"] += float((~hit.any(1)).sum())
            a["top1_agrees"] += float((big_tok[:, 0] == ffn_top).sum())
            a["distinct_top10"] += float(distinct.sum())
            norm = model.final_norm
            top_post = (norm(post) @ W_U).argmax(-1)
            top_mid = (norm(post - out) @ W_U).argmax(-1)
            same = top_post == top_mid
            a["keep"] += float(same.sum())
            a["promotion"] += float((~same & (top_post == ffn_top)).sum())
            a["elimination"] += float((~same & (top_post != ffn_top)).sum())
        if progress is not None:
            progress(f"composition {n_tok} tokens")
    rows_out = []
    for layer in layers:
        a = {k: v / n_tok for k, v in acc[layer].items()}
        a["chance_top10"] = 1 - a.pop("distinct_top10") / model.d_vocab
        rows_out.append({"layer": layer, "n_tokens": n_tok, **a})
    meta = {"n_tokens": n_tok, "sample": sample.source, "top_sub_updates": TOP_SUB,
            "projection": "raw W_U for the FFN update and sub-updates (no final norm, no b_out); "
                          "final norm + W_U for the residual stream",
            "baseline": "chance_top10: share of tokens a random token would leave unpredicted by the top-10 "
                        "sub-updates; keep/promotion/elimination sum to 1"}
    return AnalysisResult("composition", {"layers": pd.DataFrame(rows_out)}, meta)
