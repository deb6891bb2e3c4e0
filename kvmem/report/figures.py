"""Plotly figures of a profile run: pure functions, data in -> ``plotly.graph_objects.Figure`` out.

They work in a notebook (``fig.show()``) and are what the HTML report embeds. Inputs are the run's
tables (``run.layers``, ``run.neurons``: pandas DataFrames) or plain arrays; nothing here reads a
file or a model. Every figure states its threshold and token count in its title, because a rate
means nothing without them (firing = m > 0; dense = fires on more than half of the tokens).

    import kvmem
    from kvmem.report import figures
    run = kvmem.open_run("runs/smollm2")
    figures.firing_rate(run.layers).show()
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

QUADRANTS = (("gate_pos_up_pos", "gate > 0, up > 0", "#2b8a3e"), ("gate_pos_up_neg", "gate > 0, up < 0", "#e8590c"),
             ("gate_neg_up_pos", "gate < 0, up > 0", "#1c7ed6"), ("gate_neg_up_neg", "gate < 0, up < 0", "#862e9c"))
POS, NEG = "#e8590c", "#1c7ed6"


def _tokens(layers: pd.DataFrame) -> str:
    n = int(layers["n_tokens"].max()) if len(layers) else 0
    return f"{n:,} tokens"


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 320) -> go.Figure:
    fig.update_layout(title=dict(text=title, font=dict(size=14), x=0.01, xanchor="left"), template="plotly_white",
                      height=height,
                      margin=dict(l=60, r=20, t=50, b=45), xaxis_title=x, yaxis_title=y,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1))
    if x == "layer" or y == "layer":
        n = len(fig.data[0].x if x == "layer" else fig.data[0].y) if fig.data else 1
        fig.update_xaxes(dtick=max(1, -(-n // 16))) if x == "layer" else fig.update_yaxes(dtick=max(1, -(-n // 16)))
    return fig


def firing_rate(layers: pd.DataFrame) -> go.Figure:
    """Mean firing rate (share of tokens with m > 0) of each layer's neurons, with the densest neuron's rate."""
    fig = go.Figure([
        go.Bar(x=layers["layer"], y=layers["firing_rate"], name="mean over neurons", marker_color=POS,
               hovertemplate="layer %{x}<br>mean firing rate %{y:.2%}<extra></extra>"),
        go.Scatter(x=layers["layer"], y=layers["densest_rate"], name="densest neuron", mode="markers",
                   marker=dict(color="#495057", symbol="line-ew-open", size=12),
                   hovertemplate="layer %{x}<br>densest neuron fires on %{y:.2%}<extra></extra>"),
    ])
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return _layout(fig, f"Firing rate per layer (firing = m > 0, over {_tokens(layers)})", "layer", "share of tokens")


def dead_dense(layers: pd.DataFrame) -> go.Figure:
    """Dead (never m > 0) and dense (m > 0 on more than half of the tokens) neurons per layer."""
    fig = go.Figure([
        go.Bar(x=layers["layer"], y=layers["dead"], name="dead: never m > 0", marker_color="#868e96"),
        go.Bar(x=layers["layer"], y=layers["dense"], name="dense: m > 0 on > 50% of tokens", marker_color=POS),
    ])
    fig.update_layout(barmode="group")
    d_mlp = int(layers["d_mlp"].max()) if len(layers) else 0
    return _layout(fig, f"Dead and dense neurons per layer (of {d_mlp:,}; over {_tokens(layers)})", "layer",
                   "neurons")


def l0_by_layer(layers: pd.DataFrame) -> go.Figure:
    """Active neurons per token (L0 = number of neurons with m > 0): mean, median and 90th percentile."""
    fig = go.Figure([
        go.Bar(x=layers["layer"], y=layers["l0_mean"], name="mean", marker_color=POS),
        go.Scatter(x=layers["layer"], y=layers["l0_median"], name="median", mode="markers",
                   marker=dict(color="#212529", size=7)),
        go.Scatter(x=layers["layer"], y=layers["l0_p90"], name="90th percentile", mode="markers",
                   marker=dict(color="#212529", symbol="triangle-up-open", size=8)),
    ])
    d_mlp = int(layers["d_mlp"].max()) if len(layers) else 0
    return _layout(fig, f"Active neurons per token, L0 (m > 0, of {d_mlp:,}; over {_tokens(layers)})", "layer",
                   "neurons active")


def l0_distribution(l0_hists: dict[int, np.ndarray], bins: int = 64) -> go.Figure:
    """Heatmap: for each layer, the share of tokens with L0 in each range. ``l0_hists[layer]`` [d_mlp + 1]
    counts tokens by their number of active neurons; the counts are summed into ``bins`` ranges."""
    layer_ids = sorted(l0_hists)
    if not layer_ids:
        return _layout(go.Figure(), "L0 distribution (no layers)", "neurons active", "layer")
    width = max(len(h) for h in l0_hists.values())
    step = max(1, -(-width // bins))
    rows, n_tokens = [], 0
    for layer in layer_ids:
        h = np.zeros(width, dtype=np.float64)
        h[: len(l0_hists[layer])] = np.asarray(l0_hists[layer], dtype=np.float64)
        n_tokens = max(n_tokens, int(h.sum()))
        pad = np.zeros(-(-width // step) * step)
        pad[:width] = h
        summed = pad.reshape(-1, step).sum(1)
        rows.append(summed / max(summed.sum(), 1))
    x = np.arange(len(rows[0])) * step
    labels = [f"{a}–{a + step - 1}" if step > 1 else str(a) for a in x]
    fig = go.Figure(go.Heatmap(z=np.array(rows), x=x, y=layer_ids, colorscale="Oranges", customdata=[labels] * len(rows),
                               hovertemplate="layer %{y}<br>L0 %{customdata}: %{z:.2%} of tokens<extra></extra>",
                               colorbar=dict(title="share", tickformat=".0%")))
    return _layout(fig, f"Distribution of L0 per layer (share of {n_tokens:,} tokens per L0 range of {step})",
                   "neurons active (m > 0)", "layer", height=360)


def max_activation(neurons: pd.DataFrame) -> go.Figure:
    """Distribution over each layer's neurons of their maximum activation m (box: quartiles, whiskers 5–95%)."""
    fig = go.Figure()
    layer_ids = sorted(neurons["layer"].unique())
    q = neurons.groupby("layer")["max"].quantile([0.05, 0.25, 0.5, 0.75, 0.95]).unstack()
    fig.add_trace(go.Box(x=layer_ids, q1=q[0.25].tolist(), median=q[0.5].tolist(), q3=q[0.75].tolist(),
                         lowerfence=q[0.05].tolist(), upperfence=q[0.95].tolist(), name="neurons' max m",
                         marker_color=POS, boxpoints=False))
    top = neurons.loc[neurons.groupby("layer")["max"].idxmax()]
    fig.add_trace(go.Scatter(x=top["layer"], y=top["max"], mode="markers", name="largest",
                             text=top["id"], marker=dict(color="#212529", size=6),
                             hovertemplate="%{text}: max m %{y:.3g}<extra></extra>"))
    if (neurons["max"] > 0).all():
        fig.update_yaxes(type="log")
    return _layout(fig, "Max activation per neuron, by layer (box 25–75%, whiskers 5–95%)", "layer", "max m")


def quadrants(layers: pd.DataFrame) -> go.Figure:
    """Gated FFNs: share of (token, neuron) pairs in each sign combination of gate and up, per layer."""
    fig = go.Figure([go.Bar(x=layers["layer"], y=layers[col], name=name, marker_color=color,
                            hovertemplate=f"layer %{{x}}<br>{name}: %{{y:.1%}}<extra></extra>")
                     for col, name, color in QUADRANTS if col in layers])
    fig.update_layout(barmode="stack")
    fig.update_yaxes(tickformat=".0%", range=[0, 1])
    return _layout(fig, f"Sign combinations of gate and up pre-activations (all token × neuron pairs, "
                        f"{_tokens(layers)})", "layer", "share")


def _fmt_edge(x: float) -> str:
    if not np.isfinite(x):
        return "∞" if x > 0 else "-∞"
    return "0" if abs(x) < 1e-30 else f"{x:.3g}"


def activation_histogram(edges, counts, *, title: str = "Activation histogram") -> go.Figure:
    """One neuron's histogram of m: ``counts[b]`` tokens in bin b, whose edges are edges[b], edges[b+1]
    (log count axis). Bins are drawn one slot each, so log-spaced bins (kvmem.stats.hist) read as a
    symmetric log axis; only the range of non-empty bins is shown."""
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    nz = np.flatnonzero(counts)
    lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, len(counts))
    idx = np.arange(lo, hi)
    labels = [f"[{_fmt_edge(edges[i])}, {_fmt_edge(edges[i + 1])})" for i in idx]
    mid = (np.nan_to_num(edges[idx], neginf=-1e30) + np.nan_to_num(edges[idx + 1], posinf=1e30)) / 2
    colors = np.where(mid > 0, POS, np.where(mid < 0, NEG, "#868e96"))
    fig = go.Figure(go.Bar(x=idx, y=counts[lo:hi], marker_color=colors, marker_line_width=0, customdata=labels,
                           hovertemplate="m in %{customdata}: %{y:,} tokens<extra></extra>"))
    step = max(1, (hi - lo) // 8)
    ticks = list(range(lo, hi + 1, step))
    fig.update_xaxes(tickvals=[t - 0.5 for t in ticks], ticktext=[_fmt_edge(edges[t]) for t in ticks])
    fig.update_yaxes(type="log")
    return _layout(fig, title, "activation m (bins log-spaced in |m|)", "tokens (log)", height=300)


def neuron_quadrants(counts, *, title: str = "Sign combinations of gate and up") -> go.Figure:
    """One gated neuron: tokens in each of the four sign combinations, ``counts`` [4] in QUADRANTS order."""
    counts = np.asarray(counts, dtype=np.float64)
    total = max(counts.sum(), 1)
    fig = go.Figure(go.Bar(x=[name for _, name, _ in QUADRANTS], y=counts / total,
                           marker_color=[c for _, _, c in QUADRANTS], text=[f"{int(c):,}" for c in counts],
                           hovertemplate="%{x}: %{y:.1%} (%{text} tokens)<extra></extra>"))
    fig.update_yaxes(tickformat=".0%", range=[0, 1])
    return _layout(fig, title, "", "share of tokens", height=280)


def layer_figures(layers: pd.DataFrame, neurons: pd.DataFrame, l0_hists: dict | None = None) -> dict[str, go.Figure]:
    """The overview page's figures, by name (the gated-only one only for gated models)."""
    figs = {"firing_rate": firing_rate(layers), "dead_dense": dead_dense(layers), "l0": l0_by_layer(layers)}
    if l0_hists:
        figs["l0_distribution"] = l0_distribution(l0_hists)
    figs["max_activation"] = max_activation(neurons)
    if "gate_pos_up_pos" in layers:
        figs["quadrants"] = quadrants(layers)
    return figs
