"""Routing rules of the MoE families: ``route(logits [N, E], x [N, d_model]) -> (idx [N, k] long, weight [N, k])``,
the ``route_fn`` of a kvmem.models.moe.MoELayer. A logit of -inf never routes (whole-expert ablation)."""

from __future__ import annotations

import torch
from torch import nn

from kvmem.models.moe import Route


def softmax_topk(top_k: int, normalize: bool, cast: bool) -> Route:
    """Mixtral (normalize=True, weights float32), Qwen2/3-MoE and OLMoE (normalize=norm_topk_prob, weights cast
    to the logits' dtype): softmax over all experts in float32, top-k, optionally renormalised."""
    def route(logits, x):
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, top_k, dim=-1)
        if normalize:
            top = top / top.sum(-1, keepdim=True)
        return idx, (top.to(logits.dtype) if cast else top)
    return route


def topk_softmax(top_k: int) -> Route:
    """GPT-OSS: top-k of the logits, then a softmax over those k (in the logits' dtype)."""
    def route(logits, x):
        top, idx = torch.topk(logits, top_k, dim=-1)
        return idx, torch.softmax(top, dim=-1, dtype=top.dtype)
    return route


def grouped_sigmoid(router: nn.Module, top_k: int, n_group: int, topk_group: int, normalize: bool,
                    scaling: float) -> Route:
    """DeepSeek-V3: scores = sigmoid(logits); choice by scores + e_score_correction_bias, restricted to the
    topk_group groups (of n_group) with the largest sum of their two best choice scores; weights = the chosen
    scores, renormalised when norm_topk_prob, times routed_scaling_factor. A logit of -inf is never chosen
    (sigmoid would give it score 0, which the correction bias could still lift above others)."""
    def route(logits, x):
        logits = logits.float()
        n = logits.shape[-1]
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias.float()
        choice = choice.masked_fill(torch.isneginf(logits), float("-inf"))
        groups = choice.view(-1, n_group, n // n_group).topk(2, dim=-1)[0].sum(-1)
        gidx = torch.topk(groups, k=topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(groups).scatter_(1, gidx, 1)
        mask = gmask.unsqueeze(-1).expand(-1, n_group, n // n_group).reshape(-1, n)
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if normalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * scaling
    return route
