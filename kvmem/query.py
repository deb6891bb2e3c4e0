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


def forward_coefficients(model, ids: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ids [1, pos]: (logits [pos, d_vocab] float32, m [pos, n_layers, d_mlp] float32)."""
    with torch.inference_mode(), capture(model, layers) as cap:
        logits = model.hf(input_ids=ids, use_cache=False).logits[0].float()
    return logits, torch.stack([cap.coef[layer][0].float() for layer in layers], 1)


def contributions(model, m: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """|m_i|·‖v_i‖ for m [..., n_layers, d_mlp]: the norm of each neuron's sub-update."""
    norms = torch.stack([model.value_norms(layer).float() for layer in layers]).to(m.device)
    return m.abs() * norms


def promoted_tokens(model, neurons: list[tuple[int, int]], acts: torch.Tensor, *, n_tokens: int,
                    through_norm: bool = False, chunk: int = 256) -> list[list[str]]:
    """Per (layer, neuron) the n_tokens tokens its actual sub-update sign(m)·v promotes most
    (acts: m of each), [chunk, d_vocab] logits at a time."""
    out: list[list[str]] = []
    for a in range(0, len(neurons), chunk):
        signs = torch.where(acts[a:a + chunk] >= 0, 1.0, -1.0)
        vl = model.value_logits(neurons[a:a + chunk], through_norm=through_norm, sign=signs)
        out += [model.token_strings(row) for row in vl.topk(n_tokens).indices]
    return out


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
    all_logits, all_m = forward_coefficients(model, ids, layers)
    logits, m = all_logits[pos], all_m[pos]  # [d_vocab], [n_layers, d_mlp]
    contribution = contributions(model, m, layers)
    score = contribution if by == "contribution" else m.abs()
    k = min(top, score.numel())
    best = score.flatten().topk(k).indices
    picks = [divmod(flat, model.d_mlp) for flat in best.tolist()]  # (layer index, neuron)
    acts = torch.stack([m[li, n] for li, n in picks])
    neurons = [(layers[li], n) for li, n in picks]
    table = pd.DataFrame({
        "layer": [layer for layer, _ in neurons],
        "neuron": [n for _, n in neurons],
        "id": [f"{layer}.{n}" for layer, n in neurons],
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
