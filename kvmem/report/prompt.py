"""The prompt page: one prompt's tokens and, for each token, the neurons that fire most there.

For every position: ``kvmem.query`` (top neurons over all layers by contribution |m|·‖v‖, the
next-token prediction) and, from one capture pass over all layers, the top neurons of each layer by
the same score, with the tokens their actual sub-update sign(m)·v promotes. With a run report
beside it, neuron ids link to its neuron pages.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import kvmem
from kvmem.capture import capture


def prompt_data(model, prompt: str, *, per_layer: int = 5, top: int = 20, n_tokens: int = 5,
                through_norm: bool = False) -> dict:
    """JSON-able: tokens, and per position the query result and the per-layer top neurons."""
    from kvmem.query import query

    ids = model.encode(prompt)
    layers = list(range(model.n_layers))
    with torch.inference_mode(), capture(model, layers) as cap:
        model.hf(input_ids=ids, use_cache=False)
    m = torch.stack([cap.coef[layer][0].float() for layer in layers], 1)  # [pos, n_layers, d_mlp]
    norms = torch.stack([model.value_norms(layer).float().cpu() for layer in layers])  # [n_layers, d_mlp]
    m = m.cpu()
    score = m.abs() * norms  # [pos, n_layers, d_mlp]
    k = min(per_layer, model.d_mlp)
    best = score.topk(k, dim=2)  # [pos, n_layers, k]
    acts = m.gather(2, best.indices)
    pos_n, n_layers = ids.shape[1], len(layers)
    pairs = [(layers[li], int(n)) for p in range(pos_n) for li in range(n_layers) for n in best.indices[p, li].tolist()]
    signs = torch.where(acts.flatten() >= 0, 1.0, -1.0)
    written = []
    for a in range(0, len(pairs), 256):  # [chunk, d_vocab] logits at a time
        logits = model.value_logits(pairs[a:a + 256], through_norm=through_norm, sign=signs[a:a + 256])
        written += logits.topk(n_tokens).indices.cpu().tolist()
    strings = model.token_strings(ids[0])
    positions = []
    j = 0
    for p in range(pos_n):
        res = query(model, prompt, position=p, top=top, n_tokens=n_tokens, through_norm=through_norm)
        per = []
        for li in range(n_layers):
            rows = []
            for r in range(k):
                rows.append({"neuron": pairs[j][1], "m": float(acts[p, li, r]), "c": float(best.values[p, li, r]),
                             "w": model.token_strings(written[j])})
                j += 1
            per.append({"layer": layers[li], "neurons": rows})
        positions.append({
            "next": [[t, float(pr)] for t, pr in zip(res.next_tokens.token, res.next_tokens.prob)],
            "top": [{"layer": int(r.layer), "neuron": int(r.neuron), "m": float(r.activation),
                     "c": float(r.contribution), "w": list(r.top_tokens)} for r in res.neurons.itertuples()],
            "layers": per,
        })
    return {"prompt": prompt, "model": model.spec, "tokens": strings, "positions": positions,
            "through_norm": through_norm, "gated": model.gated}


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]
    return s or "prompt"


def prompt_page(model, prompt: str, out, *, linked_layers=None,
                per_layer: int = 5, top: int = 20, through_norm: bool = False) -> Path:
    """Write ``prompt-SLUG.html`` into ``out`` (with its static files); neuron ids link to
    ``neuron.html#L.N`` when ``linked_layers`` (the layers a run report in ``out`` covers) is given."""
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
    path.write_text(html, encoding="utf-8")
    return path
