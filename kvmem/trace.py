"""What each FFN does to one prediction, layer by layer: ``trace(model, prompt)``.

One forward pass records, at one position, the FFN input x [d_model], coefficients m [d_mlp] and
output y [d_model] of every layer and the residual stream after every decoder block (the hook points
ffn.x, ffn.coef, ffn.out and resid.post of ``kvmem.hooks``). What layer l's FFN writes into the stream
is the view's ``FFNLayer.write`` (y for most families; write_scale·y with Granite's multiplier; N(y)
behind a post-FFN RMSNorm, Gemma 2/3 and OLMo 2), so
    resid_after[l]  = the output of block l                                  [d_model]
    resid_before[l] = resid_after[l] - write[l]                              [d_model]
i.e. the stream the FFN's update is added to (the stream after attention; for GPT-NeoX with a
parallel residual it is h + attn(h), the FFN having read norm(h) in parallel). Behind a post-residual
norm (OPT-350m post-LN: resid_after = N(r + y)) resid_before is r, the FFN's own input there.
Neuron i's share of the write is m_i·w_i·s (w_i = ``value_vectors_written``, s the post-norm's token
scale, 1 without): exact and additive per token.

Logit lens: final_norm(resid) @ W_U (+ LM-head bias), then the model's logit transform (Cohere's and
Granite's logit scale, Gemma 2/3's soft-capping), in float32: the tokens the stream would predict if
the model stopped there. After the last block this is the model's own logits.

Direct logit attribution (DLA): the final norm is linearised with its scale frozen at the final
residual h (the one the model actually predicts from):
    RMSNorm    f(c) = w ⊙ c / sqrt(mean(h²) + eps)            (Gemma: (1 + w))
    LayerNorm  f(c) = γ ⊙ (c - mean(c)) / sqrt(var(h) + eps)
so f is linear, f(h) + β = final_norm(h), and a component c of the stream (an FFN's write, or a
neuron's sub-update m_i·w_i·s) adds f(c)·W_U[:, t] to token t's final logit, before the logit
transform (soft-capping is monotone). The approximation: it ignores how removing c would change the
norm's scale and everything later layers compute from c (``kvmem.intervene`` measures the real effect).
Token lists (the lens' top tokens aside) exclude ids the tokenizer does not define.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import pandas as pd
import torch
from torch import nn

from kvmem.errors import KvmemError
from kvmem.hooks import hooks, record
from kvmem.neurons import neuron_name
from kvmem.query import resolve_position, stack_padded
from kvmem.vocab import float32_norm, vocab_mask, vocab_strings

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


def frozen_norm(model: KVModel, h: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The final norm as a linear map with its scale frozen at the residual h [d_model]:
    c [..., d_model] -> f(c) [..., d_model] float32 (see the module docstring). Whether the norm centres
    (LayerNorm, Cohere's LayerNorm) is read from the module itself: it ignores a constant shift of its
    input. A model without a final norm (OPT post-LN) gives the identity."""
    norm = float32_norm(model)
    if isinstance(norm, nn.Identity):
        return lambda c: c.float()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise KvmemError(f"kvmem does not know how to linearise a {type(norm).__name__} final norm")
    probe = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(0)).to(h.device)
    with torch.inference_mode():
        centered = bool(torch.allclose(norm(probe + 3.0), norm(probe), atol=1e-4, rtol=1e-3))
    b = getattr(norm, "bias", None)
    beta = b.float() if isinstance(b, torch.Tensor) else None

    def scale(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if centered:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    s_h = scale(h)

    def f(c: torch.Tensor) -> torch.Tensor:
        # norm(c) = (c ⊙ w) / scale(c) [+ β]  =>  c ⊙ w / scale(h) = (norm(c) - β) · scale(c) / scale(h)
        out = norm(c.float())
        if beta is not None:
            out = out - beta
        return out * (scale(c) / s_h)

    return f


def lens_logits(model: KVModel, resid: torch.Tensor) -> torch.Tensor:
    """Logit lens: logit_transform(final_norm(resid) @ W_U + b_U), [..., d_vocab], all in float32."""
    logits = float32_norm(model)(resid.float()) @ model.W_U.float()
    b_U = model.adapter.b_U
    if b_U is not None:
        logits = logits + b_U.float()
    return model.adapter.logit_transform(logits)


def _to_vocab(model, x: torch.Tensor) -> torch.Tensor:
    """x [..., d_model] @ W_U in float32, [..., d_vocab]; ids the tokenizer does not define are -inf."""
    out = x.float() @ model.W_U.float()
    return out.masked_fill(~vocab_mask(model).to(out.device), float("-inf"))


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
    # target_rank_before/_after (1-based), target_prob_before/_after; ffn_dla (the DLA of the FFN's write,
    # after - before, on the target's logit); ffn_tokens (the tokens that write's DLA promotes most); neurons / neuron_dla
    # (the layer's neurons with the largest DLA on the target, and those DLAs)
    layers: pd.DataFrame
    # over all layers, by DLA on the target: id, layer, neuron, coef (m_i), dla (m_i·s·f(w_i)·W_U[:, t]),
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


def resolve_target(model: KVModel, target: str | int | None, logits: torch.Tensor) -> int:
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


def run_residuals(model: KVModel, ids: torch.Tensor, pos: int, *, with_input: bool = False):
    """One forward pass: (logits [d_vocab], coef [n_layers, d_mlp], ffn_out [n_layers, d_model],
    resid_after [n_layers, d_model]) at position ``pos`` (and the FFN inputs x [n_layers, d_model] with
    ``with_input``), read at the hook points ffn.coef, ffn.out, resid.post (ffn.x) of kvmem.hooks; all
    hooks removed afterwards."""
    layers = range(model.n_layers)
    names = ("ffn.coef", "ffn.out", "resid.post") + (("ffn.x",) if with_input else ())
    got: dict = {}
    with torch.inference_mode(), hooks(model, record([(name, i) for name in names for i in layers], got)):
        logits = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    return (logits, *(stack_padded([got[(name, i)][0, pos] for i in layers]) for name in names))


def layer_writes(model: KVModel, coef: torch.Tensor, ffn_out: torch.Tensor, after: torch.Tensor, x: torch.Tensor):
    """Per layer at one position (all [n_layers, ...] float32): (before [d_model], the FFN step's change
    after − before [d_model], the token scale s [1] of its post-norm (1 without)); see the module docstring."""
    before, scale = [], []
    for i, lay in enumerate(model.layers):
        resid = x[i] if lay.post_norm_reads_residual else None
        s = lay.norm_scale(ffn_out[i], resid) if lay.post_norm is not None else torch.ones(1, device=coef.device)
        if lay.post_norm_reads_residual:
            before.append(x[i].float())  # N(r + y) replaced the stream; r is the FFN's own input
        else:
            before.append(after[i].float() - lay.write(coef[i, :lay.d_mlp], ffn_out[i]))
        scale.append(s.float().reshape(1))
    before = torch.stack(before)
    return before, after.float() - before, torch.stack(scale)


@torch.inference_mode()
def trace(model: KVModel, prompt: str, *, position: int = -1, target: str | int | None = None, top_n: int = 5,
          per_layer: int = 3, n_neurons: int = 10, n_tokens: int = 5) -> TraceResult:
    """Layer by layer at one position: what each FFN's update promotes, the logit lens before and
    after it, and the neurons whose sub-updates add most to the target's final logit (DLA)."""
    for name, value in (("top_n", top_n), ("per_layer", per_layer), ("n_neurons", n_neurons), ("n_tokens", n_tokens)):
        if value < 1:
            raise KvmemError(f"{name} must be at least 1", param=name)
    ids = model.encode(prompt)
    pos = resolve_position(position, ids.shape[1])
    logits, coef, ffn_out, after, x = run_residuals(model, ids, pos, with_input=True)
    t = resolve_target(model, target, logits)
    before, delta, scale = layer_writes(model, coef, ffn_out, after, x)
    n_layers, strings = model.n_layers, vocab_strings(model)
    k = min(max(top_n, n_tokens), model.d_vocab)

    lens = lens_logits(model, torch.stack([before, after]))  # [2, n_layers, d_vocab]
    probs = lens.softmax(-1)
    rank = (lens > lens[..., t : t + 1]).sum(-1) + 1  # [2, n_layers]
    lens_top = lens.topk(k, dim=-1).indices.cpu().numpy()

    f = frozen_norm(model, after[-1])
    u = model.W_U[:, t].float()
    ffn_dla = _to_vocab(model, f(delta))  # [n_layers, d_vocab]
    ffn_top = ffn_dla.topk(k, dim=-1).indices.cpu().numpy()
    # per-neuron DLA on the target: m_i·s · f(w_i)·u, one [d_mlp, d_model] map per layer
    written = [model.layers[i].value_vectors_written() for i in range(n_layers)]
    widths = [w.shape[0] for w in written]
    neuron_dla = stack_padded([coef[i, :widths[i]].float() * scale[i] * (f(written[i]) @ u) for i in range(n_layers)],
                              float("-inf"))  # padding (narrower layers of MoE models) is never picked
    layer_best = [neuron_dla[i, :widths[i]].topk(min(per_layer, widths[i])) for i in range(n_layers)]

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
        "neurons": [[neuron_name(model, i, n) for n in b.indices.cpu().tolist()] for i, b in enumerate(layer_best)],
        "neuron_dla": [b.values.cpu().tolist() for b in layer_best],
    })

    best = neuron_dla.flatten().topk(min(n_neurons, sum(widths)))
    pairs = [divmod(i, neuron_dla.shape[1]) for i in best.indices.cpu().tolist()]
    m = torch.stack([coef[a, b] for a, b in pairs]).float()
    v = torch.stack([written[a][b] for a, b in pairs]) * torch.sign(m)[:, None]
    promoted = _to_vocab(model, f(v)).topk(n_tokens, dim=-1).indices.cpu().numpy()
    neurons = pd.DataFrame({
        "id": [neuron_name(model, a, b) for a, b in pairs],
        "layer": [a for a, _ in pairs],
        "neuron": [b for _, b in pairs],
        "coef": m.cpu().tolist(),
        "dla": best.values.cpu().tolist(),
        "tokens": [list(strings[r]) for r in promoted],
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


from kvmem.callable_module import make_callable  # noqa: E402

make_callable(__name__)  # kvmem.trace(...) calls trace(); `import kvmem.trace` stays the module
