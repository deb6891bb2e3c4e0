"""The verdict rules on synthetic tables: each of the four states where the rules file says, the empty depth
third (issue 12 defect 8), the zero baseline (defect 7), the keep rule's second half (defect 9), the
composition rule per layer (defect 6), the rules' hash in findings.json and the paper-versus-measured table."""

import hashlib

import numpy as np
import pandas as pd
import pytest

from kvmem.analysis import ci
from kvmem.analysis.findings import document, findings
from kvmem.analysis.paper import paper_table
from kvmem.analysis.result import AnalysisResult
from kvmem.analysis.rules import RULES_PATH, Est, above, below, load_rules, pooled

N_LAYERS = 9  # thirds: 0-2 lower, 3-5 middle, 6-8 upper


def units_result(measure, layers, rates: dict, n_docs=400, per_doc=5, seed=0, extra_layer_cols=None, meta=None):
    """A measure with a units table: for each layer, n_docs * per_doc 0/1 units per column drawn with
    rate rates[col](layer), documents as clusters; its layers table holds the per-layer means (and the old
    column names, so that the rules of kvmem 0.2 can run on it too)."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in layers:
        doc = np.repeat(np.arange(n_docs) + 1000 * layer, per_doc)
        row = {"layer": layer, "doc": doc}
        for col, rate in rates.items():
            row[col] = (rng.random(doc.size) < rate(layer)).astype(float)
        rows.append(pd.DataFrame(row))
    units = pd.concat(rows, ignore_index=True)
    lay = ci.bootstrap(units, list(rates), by="layer", n_boot=200)
    for col, fn in (extra_layer_cols or {}).items():
        lay[col] = lay.eval(fn) if isinstance(fn, str) else fn
    meta = {"n_tokens": len(units), "baseline": "synthetic", **(meta or {})}
    return AnalysisResult(measure, {"layers": lay, "units": units}, meta)


def agreement(layers=range(9), upper=0.2, lower=0.01, base=0.01, **kw):
    def rate(layer):
        return upper if layer >= 6 else lower if layer < 3 else (upper + lower) / 2
    old = {"agree_top1": "agree_ex1", "base_top1": "base_ex1", "n_neurons": "n_units", "n_examples": "n_units"}
    return units_result("agreement", list(layers), {"agree_ex1": rate, "base_ex1": lambda layer: base},
                        extra_layer_cols=old, meta={"uniform": 1e-5, "k": 10}, **kw)


def verdict(results, name, n_layers=N_LAYERS):
    return {f["name"]: f for f in findings(results, n_layers)}[name]


def test_interval_comparisons():
    e = Est(0.5, 0.4, 0.6, 100, "x")
    assert above(e, 0.3) == "yes" and above(e, 0.6) == "no" and above(e, 0.5) == "unsure"
    assert below(e, 0.7) == "yes" and below(e, 0.4) == "no" and below(e, 0.5) == "unsure"
    zero = Est(0.0, 0.0, 0.0, 100, "x")
    assert above(zero, 0.0) == "no"  # equal to the threshold is not above it


def test_agreement_four_states():
    assert verdict({"agreement": agreement()}, "agreement")["verdict"] == "supported"
    assert verdict({"agreement": agreement(upper=0.01)}, "agreement")["verdict"] == "not supported"
    # lower third clearly above chance: the second half of the claim fails
    assert verdict({"agreement": agreement(lower=0.2)}, "agreement")["verdict"] == "not supported"
    # a few documents: the upper third's interval straddles the baseline's bound
    f = verdict({"agreement": agreement(upper=0.06, base=0.03, n_docs=40, per_doc=2)}, "agreement")
    assert f["verdict"] == "inconclusive", f["checks"]
    assert verdict({}, "agreement")["verdict"] == "not tested"


def test_zero_agreement_with_zero_baseline_is_not_supported():
    """Defect 7: a zero baseline gave margin 0 and `>=` passed with zero agreement."""
    f = verdict({"agreement": agreement(upper=0.0, lower=0.0, base=0.0)}, "agreement")
    assert f["verdict"] == "not supported"


def test_empty_lower_third_is_not_tested():
    """Defect 8: with --layers 20-29 of a 30-layer model the lower third is empty; the verdict read 'not
    supported' (kvmem 0.2: every comparison with NaN is False)."""
    res = agreement(layers=range(20, 30))
    f = verdict({"agreement": res}, "agreement", n_layers=30)
    assert f["verdict"] == "not tested" and "lower third" in f["reason"]
    assert verdict({"lexical": lexical(layers=range(20, 30))}, "lexical", n_layers=30)["verdict"] == "not tested"


def lexical(layers=range(9), lower=(0.5, 0.6), upper=(0.2, 0.3), **kw):
    def r(i):
        return lambda layer: lower[i] if layer < 3 else upper[i] if layer >= 6 else (lower[i] + upper[i]) / 2
    return units_result("lexical", list(layers), {"same_token_excess": r(0), "kept_1": r(1)}, **kw)


def test_lexical_rule_on_the_difference_of_thirds():
    assert verdict({"lexical": lexical()}, "lexical")["verdict"] == "supported"
    assert verdict({"lexical": lexical(lower=(0.1, 0.6))}, "lexical")["verdict"] == "not supported"
    f = verdict({"lexical": lexical(lower=(0.26, 0.36), n_docs=20, per_doc=2)}, "lexical")
    assert f["verdict"] == "inconclusive", f["checks"]
    lo, hi = f["numbers"]["excess_lower_minus_upper_lo"], f["numbers"]["excess_lower_minus_upper_hi"]
    assert lo < 0 < hi


def test_sparsity_rule_reads_magnitude_columns():
    res = units_result("sparsity", range(9), {"active10": lambda layer: 0.03, "carry90_share": lambda layer: 0.1})
    assert verdict({"sparsity": res}, "sparsity")["verdict"] == "supported"
    res = units_result("sparsity", range(9), {"active10": lambda layer: 0.3, "carry90_share": lambda layer: 0.1})
    assert verdict({"sparsity": res}, "sparsity")["verdict"] == "not supported"


def composition(novel, base=0.99, n_docs=400, **cases):
    rates = {"novel": lambda layer: novel[layer] if isinstance(novel, list) else novel,
             "base_novel": lambda layer: base}
    rates.update({k: (lambda v: lambda layer: v)(v) for k, v in cases.items()})
    return units_result("composition", range(9), rates, n_docs=n_docs)


def test_composition_holds_in_every_layer_or_not():
    """Defect 6: the rule is per layer against 68%, with a baseline that can fail."""
    assert verdict({"composition": composition(0.85)}, "composition")["verdict"] == "supported"
    one_low = [0.85] * 8 + [0.4]  # one layer far below 68%: the paper's "any layer" claim fails
    f = verdict({"composition": composition(one_low)}, "composition")
    assert f["verdict"] == "not supported" and f["numbers"]["min_layer_novel"] < 0.5
    # as novel as another token's memories: the baseline fails the claim
    assert verdict({"composition": composition(0.99, base=0.99)}, "composition")["verdict"] == "not supported"
    assert verdict({"composition": composition(0.69, n_docs=50)}, "composition")["verdict"] == "inconclusive"


def test_cases_rule_tests_that_changed_tops_rarely_become_the_ffn_top():
    """Defect 9: a dominant residual case with changed tops mostly becoming the FFN's own top is not supported."""
    res = composition(0.85, case_residual=0.6, case_ffn=0.05, case_agreement=0.15, case_composition=0.2,
                      changed_to_ffn=0.1)
    assert verdict({"composition": res}, "cases")["verdict"] == "supported"
    res = composition(0.85, case_residual=0.6, case_ffn=0.05, case_agreement=0.15, case_composition=0.2,
                      changed_to_ffn=0.6)
    assert verdict({"composition": res}, "cases")["verdict"] == "not supported"
    res = composition(0.85, case_residual=0.3, case_ffn=0.05, case_agreement=0.45, case_composition=0.2,
                      changed_to_ffn=0.1)
    assert verdict({"composition": res}, "cases")["verdict"] == "not supported"


def knockouts(top, rnd, spread=0.01):
    df = pd.DataFrame({"layer": [0, 1, 2], "remove": [1.0, 0.5, 0.2], "remove_lo": [0.9, 0.4, 0.1],
                       "remove_hi": [1.1, 0.6, 0.3], "linear": [0.9, 0.1, 0.15], "linear_lo": [0.8, 0.05, 0.12],
                       "linear_hi": [1.0, 0.15, 0.18]})
    for name, v in (("top_max_k10", top), ("random_k10", rnd)):
        df[name], df[f"{name}_lo"], df[f"{name}_hi"] = v, [x - spread for x in v], [x + spread for x in v]
    return AnalysisResult("knockouts", {"layers": df}, {"n_tokens": 100, "ks": [10], "baseline_loss": 3.0})


def test_knockout_rules_by_majority_of_layers():
    f = findings({"knockouts": knockouts([0.5, 0.001, 0.3], [0.1, 0.1, 0.1])}, 3)
    nonlin, topk = (x for x in f if x["measure"] == "knockouts")
    assert nonlin["verdict"] == "supported" and [c["state"] for c in nonlin["checks"]] == ["yes", "no", "yes"]
    assert topk["verdict"] == "supported"
    topk = verdict({"knockouts": knockouts([0.1, 0.05, 0.3], [0.1, 0.1, 0.1], spread=0.05)}, "topk", 3)
    assert topk["verdict"] == "inconclusive"
    assert verdict({"knockouts": knockouts([0.01, 0.05, 0.3], [0.1, 0.1, 0.4])}, "topk", 3)["verdict"] == \
        "not supported"


def test_pooled_interval_is_the_cluster_bootstrap_of_the_third():
    res = agreement()
    e = pooled(res, [6, 7, 8], ["agree_ex1"])
    u = res["units"][res["units"].layer.isin([6, 7, 8])]
    mean, lo, hi = ci.interval(u.agree_ex1.to_numpy(), u.doc.to_numpy())
    assert (e.value, e.lo, e.hi) == pytest.approx((mean, lo, hi)) and e.how == "bootstrap"


def test_document_carries_rules_hash_version_and_paper_table():
    import kvmem

    doc = document({"agreement": agreement()}, N_LAYERS)
    assert doc["kvmem_version"] == kvmem.__version__
    assert doc["rules"]["sha256"] == hashlib.sha256(RULES_PATH.read_bytes()).hexdigest()
    assert doc["rules"]["version"] == load_rules().version
    assert [f["name"] for f in doc["findings"]] == list(load_rules().data["claims"])
    assert {f["verdict"] for f in doc["findings"]} <= {"supported", "not supported", "inconclusive", "not tested"}
    for f in doc["findings"]:
        assert "{" not in f["rule"], f["rule"]  # every threshold filled in
        assert f["source"].startswith(("Geva", "common"))
    rows = {(r["quantity"], r["depth"]): r for r in doc["paper"]}
    up = rows[("agreement: value top-1 token = next token of the key's top-1 trigger", "upper")]
    assert up["paper_value"] == 0.035 and up["status"] == "measured" and up["lo"] <= up["measured"] <= up["hi"]
    assert up["rel_depth"] == "0.75-1.00"
    uni = [r for r in doc["paper"] if r["paper"] == "0.0004%"][0]
    assert uni["measured"] == 1e-5
    assert all(r["status"] == "measure not run" for r in doc["paper"] if r["measure"] == "composition")


def test_paper_table_min_layer_and_empty_third():
    rows = paper_table({"composition": composition([0.85] * 8 + [0.4])}, N_LAYERS)
    comp = [r for r in rows if r["depth"] == "min"][0]
    assert comp["layers"] == [8] and comp["measured"] < 0.5 and comp["paper_value"] == 0.68
    rows = paper_table({"agreement": agreement(layers=range(20, 30))}, 30)
    lower = [r for r in rows if r["quantity"] == "agreement, lower layers"][0]
    assert lower["measured"] is None and "lower third" in lower["status"]


def test_rules_file_errors_are_one_line(tmp_path):
    from kvmem.errors import KvmemError

    bad = tmp_path / "rules.toml"
    bad.write_text("version = 1\n[claims.x]\nclaim = 'c'\n")
    with pytest.raises(KvmemError, match="has no 'source'"):
        load_rules(bad)
    with pytest.raises(KvmemError, match="rules file"):
        load_rules(tmp_path / "missing.toml")


def test_agreement_baseline_from_the_derangement_draws():
    """With a null table (one row per layer and draw), the baseline's interval is the spread of the draws
    pooled over the third, and the upper third's permutation p-value is reported."""
    res = agreement(upper=0.05)
    null = pd.DataFrame([{"layer": layer, "draw": d, "ex1": 0.045 + 0.001 * d, "n_ex1": 100}
                         for layer in range(9) for d in range(20)])
    res.tables["null"] = null
    f = verdict({"agreement": res}, "agreement")
    assert f["numbers"]["upper_base"] == pytest.approx(0.045 + 0.001 * 9.5)
    assert f["numbers"]["upper_base_hi"] > 0.06 and f["verdict"] != "supported"
    assert 0 < f["numbers"]["upper_p_perm"] <= 1
    res.tables["null"] = null.assign(ex1=0.001 * null.draw / 20)
    f = verdict({"agreement": res}, "agreement")
    assert f["checks"][0]["state"] == "yes" and f["numbers"]["upper_p_perm"] == pytest.approx(1 / 21)


def test_topk_rule_uses_the_paired_excess_where_measured():
    """With top_max_k{k}_excess (per-token top-k minus random-k, paired), the rule reads its interval against 0:
    overlapping unpaired intervals can still give a clear paired difference."""
    res = knockouts([0.2, 0.2, 0.2], [0.15, 0.15, 0.15], spread=0.1)
    assert verdict({"knockouts": res}, "topk", 3)["verdict"] == "inconclusive"
    df = res["layers"]
    df["top_max_k10_excess"], df["top_max_k10_excess_lo"], df["top_max_k10_excess_hi"] = 0.05, 0.03, 0.07
    f = verdict({"knockouts": res}, "topk", 3)
    assert f["verdict"] == "supported" and f["checks"][0]["threshold"] == 0.0
    df["top_max_k10_excess_lo"], df["top_max_k10_excess_hi"] = -0.02, 0.0
    assert verdict({"knockouts": res}, "topk", 3)["verdict"] == "not supported"


def test_no_events_get_a_wilson_interval_not_zero_width():
    """0 hits out of n units: the percentile bootstrap gives [0, 0]; the verdicts use the Wilson interval."""
    res = agreement(upper=0.0, lower=0.0, base=0.0, n_docs=20, per_doc=2)
    e = pooled(res, [6, 7, 8], ["agree_ex1"])
    assert e.value == 0 and e.lo == 0 and e.hi == pytest.approx(ci.wilson(0, 120)[1]) and "Wilson" in e.how


def test_nonlinearity_fails_where_removal_costs_nothing():
    res = knockouts([0.5, 0.5, 0.5], [0.1, 0.1, 0.1])
    df = res["layers"]
    df["remove"], df["remove_lo"], df["remove_hi"] = -0.1, -0.2, -0.05
    assert verdict({"knockouts": res}, "nonlinear", 3)["verdict"] == "not supported"


def test_gated_agreement_is_judged_on_the_sign_aware_rate():
    """A gated model's measure has ex1_abs (trigger of largest |m| vs the token its write promotes): the verdict
    uses it with its own baseline, and reports the paper's ex1 beside it."""
    def rate(hi, lo):
        return lambda layer: hi if layer >= 6 else lo
    res = units_result("agreement", range(9), {"ex1": rate(0.01, 0.002), "base_ex1": rate(0.01, 0.002),
                                               "ex1_abs": rate(0.2, 0.002), "base_ex1_abs": rate(0.01, 0.002)},
                       meta={"uniform_ex1_abs": 1e-5, "uniform_ex1": 1e-5})
    f = verdict({"agreement": res}, "agreement")
    assert f["numbers"]["rate"] == "ex1_abs" and f["verdict"] == "supported"
    assert f["numbers"]["upper_ex1"] == pytest.approx(0.01, abs=0.01)
    res.tables["units"] = res["units"].drop(columns=["ex1_abs", "base_ex1_abs"])
    res.tables["layers"] = res["layers"].drop(columns=[c for c in res["layers"] if "ex1_abs" in c])
    assert verdict({"agreement": res}, "agreement")["verdict"] == "not supported"


def test_too_few_documents_decide_nothing():
    """An interval from fewer than min_docs documents (a cluster bootstrap over 3 documents) leaves the check
    unsure, however clear the numbers look."""
    res = composition(0.95, base=0.99, n_docs=3)
    f = verdict({"composition": res}, "composition")
    assert f["verdict"] == "inconclusive" and {c["state"] for c in f["checks"]} == {"unsure"}
    assert all(c["docs"] == 3 for c in f["checks"])
