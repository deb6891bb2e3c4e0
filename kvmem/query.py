"""Which neurons fire for one prompt: ``query(model, prompt)``.

For one position, every neuron of every layer is scored by |m_i| (``by="activation"``) or by
its contribution |m_i|·‖v_i‖ (the norm of the sub-update m_i·v_i it adds to the residual
stream, ``by="contribution"``). Each selected neuron is shown with the tokens that its actual
sub-update promotes: sign(m_i)·v_i projected through W_U (optionally after the final norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from kvmem.capture import capture, check_layers
from kvmem.errors import KvmemError

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


def query(model, prompt: str, *, position: int = -1, top: int = 20, by: str = "contribution",
          n_tokens: int = 5, through_norm: bool = False, layers=None) -> QueryResult:
    """The top neurons at one position of ``prompt`` across ``layers`` (default all)."""
    if by not in BY:
        raise KvmemError(f"--by must be one of {', '.join(BY)}, not {by!r}")
    if top < 1:
        raise KvmemError("--top must be at least 1")
    layers = check_layers(model, layers)
    ids = model.encode(prompt)
    pos = resolve_position(position, ids.shape[1])
    with torch.inference_mode(), capture(model, layers) as cap:
        logits = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    m = torch.stack([cap.coef[layer][0, pos].float() for layer in layers])  # [n_layers, d_mlp]
    norms = torch.stack([model.value_norms(layer) for layer in layers])
    contribution = m.abs() * norms
    score = contribution if by == "contribution" else m.abs()
    k = min(top, score.numel())
    best = score.flatten().topk(k).indices
    picks = [divmod(flat, model.d_mlp) for flat in best.tolist()]  # (layer index, neuron)
    acts = torch.stack([m[li, n] for li, n in picks])
    neurons = [(layers[li], n) for li, n in picks]
    signs = torch.where(acts >= 0, 1.0, -1.0)
    written = model.value_logits(neurons, through_norm=through_norm, sign=signs).topk(n_tokens).indices
    table = pd.DataFrame({
        "layer": [layer for layer, _ in neurons],
        "neuron": [n for _, n in neurons],
        "id": [f"{layer}.{n}" for layer, n in neurons],
        "activation": acts.tolist(),
        "contribution": contribution.flatten()[best].tolist(),
        "top_tokens": [model.token_strings(row) for row in written],
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
