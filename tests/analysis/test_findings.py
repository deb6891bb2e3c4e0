"""The verdict rules on hand-made tables: each rule flips where its stated threshold says it should."""

import pandas as pd

from kvmem.analysis.findings import findings
from kvmem.analysis.result import AnalysisResult


def agreement_result(upper, lower, base, n=1000):
    layers = list(range(9))
    agree = [lower] * 3 + [(lower + upper) / 2] * 3 + [upper] * 3
    df = pd.DataFrame({"layer": layers, "agree_top1": agree, "base_top1": base, "agree_topk": agree,
                       "base_topk": base, "n_examples": 5, "n_neurons": n})
    return AnalysisResult("agreement", {"layers": df}, {"n_tokens": 100, "k": 10, "baseline": "derangement"})


def verdict(results, measure):
    return [f["verdict"] for f in findings(results, 9) if f["measure"] == measure]


def test_agreement_rule():
    assert verdict({"agreement": agreement_result(0.03, 0.005, 0.005)}, "agreement") == ["supported"]
    assert verdict({"agreement": agreement_result(0.005, 0.005, 0.005)}, "agreement") == ["not supported"]
    # rises with depth, but the upper third is within noise of the baseline: only one condition holds
    assert verdict({"agreement": agreement_result(0.0065, 0.001, 0.005, n=100)}, "agreement") == ["mixed"]


def test_knockout_rules():
    df = pd.DataFrame({"layer": [0, 1, 2], "baseline_loss": 3.0, "n_tokens": 100, "remove": [1.0, 0.5, 0.2],
                       "linear": [0.9, 0.1, 0.15], "top_max_k10": [0.5, 0.001, 0.3], "top_rate_k10": [0.1, 0.1, 0.1],
                       "random_k10": [0.1, 0.1, 0.1]})
    res = AnalysisResult("knockouts", {"layers": df}, {"n_tokens": 100, "ks": [10], "baseline_loss": 3.0,
                                                       "n_random": 1})
    nonlin, topk = findings({"knockouts": res}, 3)
    assert nonlin["verdict"] == "supported" and nonlin["numbers"]["layers_share"] == 2 / 3
    assert topk["verdict"] == "supported" and topk["numbers"]["layers_share"] == 2 / 3
    df2 = df.assign(linear=0.0, top_max_k10=0.1)
    nonlin, topk = findings({"knockouts": AnalysisResult("knockouts", {"layers": df2}, res.meta)}, 3)
    assert nonlin["verdict"] == "not supported" and topk["verdict"] == "not supported"
