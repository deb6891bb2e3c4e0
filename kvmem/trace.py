"""What each FFN does to one prediction, layer by layer: ``trace(model, prompt)``.

One forward pass records, at one position, the FFN coefficients m [d_mlp] and output [d_model]
of every layer and the residual stream after every decoder block (the hook points ffn.coef,
ffn.out and resid.post of ``kvmem.hooks``). Every supported family adds the FFN output to the
residual stream inside the block, so
    resid_after[l]  = the output of block l                                  [d_model]
    resid_before[l] = resid_after[l] - ffn_out[l]                            [d_model]
i.e. the stream the FFN's update is added to (the stream after attention; for GPT-NeoX with a
parallel residual it is h + attn(h), the FFN having read norm(h) in parallel).

Logit lens: final_norm(resid) @ W_U (+ LM-head bias): the tokens the stream would predict if the
model stopped there. After the last block this is exactly the model's own logits.

Direct logit attribution (DLA): the final norm is linearised with its scale frozen at the final
residual h (the one the model actually predicts from):
    RMSNorm    f(c) = w ⊙ c / sqrt(mean(h²) + eps)            (Gemma: (1 + w))
    LayerNorm  f(c) = γ ⊙ (c - mean(c)) / sqrt(var(h) + eps)
so f is linear, f(h) + β = final_norm(h), and a component c of the stream (an FFN output, or a
neuron's sub-update m_i·v_i) adds f(c)·W_U[:, t] to token t's final logit. The approximation:
it ignores how removing c would change the norm's scale and everything later layers compute
from c (``kvmem.intervene`` measures the real effect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from torch import nn

from kvmem.errors import KvmemError
from kvmem.hooks import hooks, record
from kvmem.query import resolve_position
from kvmem.vocab import vocab_strings


def frozen_norm(model, h: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The final norm as a linear map with its scale frozen at the residual h [d_model]:
    c [..., d_model] -> f(c) [..., d_model] float32 (see the module docstring)."""
    norm = model.final_norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise KvmemError(f"kvmem does not know how to linearise a {type(norm).__name__} final norm")
    centered = isinstance(norm, nn.LayerNorm)
    beta = norm.bias.float() if centered and norm.bias is not None else None

    def scale(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if centered:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    s_h = scale(h)

    def f(c: torch.Tensor) -> torch.Tensor:
        # norm(c) = (c ⊙ w) / scale(c) [+ β]  =>  c ⊙ w / scale(h) = (norm(c) - β) · scale(c) / scale(h)
        out = norm(c.to(model.dtype)).float()
        if beta is not None:
            out = out - beta
        return out * (scale(c) / s_h)

    return f


def lens_logits(model, resid: torch.Tensor) -> torch.Tensor:
    """Logit lens: final_norm(resid) @ W_U (+ LM-head bias), [..., d_vocab] float32."""
    logits = (model.final_norm(resid.to(model.dtype)) @ model.W_U).float()
    b_U = model.adapter.b_U
    return logits if b_U is None else logits + b_U.float()


def _to_vocab(model, x: torch.Tensor) -> torch.Tensor:
    """x [..., d_model] @ W_U in the model's dtype (no float32 copy of W_U), as float32 [..., d_vocab]."""
    return (x.to(model.dtype) @ model.W_U).float()


@dataclass
class TraceResult:
    prompt: str
    tokens: list[str]
    position: int
    target: str  # the token traced (default: the model's top prediction)
    target_id: int
    top_n: int  # "top" means among the top_n tokens of a lens
    prediction: pd.DataFrame  # token, id, prob, logit: the model's next-token distribution, top rows
    # layer; before_tokens / after_tokens (lens top tokens of the stream before / after the FFN);
    # target_rank_before/_after (1-based), target_prob_before/_after; ffn_dla (the FFN output's DLA on
    # the target's logit); ffn_tokens (the tokens the FFN output's DLA promotes most); neurons / neuron_dla
    # (the layer's neurons with the largest DLA on the target, and those DLAs)
    layers: pd.DataFrame
    # over all layers, by DLA on the target: id, layer, neuron, coef (m_i), dla (m_i·f(v_i)·W_U[:, t]),
    # tokens (what sign(m_i)·v_i promotes, through the frozen norm)
    neurons: pd.DataFrame
    first_top: dict | None  # where the target first enters the lens' top_n: {"layer", "after": "attention"|"ffn"}
    stays_top: dict | None  # the checkpoint from which it stays in the top_n to the end

    def to_dict(self) -> dict:
        d = {key: getattr(self, key) for key in ("prompt", "tokens", "position", "target", "target_id", "top_n",
                                                 "first_top", "stays_top")}
        for key in ("prediction", "layers", "neurons"):
            d[key] = getattr(self, key).to_dict(orient="records")
        return d


def resolve_target(model, target: str | int | None, logits: torch.Tensor) -> int:
    if target is None:
        return int(logits.argmax())
    if isinstance(target, int):
        if not 0 <= target < model.d_vocab:
            raise KvmemError(f"target id {target} out of range (0..{model.d_vocab - 1})")
        return target
    if not target:
        raise KvmemError("the target token is empty")
    ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise KvmemError(f"the target {target!r} is {len(ids)} tokens {model.token_strings(ids)}; give a single token")
    return ids[0]


def run_residuals(model, ids: torch.Tensor, pos: int):
    """One forward pass: (logits [d_vocab], coef [n_layers, d_mlp], ffn_out [n_layers, d_model],
    resid_after [n_layers, d_model]) at position ``pos``, read at the hook points ffn.coef, ffn.out and
    resid.post (kvmem.hooks); all hooks removed afterwards."""
    layers = range(model.n_layers)
    got: dict = {}
    keep = lambda name: [(name, i) for i in layers]  # noqa: E731
    with torch.inference_mode(), hooks(model, record(keep("ffn.coef") + keep("ffn.out") + keep("resid.post"), got)):
        logits = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    coef, out, after = (torch.stack([got[(name, i)][0, pos] for i in layers])
                        for name in ("ffn.coef", "ffn.out", "resid.post"))
    return logits, coef, out, after


@torch.inference_mode()
def trace(model, prompt: str, *, position: int = -1, target: str | int | None = None, top_n: int = 5,
          per_layer: int = 3, n_neurons: int = 10, n_tokens: int = 5) -> TraceResult:
    """Layer by layer at one position: what each FFN's update promotes, the logit lens before and
    after it, and the neurons whose sub-updates add most to the target's final logit (DLA)."""
    if min(top_n, per_layer, n_neurons, n_tokens) < 1:
        raise KvmemError("--top, --per-layer, --neurons and --tokens must be at least 1")
    ids = model.encode(prompt)
    pos = resolve_position(position, ids.shape[1])
    logits, coef, ffn_out, after = run_residuals(model, ids, pos)
    t = resolve_target(model, target, logits)
    before = after - ffn_out
    n_layers, strings = model.n_layers, vocab_strings(model)
    k = min(max(top_n, n_tokens), model.d_vocab)

    lens = lens_logits(model, torch.stack([before, after]))  # [2, n_layers, d_vocab]
    probs = lens.softmax(-1)
    rank = (lens > lens[..., t : t + 1]).sum(-1) + 1  # [2, n_layers]
    lens_top = lens.topk(k, dim=-1).indices.cpu().numpy()

    f = frozen_norm(model, after[-1])
    u = model.W_U[:, t].float()
    ffn_dla = _to_vocab(model, f(ffn_out))  # [n_layers, d_vocab]
    ffn_top = ffn_dla.topk(k, dim=-1).indices.cpu().numpy()
    # per-neuron DLA on the target: m_i · f(v_i)·u, one [d_mlp, d_model] map per layer
    neuron_dla = torch.stack([coef[i].float() * (f(model.layers[i].W_out) @ u) for i in range(n_layers)])
    layer_best = neuron_dla.topk(min(per_layer, model.d_mlp), dim=-1)

    layers = pd.DataFrame({
        "layer": list(range(n_layers)),
        "before_tokens": [list(strings[r[:top_n]]) for r in lens_top[0]],
        "after_tokens": [list(strings[r[:top_n]]) for r in lens_top[1]],
        "target_rank_before": rank[0].cpu().tolist(),
        "target_rank_after": rank[1].cpu().tolist(),
        "target_prob_before": probs[0, :, t].cpu().tolist(),
        "target_prob_after": probs[1, :, t].cpu().tolist(),
        "ffn_dla": ffn_dla[:, t].cpu().tolist(),
        "ffn_tokens": [list(strings[r[:n_tokens]]) for r in ffn_top],
        "neurons": [[f"{i}.{n}" for n in row] for i, row in enumerate(layer_best.indices.cpu().tolist())],
        "neuron_dla": layer_best.values.cpu().tolist(),
    })

    best = neuron_dla.flatten().topk(min(n_neurons, neuron_dla.numel()))
    pairs = [divmod(i, model.d_mlp) for i in best.indices.cpu().tolist()]
    m = torch.stack([coef[a, b] for a, b in pairs]).float()
    v = torch.stack([model.layers[a].W_out[b] for a, b in pairs]).float() * torch.sign(m)[:, None]
    written = _to_vocab(model, f(v)).topk(n_tokens, dim=-1).indices.cpu().numpy()
    neurons = pd.DataFrame({
        "id": [f"{a}.{b}" for a, b in pairs],
        "layer": [a for a, _ in pairs],
        "neuron": [b for _, b in pairs],
        "coef": m.cpu().tolist(),
        "dla": best.values.cpu().tolist(),
        "tokens": [list(strings[r]) for r in written],
    })

    p = logits.softmax(-1)
    nxt = p.topk(min(n_tokens, model.d_vocab))
    prediction = pd.DataFrame({"token": list(strings[nxt.indices.cpu().numpy()]), "id": nxt.indices.cpu().tolist(),
                               "prob": nxt.values.cpu().tolist(), "logit": logits[nxt.indices].cpu().tolist()})
    in_top = (rank <= top_n).T.flatten().cpu().tolist()  # checkpoints in order: before 0, after 0, before 1, ...
    return TraceResult(prompt, model.token_strings(ids[0]), pos, str(strings[t]), t, top_n, prediction, layers,
                       neurons, _checkpoint(in_top, first=True), _checkpoint(in_top, first=False))


def _checkpoint(in_top: list[bool], *, first: bool) -> dict | None:
    """The first checkpoint in the top (first=True), or the one from which it stays there."""
    if first:
        idx = next((i for i, x in enumerate(in_top) if x), None)
    else:
        idx = None
        for i in range(len(in_top) - 1, -1, -1):
            if not in_top[i]:
                break
            idx = i
    if idx is None:
        return None
    return {"layer": idx // 2, "after": "attention" if idx % 2 == 0 else "ffn"}
