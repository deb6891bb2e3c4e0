"""Plotly figures of a profile run: pure functions, data in -> ``plotly.graph_objects.Figure`` out.

They work in a notebook (``fig.show()``) and are what the HTML report embeds. Inputs are the run's
tables (``run.layers``, ``run.neurons``: pandas DataFrames) or plain arrays; nothing here reads a
file or a model. Every figure states its threshold and token count in its title, because a rate
means nothing without them.

Two kinds of figures, for every family (kvmem.profile.tables):
- magnitude: |m| against τ = 10% of each neuron's max |m| (m > τ and m < -τ, so both signs), mass-L0
  (neurons carrying 50% / 90% of Σ_i |m_i|·‖v_i‖ at a token) and max |m| on a log axis. These mean the
  same for a SwiGLU and a GELU model, and are what the overview shows first;
- sign: firing = m > 0, dead, dense, L0. Meaningful for ReLU/GELU; for gated FFNs m = act(gate)·up is
  sign-symmetric and about half of all m are > 0 whatever a neuron does. Shown below, for comparison.

    import kvmem
    from kvmem.report import figures
    run = kvmem.open_run("runs/smollm2")
    figures.active_share(run.layers).show()
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

QUADRANTS = (("gate_pos_up_pos", "gate > 0, up > 0", "#2b8a3e"), ("gate_pos_up_neg", "gate > 0, up < 0", "#e8590c"),
             ("gate_neg_up_pos", "gate < 0, up > 0", "#1c7ed6"), ("gate_neg_up_neg", "gate < 0, up < 0", "#862e9c"))
POS, NEG = "#e8590c", "#1c7ed6"
MUTED = "#495057"  # a title's second line


def _tokens(layers: pd.DataFrame) -> str:
    n = int(layers["n_tokens"].max()) if len(layers) else 0
    return f"{n:,} tokens"


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 320, top: int | None = None) -> go.Figure:
    """Title (a second line after <br>, in <sup>: drawn smaller and grey) at the top left, the legend in a row between the title and
    the plot (never over either), the mode bar upright at the right edge (never over the title)."""
    legend = sum(1 for tr in fig.data if tr.type != "heatmap") > 1  # plotly shows one from two traces on
    if top is None:
        top = 36 + (18 if "<br>" in title else 0) + (18 if legend else 0)
    title = title.replace("<sup>", f"<span style='font-size:11.5px;color:{MUTED}'>").replace("</sup>", "</span>")
    fig.update_layout(title=dict(text=title, font=dict(size=14), x=0.01, xanchor="left", y=1 - 14 / height,
                                 yref="container", yanchor="top"),
                      template="plotly_white", height=height, margin=dict(l=60, r=30, t=top, b=45),
                      xaxis_title=x, yaxis_title=y, modebar=dict(orientation="v"),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0, font=dict(size=11)))
    if x == "layer" or y == "layer":
        n = len(fig.data[0].x if x == "layer" else fig.data[0].y) if fig.data else 1
        fig.update_xaxes(dtick=max(1, -(-n // 16))) if x == "layer" else fig.update_yaxes(dtick=max(1, -(-n // 16)))
    if x == "layer" and fig.data and fig.layout.xaxis.range is None:  # markers beside bars: no stray ticks
        xs = [float(v) for tr in fig.data for v in (tr.x if tr.x is not None else [])]
        if xs:
            fig.update_xaxes(range=[min(xs) - 0.6, max(xs) + 0.6])
    return fig


TAU = "τ = 10% of each neuron's max |m|"
MASS_COLORS = {50: "#2b8a3e", 90: "#5f3dc4"}


def _d_mlp(layers: pd.DataFrame) -> int:
    return int(layers["d_mlp"].max()) if len(layers) else 0


def active_share(layers: pd.DataFrame) -> go.Figure:
    """Mean over each layer's neurons of the share of tokens with m > τ (orange) and m < -τ (blue), stacked
    to the share with |m| > τ; τ = 10% of each neuron's max |m|. Error bar: the mean of the histogram's bound."""
    fig = go.Figure([
        go.Bar(x=layers["layer"], y=layers["pos_10pct_maxabs"], name="m > +τ", marker_color=POS,
               hovertemplate="layer %{x}<br>m > +τ: %{y:.2%} of tokens<extra></extra>"),
        go.Bar(x=layers["layer"], y=layers["neg_10pct_maxabs"], name="m < −τ", marker_color=NEG,
               error_y=dict(type="data", array=layers["active_10pct_maxabs_err"], color="#495057", thickness=1,
                            width=3),
               customdata=np.stack([layers["active_10pct_maxabs"], layers["active_10pct_maxabs_err"]], axis=-1),
               hovertemplate="layer %{x}<br>m < −τ: %{y:.2%} of tokens<br>|m| > τ: %{customdata[0]:.2%} "
                             "± %{customdata[1]:.2%}<extra></extra>"),
    ])
    fig.update_layout(barmode="stack")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return _layout(fig, f"Active share per layer: tokens with |m| > τ, {TAU}<br><sup>mean over neurons, both "
                        f"signs stacked, error bar = histogram bound; {_tokens(layers)}</sup>", "layer",
                   "share of tokens", height=340)


def dense_rare(layers: pd.DataFrame) -> go.Figure:
    """Neurons with |m| > τ on more than half of the tokens (dense) and on fewer than 1% (rare), per layer."""
    fig = go.Figure([
        go.Bar(x=layers["layer"], y=layers["dense_10pct"], name="dense: |m| > τ on > 50% of tokens",
               marker_color=POS),
        go.Bar(x=layers["layer"], y=layers["rare_10pct"], name="rare: |m| > τ on < 1% of tokens",
               marker_color="#868e96"),
    ])
    fig.update_layout(barmode="group")
    return _layout(fig, f"Dense and rare neurons per layer, {TAU}<br><sup>of {_d_mlp(layers):,} neurons per "
                        f"layer; {_tokens(layers)}</sup>", "layer", "neurons", height=340)


def mass_l0(layers: pd.DataFrame) -> go.Figure:
    """Mass-L0 per layer: per token, the fewest neurons whose |m_i|·‖v_i‖ carry 50% (90%) of Σ_i |m_i|·‖v_i‖;
    mean over tokens (bars), median (dot) and 90th percentile (triangle) on their bar."""
    traces = []
    for p, shift in ((50, -0.2), (90, 0.2)):  # the two grouped bars of a layer sit at layer -+ 0.2
        x = layers["layer"].astype("float64") + shift
        traces += [
            go.Bar(x=layers["layer"], y=layers[f"mass{p}_mean"], name=f"mean, {p}% of the mass",
                   marker_color=MASS_COLORS[p], legendrank=p,
                   hovertemplate=f"layer %{{x}}<br>{p}% of Σ|m|·‖v‖: %{{y:,.1f}} neurons (mean)<extra></extra>"),
            go.Scatter(x=x, y=layers[f"mass{p}_median"].astype("float64"), name="median", mode="markers",
                       legendgroup="median", showlegend=p == 50, marker=dict(color="#212529", size=6),
                       customdata=layers["layer"],
                       hovertemplate=f"layer %{{customdata}}<br>{p}%: median %{{y:,}} neurons<extra></extra>"),
            go.Scatter(x=x, y=layers[f"mass{p}_p90"].astype("float64"), name="90th percentile", mode="markers",
                       legendgroup="p90", showlegend=p == 50,
                       marker=dict(color="#212529", size=7, symbol="triangle-up-open"), customdata=layers["layer"],
                       hovertemplate=f"layer %{{customdata}}<br>{p}%: 90th percentile %{{y:,}} neurons<extra></extra>"),
        ]
    fig = go.Figure(traces)
    fig.update_layout(barmode="group", bargap=0.2, bargroupgap=0)
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, "Mass-L0 per layer: neurons carrying 50% / 90% of Σ<sub>i</sub> |m<sub>i</sub>|·‖v<sub>i</sub>‖ "
                        f"per token<br><sup>bars: mean over {_tokens(layers)}, with median and 90th percentile; of "
                        f"{_d_mlp(layers):,} neurons</sup>", "layer", "neurons", height=340)


def _binned(hists: dict, bins: int) -> tuple[list, np.ndarray, np.ndarray, int, int]:
    """Rows (share of tokens per range of ``step`` counts) of count histograms {layer: [width]}:
    (layers, x (first count of each range), z [layers, ranges], step, n_tokens)."""
    layer_ids = sorted(hists)
    width = max(len(h) for h in hists.values())
    step = max(1, -(-width // bins))
    rows, n_tokens = [], 0
    for layer in layer_ids:
        h = np.zeros(-(-width // step) * step, dtype=np.float64)
        src = np.asarray(hists[layer], dtype=np.float64)
        h[: len(src)] = src
        n_tokens = max(n_tokens, int(h.sum()))
        summed = h.reshape(-1, step).sum(1)
        rows.append(summed / max(summed.sum(), 1))
    return layer_ids, np.arange(len(rows[0])) * step, np.array(rows), step, n_tokens


def _range_labels(x, step: int) -> list[str]:
    return [f"{a}–{a + step - 1}" if step > 1 else str(a) for a in x]


def mass_distribution(dists: dict[int, dict[float, np.ndarray]], d_mlp: int, bins: int = 64) -> go.Figure:
    """Heatmaps, one per share (50%, 90%): for each layer, the share of tokens whose mass-L0 falls in each
    range. ``dists[layer][f]`` [d_mlp + 1] counts tokens by their mass-L0 (LayerStats.mass.distribution).
    Each panel's x axis runs from 0 to the largest mass-L0 of any token, in ``bins`` equal ranges."""
    from plotly.subplots import make_subplots

    fracs = (0.5, 0.9)
    panels, n_tokens = [], 0
    for f in fracs:
        hists = {layer: np.asarray(d[f], dtype=np.float64) for layer, d in dists.items()}
        hi = max((int(np.flatnonzero(h)[-1]) if h.any() else 0) for h in hists.values())
        layer_ids, x, z, step, n = _binned({layer: h[:hi + 1] for layer, h in hists.items()}, bins)
        panels.append((f, layer_ids, x, z, step, hi))
        n_tokens = max(n_tokens, n)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[f"{round(f * 100)}% of Σ|m|·‖v‖ (ranges of {step})"
                                        for f, _, _, _, step, _ in panels])
    for j, (f, layer_ids, x, z, step, hi) in enumerate(panels):
        labels = _range_labels(x, step)
        fig.add_trace(go.Heatmap(z=z, x=x + (step - 1) / 2, y=layer_ids, coloraxis="coloraxis",
                                 customdata=[labels] * len(z),
                                 hovertemplate=f"layer %{{y}}<br>{round(f * 100)}% of the mass in %{{customdata}} "
                                               "neurons: %{z:.2%} of tokens<extra></extra>"), row=1, col=j + 1)
        fig.update_xaxes(title_text=f"neurons carrying {round(f * 100)}% (of {d_mlp:,})", range=[0, x[-1] + step],
                         row=1, col=j + 1)
    fig.update_layout(coloraxis=dict(colorscale="Greens", colorbar=dict(title="share of<br>tokens", tickformat=".0%")))
    _layout(fig, f"Distribution of mass-L0 per layer: neurons carrying 50% / 90% of Σ<sub>i</sub> |m<sub>i</sub>|·"
                 f"‖v<sub>i</sub>‖ at a token<br><sup>share of the layer's {n_tokens:,} tokens in each range; of "
                 f"{d_mlp:,} neurons</sup>", "", "", height=430, top=80)
    fig.update_layout(xaxis_title=f"neurons carrying 50% (of {d_mlp:,})", yaxis_title="layer")
    if len(panels[0][1]) > 1:
        fig.update_yaxes(dtick=max(1, -(-len(panels[0][1]) // 16)))
    for ann in fig.layout.annotations:
        ann.font.size = 12
    return fig


def _position_bins(max_pos: int) -> list[tuple[int, int]]:
    """Position ranges 0, 1, 2–3, 4–7, ... up to max_pos - 1 (log-spaced: the first tokens of a row differ most)."""
    out, a = [(0, 0)], 1
    while a < max_pos:
        b = min(2 * a - 1, max_pos - 1)
        out.append((a, b))
        a = b + 1
    return out


def mass_by_position(by_pos: dict[int, dict[float, np.ndarray]], d_mlp: int, n_tokens: int) -> go.Figure:
    """Heatmaps, one per share (50%, 90%): mean mass-L0 by layer and position in the model's input row
    (positions in log-spaced ranges). ``by_pos[layer][f]`` [max_pos] float (NaN: no token at that position)."""
    from plotly.subplots import make_subplots

    fracs = (0.5, 0.9)
    layer_ids = sorted(by_pos)
    width = max(len(v) for d in by_pos.values() for v in d.values())
    ranges = _position_bins(width)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.1,
                        subplot_titles=[f"{round(f * 100)}% of Σ|m|·‖v‖" for f in fracs])
    for j, f in enumerate(fracs):
        z = []
        for layer in layer_ids:
            v = np.asarray(by_pos[layer][f], dtype=np.float64)
            row = []
            for a, b in ranges:
                part = v[a:b + 1]
                part = part[np.isfinite(part)]
                row.append(float(part.mean()) if part.size else None)
            z.append(row)
        labels = [str(a) if a == b else f"{a}–{b}" for a, b in ranges]
        keep = [i for i in range(len(ranges)) if any(r[i] is not None for r in z)]
        z = [[r[i] for i in keep] for r in z]
        labels = [labels[i] for i in keep]
        axis = "coloraxis" if j == 0 else "coloraxis2"
        fig.add_trace(go.Heatmap(z=z, x=labels, y=layer_ids, coloraxis=axis,
                                 hovertemplate=f"layer %{{y}}, position %{{x}}<br>{round(f * 100)}% of the mass: "
                                               "%{z:,.1f} neurons (mean)<extra></extra>"), row=1, col=j + 1)
        fig.update_xaxes(title_text="position in the row", type="category", row=1, col=j + 1)
    bar = dict(len=1.0, y=0.5, thickness=12, title=dict(text="neurons", side="right"))
    fig.update_layout(coloraxis=dict(colorscale="Greens", colorbar=dict(x=0.45, **bar)),
                      coloraxis2=dict(colorscale="Purples", colorbar=dict(x=1.0, **bar)))
    _layout(fig, "Mass-L0 by position in the input row: neurons carrying 50% / 90% of Σ<sub>i</sub> |m<sub>i</sub>|·"
                 f"‖v<sub>i</sub>‖ at a token<br><sup>mean over the tokens at each position of the row (position ranges "
                 f"log-spaced; {n_tokens:,} tokens); of {d_mlp:,} neurons</sup>", "", "", height=430, top=80)
    fig.update_layout(xaxis_title="position in the row", yaxis_title="layer")
    fig.update_yaxes(dtick=max(1, -(-len(layer_ids) // 16)))
    for ann in fig.layout.annotations:
        ann.font.size = 12
    return fig


def _name_points(fig: go.Figure, named: pd.DataFrame, layer_ids: list, lo: float, hi: float, height: int) -> None:
    """Label each row of ``named`` (layer, id, clipped = its max |m|) beside its dot: left of it in the right
    half of the layers, right of it in the left half; labels of one layer that would overlap are moved apart
    vertically (the y axis is log10, from lo to hi, over about height - 120 pixels)."""
    mid = (layer_ids[0] + layer_ids[-1]) / 2 if layer_ids else 0
    px = max(height - 120, 60) / max(hi - lo, 1e-6)  # pixels per decade
    placed: dict[int, list[float]] = {}
    for row in named.sort_values("clipped", ascending=False).itertuples():
        y = float(np.log10(row.clipped))
        want = -y * px  # pixel position (down = larger)
        for other in placed.get(row.layer, []):
            if abs(want - other) < 15:
                want = other + 15
        placed.setdefault(row.layer, []).append(want)
        right = row.layer < mid
        fig.add_annotation(x=row.layer, y=y, text=f"{row.id}: {row.clipped:,.4g}", showarrow=True, arrowhead=0,
                           arrowwidth=1, arrowcolor="#868e96", ax=16 if right else -16, ay=want + y * px,
                           xanchor="left" if right else "right", font=dict(size=11, color="#212529"),
                           bgcolor="rgba(255,255,255,0.85)")


def max_abs(neurons: pd.DataFrame, top: int = 5) -> go.Figure:
    """Distribution over each layer's neurons of max |m| on a log axis (box: quartiles, whiskers 5–95%), the
    neurons above their layer's whisker as grey dots, each layer's largest as a black dot, and the ``top``
    largest of the model named ("layer.neuron: max |m|")."""
    fig = go.Figure()
    layer_ids = sorted(int(x) for x in neurons["layer"].unique())
    positive = neurons["max_abs"][neurons["max_abs"] > 0]
    floor = float(positive.min()) if len(positive) else 1e-6
    ma = neurons["max_abs"].astype("float64").clip(lower=floor)  # a log axis: 0 (never any m) drawn at the floor
    by_layer = ma.groupby(neurons["layer"])
    q = by_layer.quantile([0.05, 0.25, 0.5, 0.75, 0.95]).unstack()
    fig.add_trace(go.Box(x=layer_ids, q1=q[0.25].tolist(), median=q[0.5].tolist(), q3=q[0.75].tolist(),
                         lowerfence=q[0.05].tolist(), upperfence=q[0.95].tolist(), name="neurons' max |m|",
                         marker_color=POS, boxpoints=False, hoverinfo="skip"))
    above = ma > neurons["layer"].map(q[0.95])
    tail = neurons[above]
    fig.add_trace(go.Scatter(x=tail["layer"], y=ma[above], mode="markers", name="above the 95th percentile",
                             text=tail["id"], marker=dict(color="#adb5bd", size=3),
                             hovertemplate="%{text}: max |m| %{y:,.4g}<extra></extra>"))
    best = neurons.loc[by_layer.idxmax()]
    fig.add_trace(go.Scatter(x=best["layer"], y=ma[best.index], mode="markers", name="largest of the layer",
                             text=best["id"], marker=dict(color="#212529", size=6),
                             hovertemplate="%{text}: max |m| %{y:,.4g}<extra></extra>"))
    named = neurons.assign(clipped=ma).nlargest(top, "clipped")
    _name_points(fig, named, layer_ids, lo=float(np.log10(ma.min())), hi=float(np.log10(ma.max())), height=360)
    fig.update_yaxes(type="log", exponentformat="power", dtick=1)
    fig.update_xaxes(range=[layer_ids[0] - 0.7, layer_ids[-1] + 0.7] if layer_ids else None)
    n = f"{int(neurons['n'].max()):,} tokens" if len(neurons) else "no tokens"
    return _layout(fig, f"Max |m| per neuron by layer, log axis (box 25–75%, whiskers 5–95%)<br><sup>the {len(named)} "
                        f"largest named (layer.neuron: max |m|); over {n}</sup>", "layer", "max |m| (log)", height=360)


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
    return _layout(fig, f"m > 0: firing rate per layer (firing = m > 0; over {_tokens(layers)})", "layer", "share of tokens")


def dead_dense(layers: pd.DataFrame) -> go.Figure:
    """Dead (never m > 0) and dense (m > 0 on more than half of the tokens) neurons per layer."""
    fig = go.Figure([
        go.Bar(x=layers["layer"], y=layers["dead"], name="dead: never m > 0", marker_color="#868e96"),
        go.Bar(x=layers["layer"], y=layers["dense"], name="dense: m > 0 on > 50% of tokens", marker_color=POS),
    ])
    fig.update_layout(barmode="group")
    d_mlp = int(layers["d_mlp"].max()) if len(layers) else 0
    return _layout(fig, f"m > 0: dead (never m > 0) and dense (m > 0 on > 50% of tokens) neurons (of {d_mlp:,}; {_tokens(layers)})", "layer",
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
    return _layout(fig, f"m > 0: L0, neurons with m > 0 per token (of {d_mlp:,}; over {_tokens(layers)})", "layer",
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
    return _layout(fig, f"m > 0: distribution of L0 per layer (share of {n_tokens:,} tokens per L0 range of {step})",
                   "neurons active (m > 0)", "layer", height=360)


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


# the overview's two sections, in order: magnitude figures (every family), then m > 0 for comparison
MAGNITUDE = ("active_share", "dense_rare", "mass_l0", "max_abs", "mass_distribution", "mass_by_position")
SIGN = ("firing_rate", "dead_dense", "l0", "l0_distribution", "quadrants")
WIDE = ("mass_distribution", "mass_by_position")  # figures that take the page's full width


def layer_figures(layers: pd.DataFrame, neurons: pd.DataFrame, l0_hists: dict | None = None,
                  mass: dict | None = None) -> dict[str, go.Figure]:
    """The overview page's figures, by name, in the order of MAGNITUDE then SIGN. ``mass``:
    {"distribution": {layer: {0.5: [d_mlp + 1], 0.9: ...}}, "by_position": {layer: {0.5: [max_pos], ...}}}
    from LayerStats.mass (kvmem.report.overview.mass_data); the mass figures need it (mass_l0 needs the
    layers table's mass columns), the quadrants a gated model."""
    d_mlp = _d_mlp(layers)
    n_tokens = int(layers["n_tokens"].max()) if len(layers) else 0
    figs = {"active_share": active_share(layers), "dense_rare": dense_rare(layers)}
    if layers["mass50_mean"].notna().any():
        figs["mass_l0"] = mass_l0(layers)
    figs["max_abs"] = max_abs(neurons)
    if mass:
        figs["mass_distribution"] = mass_distribution(mass["distribution"], d_mlp)
        figs["mass_by_position"] = mass_by_position(mass["by_position"], d_mlp, n_tokens)
    figs.update(firing_rate=firing_rate(layers), dead_dense=dead_dense(layers), l0=l0_by_layer(layers))
    if l0_hists:
        figs["l0_distribution"] = l0_distribution(l0_hists)
    if "gate_pos_up_pos" in layers:
        figs["quadrants"] = quadrants(layers)
    return figs
