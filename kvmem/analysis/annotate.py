"""Annotation export for Geva et al. 2021 section 3's human labelling of keys (shallow / semantic patterns), with a
blind random-vector control.

Token pool: ``tokens`` counted tokens of the run's own model rows drawn at random across documents
(kvmem.analysis.common.sample_from_run, seeded; BOS, padding and skipped positions never count). Per layer:
  keys     ``n_keys`` neurons drawn uniformly (seeded) among the layer's neurons; a key's triggers are the
           ``n_triggers`` pool positions with the largest coefficient m_i (ties: lower global index first)
  random   ``n_random`` random directions r ~ N(0, I) in the key space (the FFN input x, [d_model]); a direction's
           triggers are the positions with the largest x·r, found in the same pass over the same pool
Each trigger is shown as the prefix the model saw (the last ``context`` tokens of its row up to the trigger, BOS
left out, each newline shown as ⏎) with the trigger token marked ``[[token]]``. Text is data: no markup is added.

Tables:
  items       the blinded sheet (``annotation.csv``): one row per (item, rank): item (an id like "3.07" whose
              number is a seeded shuffle of the layer's keys and random directions), layer, rank (1 = top), text,
              token, rel_score (score / the item's rank-1 score, so raw scales do not give random directions away),
              and empty ``label`` (shallow / semantic / none) and ``pattern`` columns for the annotator
  key         the unblinding key (``annotation_key.csv``, to be kept from the annotator): item, layer, kind
              ("key" or "random"), neuron (-1 for random), direction (random's number in its layer, -1 for keys)
  triggers    raw scores: item, rank, index (global token index), doc (global document id), score (m for keys,
              x·r for random directions)
  directions  item, layer, vector (the random direction, float32 list of d_model)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from kvmem.analysis.common import sample_from_run
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import capture
from kvmem.errors import KvmemError
from kvmem.profile.run import Run

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

LABELS = "shallow / semantic / none"
NEWLINE = "⏎"


def _merge_top(score: torch.Tensor, index: torch.Tensor, new_score: torch.Tensor, new_index: torch.Tensor,
               n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best n of two (score [items, *], index [items, *]) sets per item: largest score, ties to the lower global
    index (the second key of a stable sort)."""
    s, i = torch.cat([score, new_score], 1), torch.cat([index, new_index], 1)
    o = torch.sort(i, dim=1, stable=True).indices
    s, i = s.gather(1, o), i.gather(1, o)
    o = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :n]
    return s.gather(1, o), i.gather(1, o)


def trigger_text(run: Run, tokenizer, index: int, context: int) -> tuple[str, str]:
    """(prefix text with the trigger marked [[...]], the trigger token's text) of a global token index."""
    layout = run.layout
    ids = layout.prefix(run.tokens, index)[(0 if layout.bos_id is None else 1):][-context:]
    before = tokenizer.decode(ids[:-1]) if len(ids) > 1 else ""
    tok = tokenizer.decode(ids[-1:])
    return (before + "[[" + tok + "]]").replace("\n", NEWLINE), tok.replace("\n", NEWLINE)


@torch.inference_mode()
def annotate(model: KVModel, run: Run, *, layers=None, n_keys: int = 10, n_triggers: int = 25, n_random: int = 2,
             tokens: int = 20000, context: int = 20, seed: int = 0, tokens_per_batch: int = 2048) -> AnalysisResult:
    """The blinded annotation sheet, its key and the raw trigger scores (module docstring)."""
    for name, v in (("n_keys", n_keys), ("n_triggers", n_triggers), ("tokens", tokens), ("context", context)):
        if v < 1:
            raise KvmemError(f"{name} must be at least 1, got {v}")
    if n_random < 0:
        raise KvmemError(f"n_random must be at least 0, got {n_random}")
    layers = run.profiled_layers if layers is None else sorted(set(layers))
    gen = torch.Generator().manual_seed(seed)
    pool = sample_from_run(run, tokens, seed)
    keys = {layer: torch.randperm(model.d_mlp, generator=gen)[:n_keys].sort().values for layer in layers}
    dirs = {layer: torch.randn(n_random, model.d_model, generator=gen) for layer in layers}
    n_items = {layer: len(keys[layer]) + n_random for layer in layers}
    best = {layer: (torch.empty(n_items[layer], 0), torch.empty(n_items[layer], 0, dtype=torch.long))
            for layer in layers}
    dev = model.device
    b = max(1, tokens_per_batch // pool.seq_len)
    for start in range(0, pool.rows.shape[0], b):
        sl = slice(start, start + b)
        counted, index = pool.counted[sl].reshape(-1), pool.index[sl].reshape(-1)
        if not bool(counted.any()):
            continue

        def on_layer(layer, got, counted=counted, index=index):
            if layer not in best:
                return
            m = got["coef"].reshape(-1, model.d_mlp)[:, keys[layer].to(dev)].float().cpu()  # [b*L, n_keys]
            x = got["x"].reshape(-1, model.d_model).float().cpu()
            score = torch.cat([m, x @ dirs[layer].T], 1)[counted].T  # [items, counted positions]
            idx = index[counted][None, :].expand_as(score)
            best[layer] = _merge_top(*best[layer], score, idx, n_triggers)

        with capture(model, layers, ("coef", "x"), stop=True, on_layer=on_layer):
            model.hf(input_ids=pool.rows[sl].to(dev), attention_mask=pool.mask[sl].long().to(dev), use_cache=False)
    items, key, trig, vecs = [], [], [], []
    for layer in layers:
        order = torch.randperm(n_items[layer], generator=gen).tolist()  # item number of each key / direction
        width = len(str(n_items[layer] - 1))
        score, index = best[layer]
        for j, number in enumerate(order):
            item = f"{layer}.{number:0{width}d}"
            is_key = j < len(keys[layer])
            key.append({"item": item, "layer": layer, "kind": "key" if is_key else "random",
                        "neuron": int(keys[layer][j]) if is_key else -1,
                        "direction": -1 if is_key else j - len(keys[layer])})
            if not is_key:
                vecs.append({"item": item, "layer": layer, "vector": dirs[layer][j - len(keys[layer])].numpy()})
            top = float(score[j, 0]) if score.shape[1] else float("nan")
            for rank, (s, i) in enumerate(zip(score[j].tolist(), index[j].tolist()), start=1):
                text, tok = trigger_text(run, model.tokenizer, i, context)
                items.append({"item": item, "layer": layer, "rank": rank, "text": text, "token": tok,
                              "rel_score": round(s / top, 3) if top > 0 else float("nan"), "label": "", "pattern": ""})
                trig.append({"item": item, "rank": rank, "index": i, "doc": int(run.tokens.doc_of(torch.tensor(i))),
                             "score": s})
    items = pd.DataFrame(items, columns=["item", "layer", "rank", "text", "token", "rel_score", "label", "pattern"])
    items = items.sort_values(["layer", "item", "rank"], kind="stable").reset_index(drop=True)
    key = pd.DataFrame(key, columns=["item", "layer", "kind", "neuron", "direction"]).sort_values("item", kind="stable")
    meta = {"section": "Geva et al. 2021 section 3 (human annotation of trigger examples)", "n_keys": n_keys,
            "n_triggers": n_triggers, "n_random": n_random, "tokens": tokens, "n_tokens": pool.n_tokens,
            "context": context, "seed": seed, "pool": pool.source, "labels": LABELS,
            "keys": "neurons drawn uniformly per layer (seeded); triggers = largest m over the pool",
            "random": "random directions r ~ N(0, I) in the FFN input space; triggers = largest x.r over the same pool",
            "blinding": "item numbers are a seeded shuffle of keys and random directions per layer; "
                        "rel_score = score / "
                        "rank-1 score; the key is written to a separate file",
            "text": f"the last {context} tokens of the trigger's row prefix (BOS left out), trigger marked [[...]], "
                    f"newlines shown as {NEWLINE}"}
    return AnalysisResult("annotate", {"items": items, "key": key.reset_index(drop=True), "triggers": pd.DataFrame(
        trig, columns=["item", "rank", "index", "doc", "score"]), "directions": pd.DataFrame(
        vecs, columns=["item", "layer", "vector"])}, meta)


def write_annotation(result: AnalysisResult, folder: str | Path) -> tuple[Path, Path]:
    """Write the blinded sheet (``annotation.csv``) and, separately, its key (``annotation_key.csv``); returns
    both paths. UTF-8 CSV, every field quoted."""
    import csv

    from kvmem.atomic import write_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sheet, key = folder / "annotation.csv", folder / "annotation_key.csv"
    for path, df in ((sheet, result["items"]), (key, result["key"])):
        write_file(path, lambda p, df=df: df.to_csv(p, index=False, quoting=csv.QUOTE_ALL, encoding="utf-8"))
    return sheet, key

