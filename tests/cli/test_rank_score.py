"""``kvmem rank RUN --by score``: neurons by the scores of their descriptions, the baseline's beside them,
checked against a brute-force pass over the rows written here; one-line errors."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from tests.cli.test_core_cli import assert_one_line_error, run as cli

ROWS = [  # neuron, side, sign, explainer, detection, value
    ("0.1", "key", "+", "llm", 0.6, None), ("0.1", "key", "-", "llm", 0.8, None),
    ("0.1", "key", "-", "baseline", 0.55, None), ("0.1", "key", "+", "baseline", 0.7, None),
    ("1.2", "key", "+", "llm", 0.9, None), ("1.2", "key", "+", "baseline", 0.5, None),
    ("2.3", "key", "+", "llm", 0.7, None), ("2.4", "key", "+", "llm", float("nan"), None),
    ("2.5", "key", "+", "other", 0.99, None), ("2.5", "value", "+", "llm", None, 0.65),
    ("1.9", "key", "+", "baseline", 0.95, None),
]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_models):
    from tests.explain.explain_runs import make_run

    from kvmem.explain import store

    run = make_run(tmp_path_factory, tiny_models["llama"], "rank")
    rows = []
    for neuron, side, sign, who, det, val in ROWS:
        r = {"neuron": neuron, "layer": int(neuron[0]), "side": side, "sign": sign, "explainer": who,
             "description": f"{who} says {neuron}{sign}"}
        if det is not None:
            r.update(detection=det, detection_n=10, detection_lo=det - 0.2, detection_hi=min(1.0, det + 0.1))
        if val is not None:
            r.update(value=val, value_n=8, value_lo=val - 0.3, value_hi=val + 0.2)
        rows.append(r)
    store.write(run, store.conform(pd.DataFrame(rows)))
    return run


def brute(explainer: str, scorer: str = "detection", layers=None):
    """[(neuron, sign, score, baseline)] by hand: each neuron's best sign, sorted by score."""
    side = "value" if scorer == "value" else "key"
    col = 4 if scorer == "detection" else 5
    best = {}
    for r in ROWS:
        v = r[col]
        if r[3] != explainer or r[1] != side or v is None or math.isnan(v):
            continue
        if layers is not None and int(r[0][0]) not in layers:
            continue
        if r[0] not in best or v > best[r[0]][1] or (v == best[r[0]][1] and r[2] == "+"):
            best[r[0]] = (r[2], v)
    out = []
    for n, (sign, v) in best.items():
        base = [r[col] for r in ROWS if r[0] == n and r[1] == side and r[2] == sign and r[3] == "baseline"]
        out.append((n, sign, v, base[0] if base else None))
    return sorted(out, key=lambda t: (-t[2], int(t[0][0]), int(t[0].split(".")[1])))


def test_rank_by_score_json(capsys, scored_run):
    code, out, err = cli(capsys, "rank", str(scored_run.path), "--by", "score", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["explainer"] == "llm"  # the LLM explainer with the most rows
    got = [(r["neuron"], r["sign"], r["score"], r["baseline"]) for r in res["neurons"]]
    assert got == brute("llm") == [("1.2", "+", 0.9, 0.5), ("0.1", "-", 0.8, 0.55), ("2.3", "+", 0.7, None)]
    assert res["scored"] == 3 and res["neurons"][0]["score_n"] == 10
    assert res["neurons"][0]["score_lo"] == pytest.approx(0.7) and res["neurons"][0]["baseline_n"] == 10
    code, out, err = cli(capsys, "rank", str(scored_run.path), "--by", "score", "--json", "--layers", "0-1",
                         "--top", "1")
    assert [r["neuron"] for r in json.loads(out)["neurons"]] == [n for n, *_ in brute("llm", layers=[0, 1])][:1]
    code, out, err = cli(capsys, "rank", str(scored_run.path), "--by", "score", "--json", "--scorer", "value")
    assert [(r["neuron"], r["score"]) for r in json.loads(out)["neurons"]] == [("2.5", 0.65)]
    code, out, err = cli(capsys, "rank", str(scored_run.path), "--by", "score", "--json", "--explainer", "baseline")
    assert [r["neuron"] for r in json.loads(out)["neurons"]] == [n for n, *_ in brute("baseline")]


def test_rank_by_score_table(capsys, scored_run, monkeypatch):
    from kvmem.cli.common import console

    monkeypatch.setattr(console, "width", 200)
    code, out, err = cli(capsys, "rank", str(scored_run.path), "--by", "score")
    assert code == 0, err
    assert "top 3 of 3 neurons by the detection score of llm" in out
    assert "0.90 [0.70, 1.00] (10)" in out and "llm says 1.2+" in out
    assert out.index("1.2") < out.index("0.1") < out.index("2.3")


@pytest.mark.parametrize("args", [["--scorer", "nonsense"], ["--explainer", "nobody"], ["--by", "scores"]])
def test_rank_by_score_errors(capsys, scored_run, args):
    argv = ["rank", str(scored_run.path)] + (["--by", "score"] if "--by" not in args else []) + args
    code, out, err = cli(capsys, *argv)
    assert_one_line_error(code, err)


def test_rank_by_score_without_descriptions(capsys, tmp_path_factory, tiny_models):
    from tests.explain.explain_runs import make_run

    run = make_run(tmp_path_factory, tiny_models["gpt2"], "rank-empty")
    code, out, err = cli(capsys, "rank", str(run.path), "--by", "score")
    assert_one_line_error(code, err)
    assert "kvmem explain" in err
