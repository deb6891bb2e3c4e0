"""Claims about FFN layers, each checked against the measured numbers with an explicit rule.

``findings(results, n_layers)`` returns a list of dicts (written as ``analysis/findings.json``):
  claim       the claim as people state it, with its source
  measure     the analysis that tests it (kvmem.analysis.<measure>)
  figures     the tables and columns to plot: [{"table": "agreement_layers.parquet", "x": "layer", "y": [...]}]
  threshold   the thresholds the numbers depend on (text)
  n_tokens    the token count behind the numbers
  baseline    what the numbers are compared with (text)
  rule        the verdict rule, stated in words (the code below implements exactly this)
  verdict     "supported" | "not supported" | "mixed"
  numbers     the figures the verdict was computed from (dict of floats)
Layers are split into thirds by relative depth (kvmem.analysis.common.thirds). A claim whose measure was
not run is left out.
"""

from __future__ import annotations

import math

from kvmem.analysis.common import thirds

# --- the rules' constants ------------------------------------------------------------------------
AGREE_SE = 3.0  # upper-third agreement must exceed its baseline by 3 binomial standard errors of the baseline ...
AGREE_RATIO = 2.0  # ... and be at least twice the baseline
LEX_MARGIN = 0.02  # lower-third lexical excess (share - baseline) must exceed upper's by 2 points
RETAIN_MARGIN = 0.05  # lower-third kept_1 must exceed upper's by 5 points
SPARSE_ACTIVE = 0.10  # "sparse": on average at most 10% of neurons above 10% of their max per token ...
SPARSE_CARRY = 0.25  # ... and 90% of the output norm bound carried by at most 25% of the neurons
NOVEL_SUPPORTED, NOVEL_MIXED = 0.5, 0.25  # share of tokens whose FFN prediction no top-10 sub-update makes
KEEP_SUPPORTED = 0.5  # the residual's top token kept on at least half the tokens
NONLIN_RATIO = 0.5  # linearization costs at least half of what removal costs
KNOCK_RATIO, KNOCK_MIN = 2.0, 0.01  # top-k zeroing costs >= 2x random-k zeroing and >= 0.01 nats
MAJORITY = 0.5


def _mean(df, col, layers):
    sel = df[df.layer.isin(layers)][col]
    return float(sel.mean()) if len(sel) else math.nan


def _verdict(checks: list[bool]) -> str:
    return "supported" if all(checks) else "not supported" if not any(checks) else "mixed"


def _band(x: float, hi: float, lo: float) -> str:
    return "supported" if x >= hi else "mixed" if x >= lo else "not supported"


def findings(results: dict, n_layers: int) -> list[dict]:
    out = []
    if "agreement" in results:
        r = results["agreement"]
        df = r["layers"]
        th = thirds(df.layer.tolist(), n_layers)
        up, lo = _mean(df, "agree_top1", th["upper"]), _mean(df, "agree_top1", th["lower"])
        base_up = _mean(df, "base_top1", th["upper"])
        n_up = float(df[df.layer.isin(th["upper"])].n_neurons.sum())
        margin = AGREE_SE * math.sqrt(max(base_up * (1 - base_up), 0.0) / max(n_up, 1.0))
        a = up >= base_up + margin and up >= AGREE_RATIO * base_up
        extra = {}
        if "agree_neg_top1" in df.columns:  # gated: suppressed token vs the bottom examples' next tokens
            extra = {f"{part}_{col}": _mean(df, col, th[part]) for part in ("lower", "upper")
                     for col in ("agree_neg_top1", "base_neg_top1")}
        out.append({
            "claim": "A neuron's value vector predicts the token that follows its top-activating examples, "
                     "near chance in lower layers and rising in upper layers (Geva et al. 2021, section 5).",
            "measure": "agreement",
            "figures": [{"table": "agreement_layers.parquet", "x": "layer",
                         "y": ["agree_top1", "base_top1", "agree_topk", "base_topk"]
                         + (["agree_neg_top1", "base_neg_top1"] if "agree_neg_top1" in df.columns else [])}],
            "threshold": f"value top-1 token among the next tokens of the neuron's top {int(df.n_examples.max())} "
                         f"examples; top-{r.meta['k']} for agree_topk",
            "n_tokens": r.meta["n_tokens"],
            "baseline": r.meta["baseline"],
            "rule": f"supported if the upper third's mean agree_top1 exceeds its baseline by {AGREE_SE:g} binomial "
                    f"standard errors (sqrt(p(1-p)/n), n = the upper third's neurons; here {margin:.4f}) and is at "
                    f"least {AGREE_RATIO:g}x it, AND exceeds the lower third's; mixed if one holds; else not supported",
            "verdict": _verdict([a, up > lo]),
            "numbers": {"upper_agree_top1": up, "upper_base_top1": base_up, "margin": margin, "upper_neurons": n_up, "lower_agree_top1": lo,
                        "lower_base_top1": _mean(df, "base_top1", th["lower"]),
                        "upper_agree_topk": _mean(df, "agree_topk", th["upper"]),
                        "upper_base_topk": _mean(df, "base_topk", th["upper"])} | extra})
    if "lexical" in results:
        r = results["lexical"]
        df = r["layers"].assign(excess=lambda d: d.same_token - d.base_same_token)
        th = thirds(df.layer.tolist(), n_layers)
        ex_lo, ex_up = _mean(df, "excess", th["lower"]), _mean(df, "excess", th["upper"])
        k_lo, k_up = _mean(df, "kept_1", th["lower"]), _mean(df, "kept_1", th["upper"])
        out.append({
            "claim": "Keys in lower layers detect shallow (lexical) patterns, keys in upper layers semantic ones "
                     "(Geva et al. 2021, section 4).",
            "measure": "lexical",
            "figures": [{"table": "lexical_layers.parquet", "x": "layer",
                         "y": ["same_token", "base_same_token", "same_bigram", "kept_1", "kept_2"]}],
            "threshold": "same_token: share of top examples on the neuron's most frequent token; kept_1: share of "
                         f"examples keeping >= {r.meta['kept_threshold']} of their activation with only the "
                         "activating token as context",
            "n_tokens": r.meta["n_tokens"],
            "baseline": r.meta["baseline"],
            "rule": f"supported if the lower third's lexical excess (same_token - baseline) exceeds the upper "
                    f"third's by {LEX_MARGIN} AND its kept_1 exceeds the upper third's by {RETAIN_MARGIN}; "
                    "mixed if one holds; else not supported",
            "verdict": _verdict([ex_lo >= ex_up + LEX_MARGIN, k_lo >= k_up + RETAIN_MARGIN]),
            "numbers": {"lower_same_token": _mean(df, "same_token", th["lower"]),
                        "upper_same_token": _mean(df, "same_token", th["upper"]),
                        "lower_excess": ex_lo, "upper_excess": ex_up, "lower_kept_1": k_lo, "upper_kept_1": k_up,
                        "lower_kept_2": _mean(df, "kept_2", th["lower"]),
                        "upper_kept_2": _mean(df, "kept_2", th["upper"])}})
    if "sparsity" in results:
        r = results["sparsity"]
        s = r["model"].iloc[0]
        out.append({
            "claim": "FFN activations are sparse: few neurons are active per token and few carry the output.",
            "measure": "sparsity",
            "figures": [{"table": "sparsity_layers.parquet", "x": "layer",
                         "y": ["active_gt0", "active_gt1pct_max", "active_gt10pct_max", "carry50_share",
                               "carry90_share"]}],
            "threshold": "active: m > 0, > 1% and > 10% of the neuron's max; carry: share of d_mlp whose "
                         "|m_i|*||v_i|| sum to 50% / 90% of the total",
            "n_tokens": r.meta["n_tokens"],
            "baseline": r.meta["baseline"],
            "rule": f"supported if on average at most {SPARSE_ACTIVE:.0%} of neurons exceed 10% of their max per "
                    f"token AND 90% of the norm bound is carried by at most {SPARSE_CARRY:.0%} of the neurons; "
                    "mixed if one holds; else not supported",
            "verdict": _verdict([s.active_gt10pct_max <= SPARSE_ACTIVE, s.carry90_share <= SPARSE_CARRY]),
            "numbers": {k: float(s[k]) for k in ("active_gt0", "active_gt1pct_max", "active_gt10pct_max",
                                                 "abs_gt_1x_mean", "abs_gt_10x_mean", "carry50_mean",
                                                 "carry90_mean", "carry50_share", "carry90_share")}})
    if "composition" in results:
        r = results["composition"]
        df = r["layers"]
        novel = float(df.novel_top10.mean())
        out.append({
            "claim": "An FFN layer's prediction is usually a composition: none of its individual top memories "
                     "predicts it (Geva et al. 2021, section 6: at least 68% of examples).",
            "measure": "composition",
            "figures": [{"table": "composition_layers.parquet", "x": "layer",
                         "y": ["novel_top10", "novel_all", "top1_agrees", "chance_top10"]}],
            "threshold": f"top {r.meta['top_sub_updates']} sub-updates by |m_i|*||v_i||",
            "n_tokens": r.meta["n_tokens"], "baseline": r.meta["baseline"],
            "rule": f"supported if the mean novel_top10 over layers is >= {NOVEL_SUPPORTED}, mixed if >= "
                    f"{NOVEL_MIXED}, else not supported",
            "verdict": _band(novel, NOVEL_SUPPORTED, NOVEL_MIXED),
            "numbers": {"novel_top10": novel, "novel_all": float(df.novel_all.mean()),
                        "top1_agrees": float(df.top1_agrees.mean()), "chance_top10": float(df.chance_top10.mean())}})
        share = float((df.keep >= KEEP_SUPPORTED).mean())
        out.append({
            "claim": "The FFN update usually keeps the residual stream's top prediction; it changes it by promoting "
                     "its own token or by eliminating the old one less often (Geva et al. 2021, section 6.2).",
            "measure": "composition",
            "figures": [{"table": "composition_layers.parquet", "x": "layer",
                         "y": ["keep", "promotion", "elimination"]}],
            "threshold": f"keep >= {KEEP_SUPPORTED} of tokens in a layer", "n_tokens": r.meta["n_tokens"],
            "baseline": "keep + promotion + elimination = 1 per layer",
            "rule": f"supported if keep >= {KEEP_SUPPORTED} in more than {MAJORITY:.0%} of layers, mixed if in some, "
                    "not supported if in none",
            "verdict": "supported" if share > MAJORITY else "mixed" if share > 0 else "not supported",
            "numbers": {"layers_keeping": share, "keep": float(df.keep.mean()),
                        "promotion": float(df.promotion.mean()), "elimination": float(df.elimination.mean())}})
    if "knockouts" in results:
        out.extend(_knockout_findings(results["knockouts"]))
    return out


def _knockout_findings(r) -> list[dict]:
    df = r["layers"]
    k = max(r.meta["ks"])
    rem, lin = df["remove"], df["linear"]
    nonlin = float(((lin >= NONLIN_RATIO * rem) & (rem > 0)).mean())
    top, rnd = df[f"top_max_k{k}"], df[f"random_k{k}"]
    matters = float(((top >= KNOCK_RATIO * rnd.clip(lower=0)) & (top >= KNOCK_MIN)).mean())
    common = {"measure": "knockouts", "n_tokens": r.meta["n_tokens"]}
    return [
        common | {
            "claim": "The FFN's nonlinearity matters: replacing the activation by the identity costs about as "
                     "much as removing the FFN.",
            "figures": [{"table": "knockouts_layers.parquet", "x": "layer", "y": ["remove", "linear"]}],
            "threshold": "loss increase in nats per token", "baseline": f"unmodified loss {r.meta['baseline_loss']:.4f}",
            "rule": f"supported if linear >= {NONLIN_RATIO} x remove (and remove > 0) in more than {MAJORITY:.0%} of "
                    "layers, mixed if in some, not supported if in none",
            "verdict": "supported" if nonlin > MAJORITY else "mixed" if nonlin > 0 else "not supported",
            "numbers": {"layers_share": nonlin, "mean_remove": float(rem.mean()), "mean_linear": float(lin.mean()),
                        "max_remove": float(rem.max()), "argmax_remove_layer": int(df.layer[rem.idxmax()])}},
        common | {
            "claim": "A few high-activation neurons matter more than the rest: zeroing a layer's top neurons by max "
                     "activation costs more than zeroing as many random neurons.",
            "figures": [{"table": "knockouts_layers.parquet", "x": "layer",
                         "y": [f"top_max_k{k}", f"top_rate_k{k}", f"random_k{k}"]}],
            "threshold": f"k = {k} neurons per layer; loss increase in nats per token",
            "baseline": f"k random neurons of the same layer ({r.meta['n_random']} draw(s))",
            "rule": f"supported if top_max >= {KNOCK_RATIO} x random and >= {KNOCK_MIN} nats in more than "
                    f"{MAJORITY:.0%} of layers, mixed if in some, not supported if in none",
            "verdict": "supported" if matters > MAJORITY else "mixed" if matters > 0 else "not supported",
            "numbers": {"layers_share": matters, "mean_top_max": float(top.mean()),
                        "mean_top_rate": float(df[f"top_rate_k{k}"].mean()), "mean_random": float(rnd.mean())}},
    ]
