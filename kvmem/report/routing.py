"""The routing pages of a run with mixture-of-experts layers: ``routing-L.html`` per profiled MoE layer,
linked from the overview, and the expert facts the neuron pages show.

A page shows, from the run's routing table (kvmem.profile.schema.ROUTING, read through ``run.routing``)
and layers table: the load of every routed expert (share of the layer's tokens routed to it, with its
Wilson 95% interval; tokens taken as independent) against the even share top_k / n_experts, the mean
routing weight of each expert over its own tokens, the router entropies of the layer (means and standard
deviations over tokens, with their maxima; the distributions are stated on the page), the co-selection
heat map (tokens routed to both experts), and per expert a table row with its strongest neuron (largest
max m over the expert's tokens) and that neuron's top token. The figures are pure functions (data in,
plotly Figure out); the page is a jinja2 template with autoescape, so vocabulary strings render as text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvmem.report.figures import _layout

if TYPE_CHECKING:
    from kvmem.profile.run import Run

EVEN = "#868e96"


def page_name(layer: int) -> str:
    return f"routing-{int(layer)}.html"


def load_figure(t: pd.DataFrame, layer: int) -> go.Figure:
    """Share of the layer's tokens routed to each expert (bars) with its Wilson 95% interval (error bars),
    and the even share top_k / n_experts (dashed line). t: the layer's rows of run.routing."""
    n = int(t["n"].iloc[0]) if len(t) else 0
    share = t["share"].to_numpy(dtype=np.float64)
    fig = go.Figure([go.Bar(
        x=t["expert"], y=share, name="share of tokens", marker_color="#1c7ed6",
        error_y=dict(type="data", symmetric=False, array=t["share_hi"] - share, arrayminus=share - t["share_lo"],
                     color="#495057", thickness=1, width=3),
        customdata=np.stack([t["load"], t["share_lo"], t["share_hi"]], axis=-1),
        hovertemplate="expert %{x}: %{y:.2%} of tokens (%{customdata[0]:,} tokens)<br>95% interval "
                      "[%{customdata[1]:.2%}, %{customdata[2]:.2%}]<extra></extra>")])
    if len(t):
        fig.add_hline(y=float(t["uniform"].iloc[0]), line_dash="dash", line_color=EVEN,
                      annotation_text="even load: top_k / n_experts", annotation_position="top left")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return _layout(fig, f"Layer {layer}: load per expert, share of the {n:,} tokens routed to it<br><sup>error bars: "
                        "Wilson 95% interval (tokens taken as independent); dashed: the even share</sup>",
                   "expert", "share of tokens", height=340)


def weight_figure(t: pd.DataFrame, layer: int) -> go.Figure:
    """Mean routing weight of each expert over the tokens routed to it, ± its standard deviation."""
    fig = go.Figure([go.Bar(x=t["expert"], y=t["mean_weight"], marker_color="#2b8a3e", name="mean weight",
                            error_y=dict(type="data", array=t["std_weight"], color="#495057", thickness=1, width=3),
                            customdata=t["load"],
                            hovertemplate="expert %{x}: mean weight %{y:.3f} over %{customdata:,} tokens"
                                          "<extra></extra>")])
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, f"Layer {layer}: mean routing weight over each expert's own tokens<br><sup>the weight that "
                        "multiplies the expert's output (after the family's renormalisation); error bars: ±1 std</sup>",
                   "expert", "routing weight", height=320)


def cosel_figure(t: pd.DataFrame, layer: int) -> go.Figure:
    """Tokens routed to both expert i and expert j (the diagonal: the expert's load)."""
    mat = np.array(t["coselected"].tolist(), dtype=np.int64) if len(t) else np.zeros((0, 0), np.int64)
    experts = t["expert"].tolist()
    fig = go.Figure([go.Heatmap(z=mat, x=experts, y=experts, colorscale="Blues", colorbar=dict(title="tokens"),
                                hovertemplate="experts %{y} and %{x}: %{z:,} tokens<extra></extra>")])
    fig.update_yaxes(autorange="reversed")
    n = int(t["n"].iloc[0]) if len(t) else 0
    return _layout(fig, f"Layer {layer}: co-selection, tokens routed to both experts<br><sup>of {n:,} tokens; "
                        "diagonal = the expert's load</sup>", "expert", "expert", height=460)


def expert_rows(t: pd.DataFrame, neurons: pd.DataFrame, layer: int) -> list[dict]:
    """Per expert of the layer: its routing figures and its strongest neuron (largest max m over its
    tokens: id, max, top token; None where the expert got no token)."""
    nl = neurons[(neurons["layer"] == layer) & ~neurons["shared"].astype(bool)]
    rows = []
    for r in t.itertuples():
        mine = nl[nl["expert"] == r.expert]
        best = mine.loc[mine["max"].idxmax()] if len(mine) and mine["max"].notna().any() else None
        rows.append({"expert": int(r.expert), "load": int(r.load), "share": _pct(r.share),
                     "interval": f"[{_pct(r.share_lo)}, {_pct(r.share_hi)}]", "slot_share": _pct(r.slot_share),
                     "mean_weight": _num(r.mean_weight), "std_weight": _num(r.std_weight),
                     "neuron": None if best is None else str(best["id"]),
                     "neuron_max": None if best is None else _num(best["max"]),
                     "token": None if best is None else str(best["top_token"])})
    return rows


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.2f}%"


def _num(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.4g}"


def routing_pages(run: Run, out: Path, env, figure_json, common: dict) -> list[str]:
    """Write routing-L.html for every profiled MoE layer of ``run`` into ``out``; returns the page names."""
    if not run.moe:
        return []
    routing, layers, neurons = run.routing, run.layers.set_index("layer"), run.neurons
    pages = []
    for layer in run.moe_layers:
        t = routing[routing["layer"] == layer].sort_values("expert").reset_index(drop=True)
        row = layers.loc[layer]
        summary = [
            ("tokens", f"{int(t['n'].iloc[0]):,}" if len(t) else "0"),
            ("routed experts", f"{len(t)} (each token to {_num(row['top_k'])}; shared experts: "
                               f"{run.manifest['moe'].get('n_shared', 0)}, every token)"),
            ("router entropy", f"{_num(row['router_entropy_mean'])} ± {_num(row['router_entropy_std'])} nats "
                               f"(max log {len(t)} = {_num(row['router_entropy_max'])}): softmax over all "
                               "routed experts' router logits, mean ± std over tokens"),
            ("selected-weight entropy", f"{_num(row['sel_entropy_mean'])} ± {_num(row['sel_entropy_std'])} nats "
                                        f"(max {_num(row['sel_entropy_max'])}): the chosen experts' routing weights "
                                        "renormalised to sum 1"),
        ]
        figs = [("load", figure_json(load_figure(t, layer)), True), ("weight", figure_json(weight_figure(t, layer)), False),
                ("cosel", figure_json(cosel_figure(t, layer)), False)]
        html = env.get_template("routing.html").render(
            **common, layer=int(layer), summary=summary, figs=figs, experts=expert_rows(t, neurons, layer),
            other=[(int(x), page_name(x)) for x in run.moe_layers if x != layer],
            neuron_note=run.manifest["moe"].get("neuron", ""))
        (out / page_name(layer)).write_text(html, encoding="utf-8")
        pages.append(page_name(layer))
    return pages


def layer_facts(run: Run, layer: int) -> dict | None:
    """What a neuron page of an MoE layer shows about its expert: per flat neuron its id, expert, shared,
    n (tokens routed to the expert) and the expert's load interval; None for a dense layer."""
    if layer not in run.moe_layers:
        return None
    nl = run.neurons[run.neurons["layer"] == layer].sort_values("neuron")
    t = run.routing[run.routing["layer"] == layer].set_index("expert")
    lo = [None if sh else float(t.loc[e, "share_lo"]) for e, sh in zip(nl["expert"], nl["shared"])]
    hi = [None if sh else float(t.loc[e, "share_hi"]) for e, sh in zip(nl["expert"], nl["shared"])]
    return {"ids": nl["id"].astype(str).tolist(), "expert": nl["expert"].astype(int).tolist(),
            "shared": nl["shared"].astype(bool).tolist(), "n": nl["n"].astype(int).tolist(),
            "share_lo": lo, "share_hi": hi, "page": page_name(layer)}
