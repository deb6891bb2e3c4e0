"""The Findings page: each claim about FFN layers, the measured figure and a plain verdict.

Reads ``RUN/analysis/findings.json`` and the tables it names (written by ``kvmem analyze``); the
verdicts and their rules come from kvmem.analysis.findings, this module only shows them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

import kvmem

VERDICT_CLASS = {"supported": "ok", "not supported": "bad", "mixed": "mixed"}


def findings_figure(df: pd.DataFrame, x: str, ys: list[str], title: str) -> go.Figure:
    """Lines of columns ``ys`` against ``x`` (usually layer): one figure of the Findings page."""
    fig = go.Figure()
    for y in ys:
        if y in df.columns:
            fig.add_trace(go.Scatter(x=df[x].tolist(), y=df[y].tolist(), mode="lines+markers", name=y))
    fig.update_layout(title=title, height=300, margin=dict(l=50, r=20, t=40, b=40), xaxis_title=x,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def load_findings(run) -> list[dict] | None:
    path = Path(run.path) / "analysis" / "findings.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["findings"] if isinstance(data, dict) else data


def findings_page(run, out: Path, env, figure_json) -> str | None:
    """Write ``findings.html`` into ``out`` if the run has been analysed; returns its name or None."""
    items = load_findings(run)
    if items is None:
        return None
    shown = []
    for i, f in enumerate(items):
        figs = []
        for j, spec in enumerate(f.get("figures") or []):
            table = Path(run.path) / "analysis" / spec["table"]
            if table.is_file():
                df = pd.read_parquet(table)
                ys = spec["y"] if isinstance(spec["y"], list) else [spec["y"]]
                title = spec.get("title") or f"{spec['table'].removesuffix('.parquet')}: {', '.join(ys)}"
                figs.append((f"f{i}-{j}", figure_json(findings_figure(df, spec.get("x", "layer"), ys, title))))
        numbers = [(k, v) for k, v in (f.get("numbers") or {}).items()]
        shown.append({**f, "figs": figs, "numbers": numbers,
                      "css": VERDICT_CLASS.get(str(f.get("verdict")), "mixed")})
    m = run.manifest["model"]
    html = env.get_template("findings.html").render(
        title=m["model"], version=kvmem.__version__, findings=shown,
        n_tokens=int(run.manifest["corpus"]["n_tokens"]))
    (out / "findings.html").write_text(html, encoding="utf-8")
    return "findings.html"
