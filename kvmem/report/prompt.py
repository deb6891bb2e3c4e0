"""The prompt page: one prompt's tokens and, for each token, the neurons that fire most there.

For every position, from one forward pass capturing every layer: the next-token prediction, the
top neurons over all layers by contribution |m|·‖v‖ (exactly what ``kvmem query --position P``
lists, from the same helpers of kvmem.query) and the top neurons of each layer by the same score,
with the tokens their actual sub-update sign(m)·v promotes. With a run report beside it, neuron ids
link to its neuron pages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import kvmem
from kvmem.query import contributions, forward_coefficients, promoted_tokens

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


def prompt_data(model: KVModel, prompt: str, *, per_layer: int = 5, top: int = 20, n_tokens: int = 5,
                through_norm: bool = False) -> dict:
    """JSON-able: tokens, and per position the next-token prediction, the top neurons over all layers
    and the top neurons of each layer. One forward pass; scores as in ``kvmem.query``."""
    ids = model.encode(prompt)
    layers = list(range(model.n_layers))
    # logits [pos, d_vocab], m [pos, n_layers, d_mlp], s [pos, n_layers, 1] (post-norm token scales, else 1)
    logits, m, s = forward_coefficients(model, ids, layers, with_scale=True)
    logits, m = logits.cpu(), m.cpu()
    score = contributions(model, m, layers, s)  # [pos, n_layers, d_mlp]: |m_i|·‖w_i‖·s (what each neuron writes)
    pos_n, n_layers, d_mlp = score.shape
    k = min(per_layer, d_mlp)
    best = score.topk(k, dim=2)  # per layer [pos, n_layers, k]
    overall = score.reshape(pos_n, -1).topk(min(top, n_layers * d_mlp), dim=1)  # [pos, top]
    picks = []  # (position, layer index, neuron) of every listed neuron, per-layer lists first
    for p in range(pos_n):
        picks += [(p, li, n) for li in range(n_layers) for n in best.indices[p, li].tolist()]
    n_per_layer = len(picks)
    for p in range(pos_n):
        picks += [(p, *divmod(f, d_mlp)) for f in overall.indices[p].tolist()]
    act = torch.tensor([float(m[p, li, n]) for p, li, n in picks])
    words = promoted_tokens(model, [(layers[li], n) for _, li, n in picks], act, n_tokens=n_tokens,
                            through_norm=through_norm)
    probs = logits.softmax(-1)
    nxt = probs.topk(n_tokens, dim=1)
    positions = [{"next": [], "top": [], "layers": [{"layer": layer, "neurons": []} for layer in layers]}
                 for _ in range(pos_n)]
    for j, (p, li, n) in enumerate(picks):
        row = {"layer": layers[li], "neuron": n, "m": float(act[j]), "c": float(score[p, li, n]), "w": words[j]}
        if j < n_per_layer:
            positions[p]["layers"][li]["neurons"].append(row)
        else:
            positions[p]["top"].append(row)
    for p in range(pos_n):
        positions[p]["next"] = [[t, float(pr)] for t, pr in zip(model.token_strings(nxt.indices[p]),
                                                                 nxt.values[p].tolist())]
    return {"prompt": prompt, "model": model.spec, "tokens": model.token_strings(ids[0]), "positions": positions,
            "through_norm": through_norm, "gated": model.gated}


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]
    return s or "prompt"


def prompt_page(model: KVModel, prompt: str, out, *, linked_layers=None,
                per_layer: int = 5, top: int = 20, through_norm: bool = False) -> Path:
    """Write ``prompt-SLUG.html`` into ``out`` (with its static files); neuron ids link to
    ``neuron.html#L.N`` when ``linked_layers`` (the layers a run report in ``out`` covers) is given."""
    from kvmem.atomic import write_text
    from kvmem.report.html import env, write_static

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_static(out)
    d = prompt_data(model, prompt, per_layer=per_layer, top=top, through_norm=through_norm)
    d["linked_layers"] = sorted(int(x) for x in linked_layers) if linked_layers is not None else []
    path = out / f"prompt-{slug(prompt)}.html"
    html = env().get_template("prompt.html").render(
        title=model.spec, version=kvmem.__version__, prompt=prompt, data=d,
        has_index=(out / "index.html").is_file())
    write_text(path, html)  # atomic: a page joined to a finished report is never half written
    return path
