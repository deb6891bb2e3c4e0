"""The report with kvmem explain's descriptions: neuron pages show every description with its scores beside the
baseline's (n and intervals), the overview's search finds neurons by words of their descriptions, and hostile
description text renders as text. The baseline rows are kvmem explain's own (a real pass on a tiny gated run);
the LLM rows are written here (what an explainer could say, including markup), so the expected page follows
from this file's table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from report_browser import console_errors, wait_for
from test_report_build import load_data

PWNED = "window.__pwned === undefined ? null : String(window.__pwned)"
HOSTILE = '<img src=x onerror="window.__pwned=11"> quokka tokens </td><script>window.__pwned=12</script>'
LLM = [  # neuron, side, sign, description, detection (n, lo, hi) / value
    ("1.7", "key", "+", "closing quokka brackets in code", (0.9, 10, 0.6, 0.98)),
    ("1.7", "key", "-", "opening words", (0.55, 10, 0.3, 0.8)),
    ("1.7", "value", "+", "promotes the word zebra", (0.7, 8, 0.4, 0.9)),
    ("2.5", "key", "+", HOSTILE, (0.62, 6, 0.3, 0.85)),
    ("2.5", "key", "-", "numbers and quokka digits", (0.8, 6, 0.45, 0.95)),
]


def llm_rows(explainer: str = "tiny-llm") -> pd.DataFrame:
    from kvmem.explain import store

    rows = []
    for neuron, side, sign, text, (v, n, lo, hi) in LLM:
        s = "detection" if side == "key" else "value"
        r = {"neuron": neuron, "layer": int(neuron.split(".")[0]), "side": side, "sign": sign, "description": text,
             "explainer": explainer, "backend": "http", "scorer": explainer, s: v, f"{s}_n": n, f"{s}_lo": lo,
             f"{s}_hi": hi}
        if side == "key":
            r.update({"fuzzing": 0.5, "fuzzing_n": 8, "fuzzing_lo": 0.2, "fuzzing_hi": 0.8,
                      "simulation_note": "simulation skipped: no log-probabilities"})
        rows.append(r)
    return store.conform(pd.DataFrame(rows))


@pytest.fixture(scope="module")
def described(tmp_path_factory, tiny_models, hostile_corpus):
    """(run, report folder): the tiny Llama profiled over the hostile corpus, the baseline's descriptions of
    1.7, 2.5 and 0.3 (kvmem explain), the LLM rows above, and the report built from it."""
    import kvmem
    from kvmem.explain import explain, store
    from kvmem.explain.cache import Cache
    from kvmem.report import build_report

    model = tiny_models["llama"]
    cfg = kvmem.ProfileConfig(corpus=str(hostile_corpus), seq_len=32, top_k=5, batch_size=4, checkpoint_every=1e9)
    run = kvmem.profile(cfg, tmp_path_factory.mktemp("runs") / "described", model=model)
    base = explain(run, model, [(1, 7), (2, 5), (0, 3)], None, cache=Cache(None))
    store.write(run, store.merge(base, llm_rows()))
    out = tmp_path_factory.mktemp("reports") / "described"
    build_report(run, out, model=model)
    return run, out


def test_data_files_hold_the_descriptions_and_scores(described):
    run, out = described
    table = run.explanations
    cols = load_data(out / "data" / "neurons.js")
    ids = [f"{a}.{b}" for a, b in zip(cols["layer"], cols["neuron"])]
    i17, i25, i03, i00 = ids.index("1.7"), ids.index("2.5"), ids.index("0.3"), ids.index("0.0")
    # the overview's score: the LLM key row with the best detection, beside the baseline's of the same sign
    assert cols["xd"][i17] == "closing quokka brackets in code" and cols["xs"][i17] == 0.9
    base = table[(table.neuron == "1.7") & (table.explainer == "baseline") & (table.side == "key") & (table.sign == "+")]
    want = base.detection.iloc[0]
    assert (cols["xb"][i17] is None and math.isnan(want)) or cols["xb"][i17] == pytest.approx(want, abs=1e-3)
    assert cols["xd"][i25] == "numbers and quokka digits" and cols["xs"][i25] == 0.8  # sign - scored higher
    assert cols["xs"][i00] is None and cols["desc"][i00] == ""
    # 0.3 has only baseline rows: the default explainer is the LLM, so no score, but its words are searchable
    assert cols["xs"][i03] is None and "the tokens" in cols["desc"][i03]
    assert "zebra" in cols["desc"][i17] and "opening words" in cols["desc"][i17]
    layer1 = load_data(out / "data" / "layer-1.js")
    x = layer1["neurons"][7]["x"]
    assert [(e["side"], e["sign"], e["by"]) for e in x] == [
        ("key", "+", "tiny-llm"), ("key", "+", "baseline"), ("key", "-", "tiny-llm"), ("key", "-", "baseline"),
        ("value", "+", "tiny-llm"), ("value", "+", "baseline"), ("value", "-", "baseline")]
    assert x[0]["s"]["detection"] == [0.9, 10, 0.6, 0.98] and x[0]["s"]["simulation"] is None
    assert "no log-probabilities" in x[0]["note"]["simulation"]
    b = table[(table.neuron == "1.7") & (table.explainer == "baseline") & (table.side == "value") & (table.sign == "+")]
    assert x[5]["d"] == b.description.iloc[0] and x[5]["s"]["value"][1] == int(b.value_n.iloc[0])
    assert "x" not in layer1["neurons"][6]
    assert load_data(out / "data" / "meta.js")["explain_note"].startswith("Descriptions")


def test_neuron_page_shows_descriptions_beside_the_baseline(driver, described):
    run, out = described
    driver.get((out / "neuron.html").resolve().as_uri() + "#1.7")
    wait_for(driver, "document.querySelectorAll('#xtable tbody tr').length === 7")
    rows = driver.execute_script("return Array.from(document.querySelectorAll('#xtable tbody tr')).map(tr => "
                                 "Array.from(tr.children).map(td => td.textContent))")
    assert rows[0][:4] == ["key (reads)", "m > 0", "tiny-llm", "closing quokka brackets in code"]
    assert rows[0][4:] == ["0.90 [0.60, 0.98] n=10", "0.50 [0.20, 0.80] n=8", "\u2013", ""]
    assert rows[1][2] == "baseline" and rows[4][7] == "0.70 [0.40, 0.90] n=8"
    base = run.explanations
    b = base[(base.neuron == "1.7") & (base.explainer == "baseline") & (base.side == "key") & (base.sign == "+")].iloc[0]
    want = "\u2013" if math.isnan(b.detection) else f"{b.detection:.2f}"
    assert rows[1][4].startswith(want) and (math.isnan(b.detection) or rows[1][4].endswith(f"n={b.detection_n}"))
    assert driver.execute_script("return document.querySelector('#xtable td[data-score=simulation]').title"
                                 ).endswith("no log-probabilities")
    # hostile description text: shown as text, runs nothing
    driver.execute_script("location.hash = '2.5'")
    wait_for(driver, "document.getElementById('nid').textContent === 'neuron 2.5' && "
                     "document.querySelectorAll('#xtable tbody tr').length > 0")
    assert driver.execute_script("return document.querySelector('#xtable td.desc').textContent") == HOSTILE
    assert driver.execute_script(PWNED) is None
    assert driver.execute_script("return document.querySelectorAll('#described img, #described script').length") == 0
    # a neuron without descriptions hides the section
    driver.execute_script("location.hash = '1.6'")
    wait_for(driver, "document.getElementById('nid').textContent === 'neuron 1.6'")
    assert driver.execute_script("return document.getElementById('described').hidden") is True
    assert console_errors(driver) == []


def shown(driver, expect: set, timeout: float = 20.0) -> set:
    """The neurons the overview table lists once they equal ``expect`` (the search is debounced), else the
    last ones seen."""
    from selenium.common.exceptions import TimeoutException

    script = ("(() => { const r = Array.from(document.querySelectorAll('table.neurons tbody tr td:first-child a'))"
              ".map(a => a.textContent); const n = parseInt(document.getElementById('pageinfo').textContent); "
              "return n === r.length ? r : null; })()")
    try:
        wait_for(driver, f"(r => r !== null && r.length === {len(expect)} && "
                         f"{sorted(expect)!r}.every(x => r.includes(x)))({script})", timeout)
    except TimeoutException:
        pass
    return set(driver.execute_script("return " + script) or [])


def test_overview_search_by_words_of_descriptions(driver, described):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    run, out = described
    driver.get((out / "index.html").resolve().as_uri())
    wait_for(driver, "document.querySelectorAll('table.neurons tbody tr').length > 0")
    Select(driver.find_element(By.ID, "qmode")).select_by_value("desc")
    box = driver.find_element(By.ID, "q")
    # the neurons whose descriptions hold every word, by brute force over the table
    table = run.explanations

    def expect(words, exact=True):
        out = set()
        for neuron, group in table[table.description != ""].groupby("neuron"):
            text = " ".join(group.description).lower()
            import re
            have = set(re.split(r"[^\w]+", text))
            if all((w in have) if exact else (w in text) for w in words):
                out.add(neuron)
        return out

    box.send_keys("quokka")
    assert shown(driver, {"1.7", "2.5"}) == expect(["quokka"]) == {"1.7", "2.5"}
    box.clear()
    box.send_keys("Quokka BRACKETS")
    assert shown(driver, {"1.7"}) == expect(["quokka", "brackets"]) == {"1.7"}
    box.clear()
    box.send_keys("zebr")  # a part of a word: none with whole words, 1.7 without
    assert shown(driver, set()) == set()
    driver.find_element(By.ID, "qexact").click()
    assert shown(driver, {"1.7"}) == expect(["zebr"], exact=False) == {"1.7"}
    driver.find_element(By.ID, "qexact").click()
    # "both": tokens or descriptions
    Select(driver.find_element(By.ID, "qmode")).select_by_value("both")
    box.clear()
    box.send_keys("digits")
    assert shown(driver, {"2.5"}) == {"2.5"}
    # the description columns sort by the detection score
    box.clear()
    box.send_keys(" ")  # an input event with no query: every neuron
    wait_for(driver, "parseInt(document.getElementById('pageinfo').textContent) > 50")
    driver.find_element(By.CSS_SELECTOR, 'th[data-col="xs"]').click()
    wait_for(driver, "document.querySelector('table.neurons tbody tr td:first-child a').textContent === '1.7'")
    assert driver.execute_script(PWNED) is None
    assert console_errors(driver) == []
