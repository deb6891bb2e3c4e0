"""The papers' figures beside kvmem's measured counterparts (the ``[[paper]]`` entries of rules.toml).

``paper_table(results, n_layers)`` returns one row per entry:
  figure, quantity, paper        the paper's figure/section and its statement (text)
  paper_value                    the number the paper states in its text, or None (values only shown in a plot)
  measure, column                the kvmem measure and the column read (None: not measured)
  depth, layers, rel_depth       which layers were pooled (lower/middle/upper third, all, or the min/max
                                 layer) and their relative depths layer / (n_layers - 1) as "a-b"
  measured, lo, hi, n, interval  the estimate with its 95% interval (kvmem.analysis.rules.pooled) and how
                                 the interval was obtained
  status                         "measured", or why not ("measure not run", "no column ...", "empty third")
"""

from __future__ import annotations

from kvmem.analysis.common import thirds
from kvmem.analysis.rules import Rules, load_rules, null_pooled, per_layer, pick, pooled


def _rel(layers, n_layers: int) -> str:
    if not layers:
        return ""
    d = [layer / max(n_layers - 1, 1) for layer in layers]
    return f"{min(d):.2f}" if len(d) == 1 else f"{min(d):.2f}-{max(d):.2f}"


def paper_table(results: dict, n_layers: int, rules: Rules | None = None) -> list[dict]:
    rules = rules or load_rules()
    rows = []
    for p in rules.data.get("paper", []):
        row = {"figure": p["figure"], "quantity": p["quantity"], "paper": p["paper"],
               "paper_value": p.get("value"), "measure": p["measure"], "column": None, "depth": p["depth"],
               "layers": [], "rel_depth": "", "measured": None, "lo": None, "hi": None, "n": None,
               "interval": None, "status": ""}
        res = results.get(p["measure"])
        rows.append(row)
        if res is None:
            row["status"] = "measure not run"
            continue
        df = res.tables.get("layers")
        units = res.tables.get("units")
        col = pick(df, p["columns"]) or pick(units, p["columns"])
        if col is None:
            uniform = next((name for name in p["columns"] if name in res.meta), None)
            if uniform is not None:  # a constant of the measure (e.g. the uniform 1/|V| baseline)
                row.update(column=uniform, measured=float(res.meta[uniform]), status="measured (constant)")
            else:
                row["status"] = f"not measured (no column {' / '.join(p['columns'])})"
            continue
        row["column"] = col
        analysed = sorted(int(x) for x in df.layer.unique()) if df is not None else []
        if p["depth"] in ("min", "max"):
            est = per_layer(res, [col], rules)
            if not est:
                row["status"] = "no layer has a value"
                continue
            layer = (min if p["depth"] == "min" else max)(est, key=lambda k: est[k].value)
            layers, e = [layer], est[layer]
        else:
            layers = analysed if p["depth"] == "all" else thirds(analysed, n_layers)[p["depth"]]
            if not layers:
                row["status"] = f"not tested: the {p['depth']} third has no analysed layer"
                continue
            e = (null_pooled(res, layers, [c for c in p["columns"]] + [col.removeprefix("base_")], rules)
                 if p.get("null") else None) or pooled(res, layers, [col], rules)
            if e is None:
                row["status"] = "no value in these layers"
                continue
        row.update(layers=layers, rel_depth=_rel(layers, n_layers), measured=e.value, lo=e.lo, hi=e.hi, n=e.n,
                   interval=e.how, status="measured")
    return rows
