"""Which neurons fire for one prompt: ``query(model, prompt)``.

For one position, every neuron of every layer is scored by |m_i| (``by="activation"``) or by
its contribution |m_i|·‖w_i‖·s (the norm of the sub-update it adds to the residual stream,
``by="contribution"``), where w_i is what the view says neuron i writes (``FFNLayer.value_vectors_
written``: v_i for most families; write_scale·v_i with Granite's residual multiplier; γ⊙v_i behind a
post-FFN RMSNorm, Gemma 2/3 and OLMo 2; γ⊙(v_i − mean v_i) behind OPT's post-residual LayerNorm) and s
the token's post-norm scale (1/rms of the FFN output, or 1/σ of r + y for OPT post-LN; 1 without a
post-norm): per token the written update is exactly Σ_i m_i·w_i·s plus the layer's other terms.
Each selected neuron is shown with the tokens its actual sub-update promotes: sign(m_i)·w_i projected
through W_U in float32 (optionally after the final norm), ids the tokenizer does not define excluded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from kvmem.capture import capture, check_layers
from kvmem.errors import KvmemError
from kvmem.neurons import neuron_name

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

BY = ("contribution", "activation")


@dataclass
class QueryResult:
    prompt: str
    tokens: list[str]
    position: int
    by: str
    next_tokens: pd.DataFrame  # token, id, prob, logit
    neurons: pd.DataFrame  # layer, neuron, id, activation, contribution, top_tokens

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "position": self.position,
            "token": self.tokens[self.position],
            "by": self.by,
            "next_tokens": self.next_tokens.to_dict(orient="records"),
            "neurons": self.neurons.to_dict(orient="records"),
        }


def resolve_position(position: int, n_tokens: int) -> int:
    if not -n_tokens <= position < n_tokens:
        raise KvmemError(f"position {position} is outside the prompt ({n_tokens} tokens: 0..{n_tokens - 1} or -1..-{n_tokens})")
    return position % n_tokens


def stack_padded(rows: list[torch.Tensor], fill: float = 0.0, dim: int = 0) -> torch.Tensor:
    """Stack [..., d_i] tensors along ``dim``, padding the last axis to the widest with ``fill`` (layers of an
    MoE model with dense layers differ in width; a padded entry is no neuron)."""
    width = max(r.shape[-1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=fill) for r in rows], dim)


def real_slots(model: KVModel, layers: list[int], width: int, device=None) -> torch.Tensor:
    """[len(layers), width] bool: True where a slot of ``stack_padded``'s layers is a neuron, False on padding."""
    widths = torch.tensor([model.layers[layer].d_mlp for layer in layers], device=device)
    return torch.arange(width, device=device) < widths[:, None]


def forward_coefficients(model: KVModel, ids: torch.Tensor, layers: list[int], *, with_scale: bool = False):
    """One forward pass of ids [1, pos]: (logits [pos, d_vocab] float32, m [pos, n_layers, d_mlp] float32), and
    with ``with_scale`` also s [pos, n_layers, 1] float32, each layer's post-norm token scale (ones without)."""
    post = [layer for layer in layers if model.layers[layer].post_norm is not None]
    what = ("coef",) + (("out", "x") if with_scale and post else ())
    with torch.inference_mode(), capture(model, layers, what) as cap:
        logits = model.hf(input_ids=ids, use_cache=False).logits[0].float()
    m = stack_padded([cap.coef[layer][0].float() for layer in layers], 0.0, 1)  # ffn.coef: c at MoE layers
    if not with_scale:
        return logits, m
    scales = []
    for layer in layers:
        lay = model.layers[layer]
        if lay.post_norm is None:
            scales.append(torch.ones(m.shape[0], 1, device=m.device))
        else:  # a post-residual norm (OPT post-LN) reads r + y, r being the FFN's own input there (no pre-norm)
            resid = cap["x"][layer][0] if lay.post_norm_reads_residual else None
            scales.append(lay.norm_scale(cap["out"][layer][0], resid).float())
    return logits, m, torch.stack(scales, 1)


def written_norms(model: KVModel, layers: list[int]) -> torch.Tensor:
    """‖w_i‖ [n_layers, d_mlp] float32: the norm of what neuron i writes per unit coefficient and unit token
    scale (``FFNLayer.value_vectors_written``; ‖v_i‖ for families without a post-norm or multiplier)."""
    out = []
    for layer in layers:
        lay = model.layers[layer]
        if lay.post_norm is None and lay.write_scale == 1.0:
            out.append(model.value_norms(layer).float())
        else:
            out.append(lay.value_vectors_written().norm(dim=1))
    return stack_padded(out)


def contributions(model: KVModel, m: torch.Tensor, layers: list[int], scale: torch.Tensor | None = None) -> torch.Tensor:
    """|m_i|·‖w_i‖·s for m [..., n_layers, d_mlp]: the norm of each neuron's sub-update. ``scale`` s
    [..., n_layers, 1] from ``forward_coefficients(with_scale=True)``; required for layers with a post-norm."""
    if scale is None and any(model.layers[layer].post_norm is not None for layer in layers):
        raise KvmemError("these layers have a post-FFN norm: pass the token scales (forward_coefficients with_scale)")
    out = m.abs() * written_norms(model, layers).to(m.device)
    return out if scale is None else out * scale.to(out.device)


def promoted_tokens(model: KVModel, neurons: list[tuple[int, int]], acts: torch.Tensor, *, n_tokens: int,
                    through_norm: bool = False, chunk: int = 256) -> list[list[str]]:
    """Per (layer, neuron) the n_tokens tokens its actual sub-update sign(m)·w_i promotes most (acts: m of
    each), projected in float32 with undefined ids excluded, [chunk, d_vocab] logits at a time."""
    from kvmem.vocab import project_rows

    out: list[list[str]] = []
    written: dict[int, torch.Tensor] = {}
    for a in range(0, len(neurons), chunk):
        part = neurons[a:a + chunk]
        signs = torch.where(acts[a:a + chunk] >= 0, 1.0, -1.0).float()
        rows = []
        for layer, n in part:
            lay = model.layers[layer]
            if lay.post_norm is None and lay.write_scale == 1.0:
                rows.append(lay.W_out[n].float())
            else:
                if layer not in written:
                    written[layer] = lay.value_vectors_written()
                rows.append(written[layer][n])
        v = torch.stack(rows) * signs.to(rows[0].device)[:, None]
        vl = project_rows(model, v, through_norm)
        out += [model.token_strings(row) for row in vl.topk(n_tokens).indices]
    return out


def query(model: KVModel, prompt: str, *, position: int = -1, top: int = 20, by: str = "contribution",
          n_tokens: int = 5, through_norm: bool = False, layers=None) -> QueryResult:
    """The top neurons at one position of ``prompt`` across ``layers`` (default all)."""
    if by not in BY:
        raise KvmemError(f"by must be one of {', '.join(BY)}, not {by!r}", param="by")
    if top < 1:
        raise KvmemError("top must be at least 1", param="top")
    layers = check_layers(model, layers)
    ids = model.encode(prompt)
    pos = resolve_position(position, ids.shape[1])
    all_logits, all_m, all_s = forward_coefficients(model, ids, layers, with_scale=True)
    logits, m = all_logits[pos], all_m[pos]  # [d_vocab], [n_layers, d_mlp]
    contribution = contributions(model, m, layers, all_s[pos])
    score = contribution if by == "contribution" else m.abs()
    width = score.shape[-1]
    valid = real_slots(model, layers, width, score.device)
    score = score.masked_fill(~valid, -1.0)  # padding (narrower layers) is never picked
    k = min(top, int(valid.sum()))
    best = score.flatten().topk(k).indices
    picks = [divmod(flat, width) for flat in best.tolist()]  # (layer index, neuron)
    acts = torch.stack([m[li, n] for li, n in picks])
    neurons = [(layers[li], n) for li, n in picks]
    table = pd.DataFrame({
        "layer": [layer for layer, _ in neurons],
        "neuron": [n for _, n in neurons],
        "id": [neuron_name(model, layer, n) for layer, n in neurons],
        "activation": acts.tolist(),
        "contribution": contribution.flatten()[best].tolist(),
        "top_tokens": promoted_tokens(model, neurons, acts, n_tokens=n_tokens, through_norm=through_norm),
    })
    probs = logits.softmax(-1)
    nxt = probs.topk(n_tokens)
    next_tokens = pd.DataFrame({
        "token": model.token_strings(nxt.indices),
        "id": nxt.indices.tolist(),
        "prob": nxt.values.tolist(),
        "logit": logits[nxt.indices].tolist(),
    })
    return QueryResult(prompt, model.token_strings(ids[0]), pos, by, next_tokens, table)


from kvmem.callable_module import make_callable  # noqa: E402

make_callable(__name__)  # kvmem.query(...) calls query(); `import kvmem.query` stays the module
