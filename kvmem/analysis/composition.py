"""Composition (Geva et al. 2021 §5; 2022 §4): how an FFN layer's update relates to its memories and to
the residual stream, per token and layer, with cluster-bootstrap intervals over documents.

One readout for every comparison (kvmem.analysis.readout): the float32 logit lens through the final
norm. Per counted token t of the sample and layer l, with r the residual stream the FFN reads into
(block output minus FFN output), o = m·W_out + b_out the FFN update and x = r + o the block output:
  top_r, top_o, top_x   top tokens of logits(r), logits(o), logits(x)
  final                 the model's own next-token prediction (argmax of its logits)
  sub-update i          m_i·v_i; its top token is that of logits(sign(m_i)·v_i)
  active                |m_i| > tau · max|m_i| (the neuron's max |m| over the sample's counted tokens;
                        magnitude, both signs: SwiGLU coefficients are sign-symmetric)

Per-token columns (``units``: one row per (layer, token), 0/1 or float, NaN = not counted):
  Geva 2021 §5.2, Fig. 11 -- the four cases (they sum to 1):
    case_residual     top_x = top_r != top_o
    case_ffn          top_x = top_o != top_r
    case_agreement    top_x = top_r = top_o
    case_composition  top_x differs from top_r and from top_o
    changed           top_x != top_r
    changed_to_ffn    top_x = top_o, among changed tokens (NaN where unchanged): the paper finds it rare
  Geva 2021 §5.1 -- composition:
    novel_active      top_o is the top token of no active memory (paper: >= 68% in every layer)
    novel_paired      baseline: the same test against the active memories of a random other token of the
                      same batch (a derangement); novel_active well below it = memories do predict the layer
    novel_top10       top_o is the top token of none of the 10 dominant sub-updates
    n_active          number of active memories (float)
  Geva 2021 Figs. 9-10:
    resid_is_final    top_r = final
    resid_top_prob    probability of top_r under logits(r)
    resid_final_prob  probability of final under logits(r)
  Geva 2022 -- dominant sub-updates (top 10 by |m_i|·‖v_i‖) versus 10 random active ones (NaN for tokens
  with fewer than 10 active memories):
    dom_has_top, rand_has_top          one of the 10 has top_o as its top token
    dom_top_share, rand_top_share      share of the 10 whose top token is top_o
    dom_logit, rand_logit              their summed contribution to logits(o)[top_o] (exact additive split
                                       of the normalised update, see readout.py)
    dom_logit_share, rand_logit_share  the same over the update's own logit (logits(o)[top_o] minus the
                                       norm bias' and LM-head bias' constant part)
    saturation        top_x = top_r and its probability rises from logits(r) to logits(x)
    elimination       top_x != top_r and top_r's probability falls (the residual's top is pushed out)
The ``layers`` table has one row per layer: for each column c above, c, c_lo, c_hi (95% cluster
bootstrap over documents, kvmem.analysis.ci) and n_c; n_tokens, n_docs.
"""

from __future__ import annotations

import pandas as pd
import torch

from kvmem.analysis import ci
from kvmem.analysis.common import Sample, derangement, forward, row_batches
from kvmem.analysis.readout import READOUT, Readout
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import check_layers
from kvmem.errors import KvmemError
from kvmem.hooks import hooks, record
from kvmem.models.kvmodel import KVModel

TOP_SUB = 10  # dominant sub-updates (Geva 2022) and the random active ones compared with them
TAU = 0.1  # active: |m| > TAU · the neuron's max |m| over the sample
CASES = ("case_residual", "case_ffn", "case_agreement", "case_composition", "changed", "changed_to_ffn")
COMPOSITION = ("novel_active", "novel_paired", "novel_top10", "n_active")
RESIDUAL = ("resid_is_final", "resid_top_prob", "resid_final_prob")
SUBUPDATES = ("dom_has_top", "rand_has_top", "dom_top_share", "rand_top_share", "dom_logit", "rand_logit",
              "dom_logit_share", "rand_logit_share", "saturation", "elimination")
COLUMNS = CASES + COMPOSITION + RESIDUAL + SUBUPDATES


def _forward(model, layers, part):
    """One forward pass on the hook layer: {(point, layer): [b, L, ·]} for ffn.coef, ffn.out and resid.post
    of every layer, and the model's logits [b, L, d_vocab]."""
    kept: dict = {}
    points = [(name, layer) for layer in layers for name in ("ffn.coef", "ffn.out", "resid.post")]
    with hooks(model, record(points, kept)):
        logits = forward(model, part).logits
    return kept, logits


@torch.inference_mode()
def max_abs_coef(model: KVModel, sample: Sample, layers, tokens_per_batch: int = 1024) -> dict[int, torch.Tensor]:
    """max |m_i| over the sample's counted tokens, per layer [d_mlp] float32 (the activity threshold's scale)."""
    out: dict[int, torch.Tensor] = {}
    for part in row_batches(sample, model.device, tokens_per_batch):
        if not part.counted.any():
            continue
        kept: dict = {}
        with hooks(model, record([("ffn.coef", layer) for layer in layers], kept), stop_after=True):
            forward(model, part)
        for layer in layers:
            m = kept[("ffn.coef", layer)][part.counted].abs().float().amax(0)
            out[layer] = m if layer not in out else torch.maximum(out[layer], m)
    return out


def _layer_units(rd: Readout, lay, tops, W, m, y, x, final, maxabs, tau, gen, norms) -> dict[str, torch.Tensor]:
    """Per-token columns of one layer for N counted tokens: m [N, d_mlp], the FFN output y and the block
    output x [N, d_model], final [N]; W [d_mlp, d_model] the written value vectors (FFNLayer)."""
    N, d = m.shape
    nan = torch.full((N,), float("nan"), device=m.device)
    s = lay.norm_scale(y) if lay.post_norm is not None else torch.ones(N, 1, device=m.device)  # [N, 1]
    o = lay.write(m, y)  # what the layer adds to the residual stream (= y, times Granite's multiplier, ...)
    x = x.float()
    r = x - o
    Lr, Lx = rd.logits(r), rd.logits(x)
    Lo = rd.raw(o)
    top_r, top_o, top_x = Lr.argmax(-1), Lo.argmax(-1), Lx.argmax(-1)
    pr, px = Lr.softmax(-1), Lx.softmax(-1)  # through the model's logit transform
    f = lambda b: b.float()  # noqa: E731
    u = {"case_residual": f((top_x == top_r) & (top_x != top_o)), "case_ffn": f((top_x == top_o) & (top_x != top_r)),
         "case_agreement": f((top_x == top_r) & (top_x == top_o)),
         "case_composition": f((top_x != top_r) & (top_x != top_o))}
    changed = top_x != top_r
    u["changed"] = f(changed)
    u["changed_to_ffn"] = torch.where(changed, f(top_x == top_o), nan)
    # §5.1: the layer prediction against the active memories' top tokens
    sub_tok = torch.where(m > 0, tops[0][None, :], tops[1][None, :])  # [N, d_mlp]
    active = m.abs().float() > tau * maxabs[None, :]
    hit = sub_tok == top_o[:, None]
    u["novel_active"] = f(~(hit & active).any(1))
    u["n_active"] = f(active.sum(1))
    if N >= 2:
        perm = derangement(N, gen).to(m.device)
        u["novel_paired"] = f(~((sub_tok[perm] == top_o[:, None]) & active[perm]).any(1))
    else:
        u["novel_paired"] = nan
    # Geva 2022: dominant versus random active sub-updates
    k = min(TOP_SUB, d)
    big = (m.abs().float() * norms[None, :]).topk(k, dim=1).indices  # [N, k]
    score = torch.rand(N, d, generator=gen).to(m.device).masked_fill(~active, -1.0)
    rnd = score.topk(k, dim=1).indices
    u["novel_top10"] = f(~hit.gather(1, big).any(1))
    enough = active.sum(1) >= k
    A = (rd.linear(W) @ rd.W_U[:, top_o]).T  # [N, d_mlp]: g(w_i)·U[:, top_o]
    c = (rd.kappa(o)[:, None] * s) * m.float() * A  # contribution of each sub-update m_i·w_i·s to raw(o)[top_o]
    own = Lo.gather(1, top_o[:, None])[:, 0] - rd.mean_beta[top_o]
    for name, idx, ok in (("dom", big, torch.ones_like(enough)), ("rand", rnd, enough)):
        h = hit.gather(1, idx)
        logit = c.gather(1, idx).sum(1)
        u[f"{name}_has_top"] = torch.where(ok, f(h.any(1)), nan)
        u[f"{name}_top_share"] = torch.where(ok, f(h).mean(1), nan)
        u[f"{name}_logit"] = torch.where(ok, logit, nan)
        u[f"{name}_logit_share"] = torch.where(ok & (own != 0), logit / own, nan)
    p_r_top, p_x_top = pr.gather(1, top_r[:, None])[:, 0], px.gather(1, top_r[:, None])[:, 0]
    u["saturation"] = f(~changed & (p_x_top > p_r_top))
    u["elimination"] = f(changed & (p_x_top < p_r_top))
    u["resid_is_final"] = f(top_r == final)
    u["resid_top_prob"] = p_r_top
    u["resid_final_prob"] = pr.gather(1, final[:, None])[:, 0]
    return u


def _value_tops(model, rd: Readout, layers, W: dict, cache: bool) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, each neuron's sub-update top token for m > 0 and m < 0 ([d_mlp] int64 each), from the written
    value vectors W[layer]. With ``cache``, a symmetric readout (no norm or head bias) and no post-FFN norm
    (w_i a positive multiple of v_i) they are the through-norm projection's top and bottom ids (kvmem.vocab's
    disk cache, computed once per model); otherwise computed here."""
    plain = all(model.layers[layer].post_norm is None and model.layers[layer].write_scale > 0 for layer in layers)
    if cache and rd.symmetric and plain:
        from kvmem.vocab import project_values

        p = project_values(model, k=10, through_norm=True, cache=True)
        return {layer: (p["top_ids"][layer, :p.width(layer), 0].to(model.device),
                       p["bottom_ids"][layer, :p.width(layer), 0].to(model.device))
                for layer in layers}
    return {layer: rd.value_tops(W[layer]) for layer in layers}


@torch.inference_mode()
def composition(model: KVModel, sample: Sample, layers=None, *, cache: bool = True, tokens_per_batch: int = 1024,
                tau: float = TAU, seed: int = 0, max_abs: dict | None = None, n_boot: int = ci.N_BOOT,
                progress=None) -> AnalysisResult:
    """Per-layer shares of the columns in the module docstring, over the sample's counted tokens.
    ``max_abs`` {layer: [d_mlp]} sets the activity scale (default: max |m| over the sample itself, one extra
    forward pass). ``cache``: read the sub-updates' top tokens from kvmem.vocab's projection cache where the
    readout allows (no norm or head bias)."""
    layers = check_layers(model, layers)
    if not 0 <= tau < 1:
        raise KvmemError(f"tau must be in [0, 1), got {tau}")
    refused = [layer for layer in layers if model.layers[layer].post_norm_reads_residual]
    if refused:
        raise KvmemError(f"layer {refused[0]}'s post-norm reads the residual stream (OPT post-LN): the block output "
                         "is no sum of residual and FFN update, so the composition measures do not apply")
    rd = Readout(model)
    if max_abs is None:
        max_abs = max_abs_coef(model, sample, layers, tokens_per_batch)
    if not max_abs:
        raise KvmemError("the sample has no counted token")
    W = {layer: model.layers[layer].value_vectors_written().to(model.device) for layer in layers}
    tops = _value_tops(model, rd, layers, W, cache)
    norms = {layer: W[layer].norm(dim=1) for layer in layers}
    gen = torch.Generator().manual_seed(seed)
    frames, n_tok = [], 0
    for part in row_batches(sample, model.device, tokens_per_batch):
        counted = part.counted
        if not counted.any():
            continue
        kept, logits = _forward(model, layers, part)
        final = logits.float().masked_fill(~rd.defined, float("-inf"))[counted].argmax(-1)
        where = counted.nonzero()
        n_tok += int(counted.sum())
        for layer in layers:
            got = [kept[(name, layer)][counted] for name in ("ffn.coef", "ffn.out", "resid.post")]
            u = _layer_units(rd, model.layers[layer], tops[layer], W[layer], *got, final,
                             max_abs[layer].to(model.device), tau, gen, norms[layer])
            frame = pd.DataFrame({k: v.double().cpu().numpy() for k, v in u.items()})
            frame.insert(0, "layer", layer)
            frame.insert(1, "doc", part.doc[counted].cpu().numpy())
            frame.insert(2, "index", part.index[counted].cpu().numpy())
            frame.insert(3, "pos", where[:, 1].cpu().numpy())
            frames.append(frame)
        if progress is not None:
            progress(f"composition {n_tok} tokens")
    if not frames:
        raise KvmemError("the sample has no counted token")
    units = pd.concat(frames, ignore_index=True)
    table = ci.bootstrap(units, list(COLUMNS), by="layer", n_boot=n_boot, seed=seed)
    table = table.rename(columns={"n_units": "n_tokens", "n_clusters": "n_docs"})
    meta = {"n_tokens": n_tok, "n_docs": int(units.doc.nunique()), "sample": sample.source,
            "readout": READOUT, "top_sub_updates": TOP_SUB, "tau": tau, "seed": seed, "n_boot": n_boot,
            "active": f"|m_i| > {tau} x the neuron's max |m| over the sample's counted tokens (both signs)",
            "ffn_update": "o = what the layer writes into the residual stream (FFNLayer.write: m·W_out + b_out, "
                          "through a post-FFN norm and residual multiplier where the family has them), so block "
                          "output = residual + o exactly; sub-updates are the m_i·w_i·s terms, b_out is no memory",
            "dominant": f"the {TOP_SUB} sub-updates with the largest |m_i|·‖w_i‖ (w_i the written value vector)",
            "cluster": "doc (global document id; the row number for a bare id stream)",
            "baseline": "novel_paired: novel_active against the active memories of a random other token of the "
                        "same batch (derangement, seeded); rand_*: 10 random active sub-updates",
            "paper": {"novel_active": "Geva 2021 §5.1: >= 0.68 in every layer",
                      "changed_to_ffn": "Geva 2021 §5.2, Fig. 11: rare",
                      "cases": "Geva 2021 §5.2, Fig. 11: residual most frequent, composition next"},
            "columns": list(COLUMNS)}
    return AnalysisResult("composition", {"layers": table, "units": units}, meta)
