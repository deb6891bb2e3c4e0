"""Claims about FFN layers as key-value memories, each judged on intervals by a rule of ``rules.toml``.

``findings(results, n_layers)`` returns one dict per claim of the rules file, in its order (the list
written into ``analysis/findings.json`` by ``document``):
  name, title, claim, source   the claim as the paper states it, with section and figure
  measure                      the analysis that tests it (kvmem.analysis.<measure>)
  verdict                      "supported" | "not supported" | "inconclusive" | "not tested"
  reason                       why "not tested" (measure not run, column missing, empty depth third)
  checks                       [{"check", "state": yes/no/unsure, "estimate", "lo", "hi", "threshold"}]
  rule, threshold, baseline    the rule in words (thresholds filled in), its thresholds, the baseline
  numbers                      every figure the verdict used: {name, name_lo, name_hi, n_name, ...}
  figures                      tables and columns to plot: [{"table", "x", "y", "ref"}]
  n_tokens, note, seen_data    sample size; the rules file's note; whether a threshold was set after data
``results`` maps measure names to AnalysisResults ({"layers", optional "units", ...} tables, see the
table contract in kvmem.analysis.rules). Depth thirds come from kvmem.analysis.common.thirds.
"""

from __future__ import annotations

import math

from kvmem.analysis import ci
from kvmem.analysis.common import thirds
from kvmem.analysis.rules import (NO, NOT_TESTED, UNSURE, YES, Est, Rules, above, below, combine, difference,
                                  load_rules, majority, null_pooled, pick, pooled, per_layer)

ORDER = ("agreement", "lexical", "sparsity", "composition", "cases", "nonlinear", "topk")


def _check(name: str, state: str, e: Est | None, threshold: float | None) -> dict:
    if e is not None and e.few_docs:
        state = UNSURE  # too few documents to decide (rules.toml min_docs)
    return {"check": name, "state": state, "estimate": None if e is None else e.value,
            "lo": None if e is None else e.lo, "hi": None if e is None else e.hi, "threshold": threshold,
            "interval": None if e is None else e.how, "docs": None if e is None or e.docs != e.docs else e.docs}


class _NotTested(Exception):
    pass


def _need(x, what: str):
    if x is None or (isinstance(x, list) and not x):
        raise _NotTested(what)
    return x


def _layers_of(res) -> list[int]:
    df = res.tables.get("layers")
    return sorted(int(x) for x in df.layer.unique()) if df is not None and "layer" in df else []


def _third(res, n_layers: int, part: str) -> list[int]:
    layers = _layers_of(res)
    got = thirds(layers, n_layers)[part]
    return _need(got, f"the {part} third has no analysed layer (analysed: {_fmt_layers(layers)} of {n_layers})")


def _fmt_layers(layers) -> str:
    return ",".join(map(str, layers)) if len(layers) <= 8 else f"{layers[0]}-{layers[-1]} ({len(layers)} layers)"


def _uniform(res, names) -> float | None:
    for name in names:
        if name in res.meta:
            return float(res.meta[name])
    df = res.tables.get("layers")
    col = pick(df, names)
    return float(df[col].mean()) if col is not None else None


# --- the claims ------------------------------------------------------------------------------------------

def _variant(res, c: dict) -> dict:
    """The claim's column names for the first of its ``variants`` the measure has (rate v, baseline base_v,
    draws v in the null table, uniform_v); the claim's own names when none is present."""
    for v in c.get("variants", []):
        if pick(res.tables.get("units"), [v]) or pick(res.tables.get("layers"), [v]):
            return {**c, "rate": [v], "baseline": [f"base_{v}"], "null": [v], "uniform": [f"uniform_{v}"],
                    "variant": v}
    return c


def _agreement(res, c: dict, n_layers: int, rules: Rules, nums: dict) -> list[dict]:
    upper, lower = _third(res, n_layers, "upper"), _third(res, n_layers, "lower")
    c = _variant(res, c)
    nums["rate"] = c.get("variant", c["rate"][0])
    if c.get("variant") not in (None, "ex1"):  # the paper's own measure beside the one judged
        paper = pooled(res, upper, ["ex1"], rules)
        if paper is not None:
            nums.update(paper.as_dict("upper_ex1"))
    up = _need(pooled(res, upper, c["rate"], rules), f"no agreement column {c['rate']}")
    bu = _need(null_pooled(res, upper, c["null"], rules) or pooled(res, upper, c["baseline"], rules),
               f"no baseline column {c['baseline']}")
    lo = _need(pooled(res, lower, c["rate"], rules), "no lower-third agreement")
    bl = _need(null_pooled(res, lower, c["null"], rules) or pooled(res, lower, c["baseline"], rules),
               "no lower-third baseline")
    uni = _uniform(res, c["uniform"])
    nums.update(up.as_dict("upper") | bu.as_dict("upper_base") | lo.as_dict("lower") | bl.as_dict("lower_base"))
    if uni is not None:
        nums["uniform"] = uni
    if bu.how.startswith("spread"):  # pooled permutation p-value of the upper third against the draws
        null = res.tables["null"]
        col = pick(null, c["null"])
        sel = null[null.layer.isin(upper) & null[col].notna()]
        w = sel[f"n_{col}"] if f"n_{col}" in sel.columns else 1.0
        draws = (sel[col] * w).groupby(sel.draw).sum() / (w if isinstance(w, float) else w.groupby(sel.draw).sum())
        nums["upper_p_perm"] = ci.perm_pvalue(up.value, draws.to_numpy())
    bar = max(bu.hi, uni if uni is not None else -math.inf)
    checks = [_check("upper third above both baselines", above(up, bar), up, bar)]
    margin = float(c["lower_margin"])
    if lo.lo <= bl.hi or lo.hi <= bl.value + margin:
        near = YES
    elif lo.lo > bl.hi + margin:
        near = NO
    else:
        near = UNSURE
    checks.append(_check("lower third near chance", near, lo, bl.hi + margin))
    return checks


def _lexical(res, c: dict, n_layers: int, rules: Rules, nums: dict) -> list[dict]:
    upper, lower = _third(res, n_layers, "upper"), _third(res, n_layers, "lower")
    units = res.tables.get("units")
    names = c["excess"]
    if pick(res.tables.get("layers"), names) is None and pick(units, names) is None:  # derive the excess
        st, bst = pick(res.tables.get("layers"), c["same_token"]), pick(res.tables.get("layers"), c["base_same_token"])
        _need(st and bst, "no lexical excess or same_token/base_same_token columns")
        res = _with_layer_column(res, "_excess", lambda d: d[st] - d[bst])
        names = ["_excess"]
    ex = _need(difference(res, lower, res, upper, names, rules), "no lexical excess")
    kept = _need(difference(res, lower, res, upper, c["kept"], rules), f"no column {c['kept']}")
    nums.update(ex.as_dict("excess_lower_minus_upper") | kept.as_dict("kept_1_lower_minus_upper"))
    for part, layers in (("lower", lower), ("upper", upper)):
        for key, cols in (("excess", names), ("kept_1", c["kept"])):
            e = pooled(res, layers, cols, rules)
            if e is not None:
                nums.update(e.as_dict(f"{part}_{key}"))
    return [_check("lexical excess: lower - upper > 0", above(ex, 0.0), ex, 0.0),
            _check("kept_1: lower - upper > 0", above(kept, 0.0), kept, 0.0)]


def _with_layer_column(res, name, fn):
    from kvmem.analysis.result import AnalysisResult

    tables = {"layers": res.tables["layers"].assign(**{name: fn})}
    return AnalysisResult(res.measure, tables, res.meta)


def _sparsity(res, c: dict, n_layers: int, rules: Rules, nums: dict) -> list[dict]:
    layers = _need(_layers_of(res), "no layers")
    act = _need(pooled(res, layers, c["active"], rules), f"no active-share column {c['active']}")
    carry = _need(pooled(res, layers, c["carry"], rules), f"no carry column {c['carry']}")
    nums.update(act.as_dict("active") | carry.as_dict("carry90_share"))
    return [_check(f"active share < {c['max_active']:.0%}", below(act, c["max_active"]), act, c["max_active"]),
            _check(f"carry-90% share < {c['max_carry']:.0%}", below(carry, c["max_carry"]), carry, c["max_carry"])]


def _composition(res, c: dict, n_layers: int, rules: Rules, nums: dict) -> list[dict]:
    novel = _need(per_layer(res, c["rate"], rules), f"no composition column {c['rate']}")
    base = _need(per_layer(res, c["baseline"], rules), f"no composition baseline column {c['baseline']}")
    checks = []
    for layer, e in sorted(novel.items()):
        b = base.get(layer)
        states = [above(e, c["paper_share"])]
        if b is not None:
            states.append(below(e, b.lo) if c.get("baseline_relation", "below") == "below" else above(e, b.hi))
        state = NO if NO in states else YES if all(s == YES for s in states) else UNSURE
        checks.append(_check(f"layer {layer}: novel share vs {c['paper_share']:.0%} and its baseline", state, e,
                             c["paper_share"]))
        nums.update(e.as_dict(f"L{layer}_novel") | ({} if b is None else b.as_dict(f"L{layer}_base")))
    worst = min(novel.values(), key=lambda e: e.value)
    nums.update(worst.as_dict("min_layer_novel"))
    return checks


def _cases(res, c: dict, n_layers: int, rules: Rules, nums: dict) -> list[dict]:
    layers = _need(_layers_of(res), "no layers")
    est = {}
    for key in ("residual", "ffn", "agree", "compose"):
        est[key] = _need(pooled(res, layers, c[key], rules), f"no case column {c[key]}")
        nums.update(est[key].as_dict(f"case_{key}"))
    changed = _need(pooled(res, layers, c["changed_to_ffn"], rules), f"no column {c['changed_to_ffn']}")
    nums.update(changed.as_dict("changed_to_ffn"))
    others = [above(est["residual"], est[k].hi) for k in ("ffn", "agree", "compose")]
    dom = NO if NO in others else YES if all(s == YES for s in others) else UNSURE
    bar = max(est[k].hi for k in ("ffn", "agree", "compose"))
    return [_check("residual case above each other case", dom, est["residual"], bar),
            _check(f"changed tops that are the FFN's own top < {c['rare']:.0%}", below(changed, c["rare"]), changed,
                   c["rare"])]


def _nonlinear(res, c: dict, n_layers: int, rules: Rules, nums: dict) -> list[dict]:
    rem = _need(per_layer(res, c["remove"], rules), "no 'remove' column")
    lin = _need(per_layer(res, c["linear"], rules), "no 'linear' column")
    checks = []
    for layer in sorted(set(rem) & set(lin)):
        r, e = rem[layer], lin[layer]
        bar = c["ratio"] * r.value
        # removal that costs nothing (its interval at or below 0) leaves nothing for the nonlinearity to matter to
        state = NO if (e.hi <= bar or r.hi <= 0) else YES if (e.lo > bar and r.lo > 0) else UNSURE
        checks.append(_check(f"layer {layer}: linear > {c['ratio']} x remove", state, e, bar))
        nums.update(r.as_dict(f"L{layer}_remove") | e.as_dict(f"L{layer}_linear"))
    return _need(checks, "no layer with both knock-outs")


def _topk(res, c: dict, n_layers: int, rules: Rules, nums: dict) -> list[dict]:
    k = max(res.meta.get("ks") or [0])
    top = _need(per_layer(res, c["top"], rules, k=k), f"no top-k column for k = {k}")
    rnd = _need(per_layer(res, c["random"], rules, k=k), f"no random-k column for k = {k}")
    exc = per_layer(res, c.get("excess", []), rules, k=k)  # paired per-token difference, where measured
    nums["k"] = k
    checks = []
    for layer in sorted(set(top) & set(rnd)):
        t, r = top[layer], rnd[layer]
        if layer in exc:  # the paired difference's interval against 0, and the top-k increase above the floor
            e = exc[layer]
            state = NO if e.hi <= 0 else YES if (e.lo > 0 and t.lo > c["min_nats"]) else UNSURE
            checks.append(_check(f"layer {layer}: top-{k} minus random-{k} > 0", state, e, 0.0))
            nums.update(e.as_dict(f"L{layer}_excess"))
        else:  # unpaired: the top-k interval above the random-k interval
            bar = max(r.hi, c["min_nats"])
            state = YES if t.lo > bar else NO if t.hi <= r.value else UNSURE
            checks.append(_check(f"layer {layer}: top-{k} above random-{k}", state, t, bar))
        nums.update(t.as_dict(f"L{layer}_top") | r.as_dict(f"L{layer}_random"))
    return _need(checks, "no layer with both knock-outs")


CLAIMS = {"agreement": (_agreement, combine), "lexical": (_lexical, combine), "sparsity": (_sparsity, combine),
          "composition": (_composition, combine), "cases": (_cases, combine),
          "nonlinear": (_nonlinear, majority), "topk": (_topk, majority)}

FIGURES = {
    "agreement": ("agreement_layers.parquet", ["ex1", "base_ex1", "uniform_ex1", "docs_any", "next_top10"]),
    "lexical": ("lexical_layers.parquet", ["same_token", "base_same_token", "excess_token", "kept_1", "kept_2"]),
    "sparsity": ("sparsity_layers.parquet", ["active1", "active10", "carry90_share", "active_gt0"]),
    "composition": ("composition_layers.parquet", ["novel_active", "novel_paired", "novel_top10"]),
    "cases": ("composition_layers.parquet", ["case_residual", "case_ffn", "case_agreement", "case_composition",
                                             "changed_to_ffn"]),
    "nonlinear": ("knockouts_layers.parquet", ["remove", "linear"]),
    "topk": ("knockouts_layers.parquet", ["top_max_k{k}", "top_rate_k{k}", "random_k{k}", "top_max_k{k}_excess"]),
}
DISTRIBUTIONS = {  # continuous per-unit columns drawn as their distribution per layer (box plots)
    "agreement": ["next_rank"], "lexical": ["excess_token"], "composition": ["n_active"],
    "topk": ["top_max_k{k}_excess"], "nonlinear": ["linear"]}
REFERENCE = {"agreement": [{"y": 0.035, "label": "Geva 2021 Fig. 4: up to ~3.5% (upper layers)"}],
             "composition": [{"y": 0.68, "label": "Geva 2021 §5.1: >= 68% in every layer"}]}


def _figures(name: str, res) -> list[dict]:
    table, ys = FIGURES[name]
    df = res.tables.get("layers")
    k = max(res.meta.get("ks") or [0]) if name == "topk" else None
    ys = [y.format(k=k) if k is not None else y for y in ys]
    ys = [y for y in ys if df is not None and y in df.columns]
    units = res.tables.get("units")
    dist = [y.format(k=k) if k is not None else y for y in DISTRIBUTIONS.get(name, [])]
    dist = [y for y in dist if units is not None and y in units.columns]
    return [{"table": table, "x": "layer", "y": ys, "ref": REFERENCE.get(name, []), "dist": dist}] if ys else []


def _text(c: dict) -> dict:
    """Thresholds of a claim (its numeric entries) and its rule with them filled in."""
    th = {k: v for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    try:
        rule = c["rule"].format(**th)
    except (KeyError, ValueError, IndexError):
        rule = c["rule"]
    return {"rule": rule, "thresholds": th,
            "threshold": "; ".join(f"{k} = {v:g}" for k, v in th.items()) or "see rule"}


def findings(results: dict, n_layers: int, rules: Rules | None = None) -> list[dict]:
    """One finding per claim of the rules (see the module docstring); claims whose measure was not run
    are kept, with verdict "not tested"."""
    rules = rules or load_rules()
    out = []
    for name, c in rules.data["claims"].items():
        fn, decide = CLAIMS[name]
        res = results.get(c["measure"])
        f = {"name": name, "title": c.get("title", name), "claim": c["claim"], "source": c["source"],
             "measure": c["measure"], **_text(c), "note": c.get("note", ""), "seen_data": bool(c.get("seen_data")),
             "n_tokens": None if res is None else res.meta.get("n_tokens"),
             "baseline": "" if res is None else str(res.meta.get("baseline", "")),
             "figures": [] if res is None else _figures(name, res)}
        nums: dict = {}
        if res is None:
            f.update(verdict=NOT_TESTED, reason=f"measure {c['measure']!r} was not run", checks=[], numbers={})
        else:
            try:
                checks = fn(res, c, n_layers, rules, nums)
                f.update(verdict=decide([ch["state"] for ch in checks]), reason="", checks=checks, numbers=nums)
            except _NotTested as e:
                f.update(verdict=NOT_TESTED, reason=str(e), checks=[], numbers=nums)
        out.append(f)
    return out


def document(results: dict, n_layers: int, rules: Rules | None = None) -> dict:
    """What findings.json holds: the kvmem version, the rules' version and sha256, the findings and the
    paper-versus-measured table (kvmem.analysis.paper)."""
    import kvmem
    from kvmem.analysis.paper import paper_table

    rules = rules or load_rules()
    return {"kvmem_version": kvmem.__version__, "rules": rules.header(),
            "findings": findings(results, n_layers, rules), "paper": paper_table(results, n_layers, rules)}
