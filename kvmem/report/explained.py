"""The run's neuron descriptions (``RUN/explanations.parquet``, kvmem.explain.store) as the report shows them.

Neuron page (``layer-L.js``, per neuron ``x``): every description of the neuron, LLM explainers first and the
LLM-free baseline after them, each as {"side", "sign", "by" (explainer), "d" (description), "sc" (scorer), "s":
{scorer: [score, n, lo, hi] or None}, "note": {scorer: why NaN / failures}}; key rows carry detection, fuzzing
and simulation, value rows value. Overview (``neurons.js``): ``desc`` (every description of the neuron, joined
by " | ", for the search by words), ``xd`` / ``xs`` / ``xb`` (the description, its detection score and the
baseline's, of ``kvmem.explain.store.neuron_scores``: the default explainer's best sign; None where there is
none). Description text is data: the page inserts it with textContent only.
"""

from __future__ import annotations

import math

import pandas as pd

from kvmem.explain import store

SCORES = {"key": store.KEY_SCORERS, "value": ("value",)}
NOTE = ("Descriptions: what makes the neuron fire (key side; for gated FFNs per sign of m) and what it writes "
        "(value side), by an LLM explainer and by the LLM-free baseline (its top trigger / value tokens), scored "
        "on held-out examples the explainer never saw. Detection, fuzzing and value: balanced accuracy (0.5 = "
        "chance), 95% interval from the Wilson intervals of both classes; simulation: Pearson r of simulated and "
        "real activations, 95% bootstrap interval over snippets; n: items scored.")


def _num(x, digits: int = 3):
    x = float(x)
    return None if math.isnan(x) else round(x, digits)


def _entry(r: dict) -> dict:
    scores, notes = {}, {}
    for s in SCORES[r["side"]]:
        v = _num(r[s])
        scores[s] = None if v is None else [v, int(r[f"{s}_n"]), _num(r[f"{s}_lo"]), _num(r[f"{s}_hi"])]
        if r[f"{s}_note"]:
            notes[s] = str(r[f"{s}_note"])
    return {"side": r["side"], "sign": r["sign"], "by": r["explainer"], "d": r["description"], "sc": r["scorer"],
            "s": scores, "note": notes}


def by_neuron(df: pd.DataFrame) -> dict[tuple[int, int], list[dict]]:
    """(layer, neuron) -> its entries: key side before value, sign + before -, LLM explainers (by name) before
    the baseline."""
    out: dict[tuple[int, int], list[dict]] = {}
    if df.empty:
        return out
    df = df.assign(_base=df["explainer"] == "baseline", _side=df["side"] != "key", _sign=df["sign"] != "+")
    df = df.sort_values(["layer", "neuron", "_side", "_sign", "_base", "explainer"], kind="stable")
    for r in df.to_dict("records"):
        out.setdefault((int(r["layer"]), int(str(r["neuron"]).split(".")[-1])), []).append(_entry(r))
    return out


def attach(payload: dict, layer: int, entries: dict) -> None:
    """Add each neuron's entries (``x``) to a layer payload of kvmem.report.data.layer_payload."""
    for n, item in enumerate(payload["neurons"]):
        x = entries.get((int(layer), n))
        if x:
            item["x"] = x


def overview_columns(df: pd.DataFrame, layers: list[int], neurons: list[int]) -> dict:
    """desc, xd, xs, xb for the overview table's rows (``layers[i]``, ``neurons[i]``)."""
    text: dict[str, list[str]] = {}
    for r in df[df["description"] != ""].itertuples():
        text.setdefault(r.neuron, []).append(str(r.description))
    best = store.neuron_scores(df, "detection").set_index("neuron")
    ids = [f"{a}.{b}" for a, b in zip(layers, neurons)]
    return {"desc": [" | ".join(text.get(i, [])) for i in ids],
            "xd": [str(best["description"].get(i, "")) for i in ids],
            "xs": [_num(best["score"].get(i, math.nan)) for i in ids],
            "xb": [_num(best["baseline"].get(i, math.nan)) for i in ids]}
