"""The Findings page: each claim about FFN layers, its verdict with the intervals it rests on, and the
papers' figures beside the measured ones.

Reads ``RUN/analysis/findings.json`` (written by ``kvmem analyze``: kvmem version, rules version and
sha256, findings, paper-versus-measured table) and the per-layer tables it names; the verdicts and their
rules come from kvmem.analysis.findings, this module only shows them. Per-layer figures draw each rate
with its 95% interval as a band (columns ``{y}_lo``/``{y}_hi``), the paper's stated values as dashed
reference lines (kvmem does not transcribe the papers' plotted curves), and, where the measure kept
continuous per-unit values (``{measure}_units.parquet``, the columns a figure lists under ``dist``), their
distribution per layer as box plots.
Older findings.json files (a bare list of kvmem 0.2 findings) still render.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go

import kvmem

if TYPE_CHECKING:
    from kvmem.profile.run import Run

VERDICT_CLASS = {"supported": "ok", "not supported": "bad", "inconclusive": "mixed", "mixed": "mixed",
                 "not tested": "untested"}
DEFAULTS = {"title": "", "source": "", "reason": "", "note": "", "seen_data": False, "threshold": "", "baseline": "",
            "rule": "", "n_tokens": None}  # keys a kvmem 0.2 finding lacks
PALETTE = ("#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599")


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def findings_figure(df: pd.DataFrame, x: str, ys: list[str], title: str, refs=()) -> go.Figure:
    """Lines of columns ``ys`` against ``x`` (usually layer), each with its ``_lo``/``_hi`` band where the
    table has one; ``refs``: [{"y", "label"}] dashed horizontal lines (the papers' stated values)."""
    fig = go.Figure()
    df = df.sort_values(x)
    for i, y in enumerate(c for c in ys if c in df.columns):
        color = PALETTE[i % len(PALETTE)]
        if f"{y}_lo" in df.columns and f"{y}_hi" in df.columns:
            fig.add_trace(go.Scatter(x=df[x].tolist(), y=df[f"{y}_hi"].tolist(), mode="lines", line=dict(width=0),
                                     showlegend=False, hoverinfo="skip", legendgroup=y))
            fig.add_trace(go.Scatter(x=df[x].tolist(), y=df[f"{y}_lo"].tolist(), mode="lines", line=dict(width=0),
                                     fill="tonexty", fillcolor=_rgba(color, 0.18), name=f"{y} 95% interval",
                                     hoverinfo="skip", legendgroup=y))
        fig.add_trace(go.Scatter(x=df[x].tolist(), y=df[y].tolist(), mode="lines+markers", name=y,
                                 line=dict(color=color), legendgroup=y))
    for ref in refs:
        fig.add_hline(y=ref["y"], line_dash="dash", line_color="#868e96", annotation_text=ref.get("label", ""),
                      annotation_position="top left")
    fig.update_layout(title=title, height=320, margin=dict(l=50, r=20, t=40, b=40), xaxis_title=x,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def distribution_figure(units: pd.DataFrame, y: str, title: str) -> go.Figure:
    """Box plot per layer of a continuous per-unit column (NaN = not counted); a log axis for ranks."""
    fig = go.Figure()
    if "rank" in y:
        fig.update_yaxes(type="log")
    for layer, g in units.dropna(subset=[y]).groupby("layer"):
        fig.add_trace(go.Box(y=g[y].tolist(), name=str(int(layer)), boxpoints=False, marker_color=PALETTE[0],
                             showlegend=False))
    fig.update_layout(title=title, height=300, margin=dict(l=50, r=20, t=40, b=40), xaxis_title="layer")
    return fig


def load_findings(run: Run) -> dict | None:
    """findings.json as {"findings", "paper", "rules", "kvmem_version"} (a kvmem 0.2 list: findings only)."""
    path = Path(run.path) / "analysis" / "findings.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return {"findings": data, "paper": [], "rules": {}, "kvmem_version": None}
    return {"findings": data.get("findings", []), "paper": data.get("paper", []), "rules": data.get("rules", {}),
            "kvmem_version": data.get("kvmem_version")}


def _continuous(s: pd.Series) -> bool:
    v = s.dropna()
    return len(v) > 0 and not v.isin([0, 1]).all()


def _figures(folder: Path, i: int, f: dict, figure_json) -> list:
    figs = []
    for j, spec in enumerate(f.get("figures") or []):
        table = folder / spec["table"]
        if not table.is_file():
            continue
        df = pd.read_parquet(table)
        ys = spec["y"] if isinstance(spec["y"], list) else [spec["y"]]
        title = spec.get("title") or f"{spec['table'].removesuffix('.parquet')}: {', '.join(ys)}"
        figs.append((f"f{i}-{j}", figure_json(findings_figure(df, spec.get("x", "layer"), ys, title,
                                                              spec.get("ref") or []))))
        units = folder / spec["table"].replace("_layers.parquet", "_units.parquet")
        if units.is_file() and units != table:
            u = pd.read_parquet(units)
            dist = spec.get("dist") or []
            for k, y in enumerate(y for y in dist if y in u.columns and "layer" in u.columns and _continuous(u[y])):
                fig = distribution_figure(u, y, f"{y} per unit, by layer (distribution)")
                figs.append((f"f{i}-{j}-d{k}", figure_json(fig)))
    return figs


def _fmt(v) -> str:
    if v is None or v != v:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def findings_page(run: Run, out: Path, env, figure_json) -> str | None:
    """Write ``findings.html`` into ``out`` if the run has been analysed; returns its name or None."""
    data = load_findings(run)
    if data is None:
        return None
    folder = Path(run.path) / "analysis"
    shown = []
    for i, f in enumerate(data["findings"]):
        numbers = [(k, v) for k, v in (f.get("numbers") or {}).items()]
        checks = [{"docs": None, **c, "shown": {k: _fmt(c.get(k)) for k in ("estimate", "lo", "hi", "threshold")}}
                  for c in f.get("checks") or []]
        shown.append({**DEFAULTS, **f, "figs": _figures(folder, i, f, figure_json), "numbers": numbers,
                      "checks": checks,
                      "css": VERDICT_CLASS.get(str(f.get("verdict")), "mixed")})
    paper = [{**r, "shown": {k: _fmt(r.get(k)) for k in ("paper_value", "measured", "lo", "hi")}}
             for r in data["paper"]]
    m = run.manifest["model"]
    html = env.get_template("findings.html").render(
        title=m["model"], version=kvmem.__version__, findings=shown, paper=paper, rules=data["rules"],
        analysed_with=data["kvmem_version"], n_layers=int(m["n_layers"]),
        n_tokens=int(run.manifest["corpus"]["n_tokens"]))
    (out / "findings.html").write_text(html, encoding="utf-8")
    return "findings.html"
