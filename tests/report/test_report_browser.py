"""End to end in headless Chromium: pages load without console errors, figures render, the search finds
a neuron by token, and the hostile corpus runs no script. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from report_browser import console_errors, wait_for

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PWNED = "window.__pwned === undefined ? null : String(window.__pwned)"
PLOTS = "Array.from(document.querySelectorAll('.js-plotly-plot')).filter(d => d.data && d.data.length).length"


def url(path: Path, fragment: str = "") -> str:
    return path.resolve().as_uri() + (f"#{fragment}" if fragment else "")


def open_page(driver, address: str, ready: str):
    driver.get(address)
    wait_for(driver, ready)
    return console_errors(driver)


def test_overview(driver, report_dir):
    ARTIFACTS.mkdir(exist_ok=True)
    errors = open_page(driver, url(report_dir / "index.html"), "document.querySelectorAll('table.neurons tbody tr').length > 0")
    assert errors == []
    n_figs = len(re.findall(r'data-fig="', (report_dir / "index.html").read_text(encoding="utf-8")))
    assert wait_for(driver, f"({PLOTS}) >= {n_figs} && {PLOTS}") == n_figs
    rows = driver.execute_script("return document.querySelectorAll('table.neurons tbody tr').length")
    assert rows == 50  # one page of the paged table, not every neuron in the DOM
    assert driver.execute_script(PWNED) is None
    # the max |m| chart is drawn on a log axis, its outliers named
    assert driver.execute_script("return document.getElementById('fig-max_abs').layout.yaxis.type") == "log"
    assert driver.execute_script("return document.querySelectorAll('#fig-max_abs .annotation').length") >= 1
    driver.save_screenshot(str(ARTIFACTS / "report-overview.png"))


SHOWN = """return (() => {
  const N = KV.neurons, col = arguments[0];
  const ids = Array.from(document.querySelectorAll('table.neurons tbody tr td:first-child a')).map(a => a.textContent);
  const at = id => { const [l, n] = id.split('.').map(Number); return N.layer.findIndex((x, j) => x === l && N.neuron[j] === n); };
  return {values: ids.map(id => N[col][at(id)]), best: Math.max(...N[col]),
          header: document.querySelector('th[data-col="' + col + '"]').textContent,
          info: document.getElementById('pageinfo').textContent};
})()"""


def test_default_sort_and_share_filter(driver, report_dir, plain_report_dir):
    """Gated: the table opens on the share of tokens with |m| > 10% of max |m| (not m > 0, about one half for
    every neuron), and the share filter applies to it; GELU: it opens on the firing rate m > 0."""
    from selenium.webdriver.common.by import By

    open_page(driver, url(report_dir / "index.html"), "document.querySelectorAll('table.neurons tbody tr').length > 0")
    shown = driver.execute_script(SHOWN, "act")
    assert shown["header"] == "|m| > 10% max|m| \u25be"
    assert shown["values"][0] == shown["best"] and shown["values"] == sorted(shown["values"], reverse=True)
    assert driver.find_element(By.ID, "ratecol").get_attribute("value") == "act"
    box = driver.find_element(By.ID, "minrate")
    box.clear()
    box.send_keys("0.3")
    n = driver.execute_script("return KV.neurons.act.filter(x => x >= 0.3).length")
    assert 0 < n < len(driver.execute_script("return KV.neurons.act"))
    wait_for(driver, f"document.getElementById('pageinfo').textContent.startsWith('{n} neurons')")
    assert min(driver.execute_script(SHOWN, "act")["values"]) >= 0.3
    assert console_errors(driver) == []
    open_page(driver, url(plain_report_dir / "index.html"), "document.querySelectorAll('table.neurons tbody tr').length > 0")
    shown = driver.execute_script(SHOWN, "rate")
    assert shown["header"] == "m > 0 \u25be" and shown["values"][0] == shown["best"]
    assert driver.find_element(By.ID, "ratecol").get_attribute("value") == "rate"


def test_search_by_token_and_id(driver, report_dir):
    from selenium.webdriver.common.by import By

    from test_report_build import load_data

    cols = load_data(report_dir / "data" / "neurons.js")
    vocab = load_data(report_dir / "data" / "vocab.js")
    # a value token that is a plain word, and the neurons whose top value tokens hold it (brute force)
    word = next(vocab[t].strip() for ids in cols["val"] for t in ids if re.fullmatch(r"\s?[A-Za-z]{3,}", vocab[t]))
    expect = {f"{layer}.{n}" for layer, n, val, trig in zip(cols["layer"], cols["neuron"], cols["val"], cols["trig"])
              if any(vocab[t].strip().lower() == word.lower() for t in val + [trig])}
    open_page(driver, url(report_dir / "index.html"), "document.querySelectorAll('table.neurons tbody tr').length > 0")
    assert driver.find_element(By.ID, "qexact").is_selected()  # whole-token search by default
    box = driver.find_element(By.ID, "q")
    box.send_keys(word)
    found = wait_for(driver, "(() => { const r = Array.from(document.querySelectorAll('table.neurons tbody tr td:first-child a'))"
                             ".map(a => a.textContent); return r.length && r.length <= 50 && "
                             f"document.getElementById('pageinfo').textContent.startsWith('{len(expect)} ') ? r : false; }})()")
    assert set(found) == set(list(expect)[:50]) or set(found) <= expect
    assert len(found) == min(len(expect), 50)
    box.clear()
    box.send_keys("1.7")
    wait_for(driver, "document.querySelectorAll('table.neurons tbody tr').length === 1")
    link = driver.find_element(By.CSS_SELECTOR, "table.neurons tbody tr a")
    assert link.text == "1.7"
    link.click()
    wait_for(driver, "document.getElementById('nid').textContent === 'neuron 1.7'")
    assert console_errors(driver) == []


def test_neuron_page(driver, report_dir):
    page = report_dir / "neuron.html"
    errors = open_page(driver, url(page, "2.5"),
                       "document.getElementById('nid').textContent === 'neuron 2.5' && document.querySelector('#top .ex')")
    assert errors == []
    assert wait_for(driver, f"{PLOTS}") >= 2  # histogram and sign quadrants
    assert driver.execute_script("return document.querySelectorAll('#top .ex').length") >= 1
    assert driver.execute_script("return document.querySelectorAll('#vtop tr').length") == 10
    # shaded context: more than the activating token carries a background
    shaded = driver.execute_script("return Array.from(document.querySelectorAll('#top .ex:first-child .tok'))"
                                   ".filter(t => t.style.backgroundColor).length")
    assert shaded >= 2
    # whitespace tokens are drawn visibly
    assert driver.execute_script("return document.querySelectorAll('.tok .ws').length") > 0
    driver.set_window_size(1400, 2200)
    driver.save_screenshot(str(ARTIFACTS / "report-neuron.png"))
    driver.set_window_size(1400, 1000)
    # hostile contexts: every neuron page of every layer renders its examples as text and runs nothing
    for layer in (0, 1, 2):
        for neuron in range(0, 48, 8):
            driver.execute_script(f"location.hash = '{layer}.{neuron}'")
            wait_for(driver, f"document.getElementById('nid').textContent === 'neuron {layer}.{neuron}'")
    assert driver.execute_script(PWNED) is None
    assert driver.execute_script("return document.querySelectorAll('img, svg image, a[href^=javascript], iframe').length") == 0
    scripts = driver.execute_script("return Array.from(document.scripts).map(s => s.src ? "
                                    "s.src.split('/').slice(-2).join('/') : 'inline')")
    assert sorted(scripts) == sorted(["inline", "inline", "static/plotly.min.js", "static/report.js", "data/vocab.js",
                                      "data/meta.js", "data/layer-0.js", "data/layer-1.js", "data/layer-2.js"])
    assert console_errors(driver) == []
    # a bad neuron id is reported on the page
    driver.execute_script("location.hash = '9.0'")
    wait_for(driver, "!document.getElementById('error').hidden")


def test_plain_report_in_browser(driver, plain_report_dir):
    errors = open_page(driver, url(plain_report_dir / "neuron.html", "0.3"),
                       "document.getElementById('nid').textContent === 'neuron 0.3' && document.querySelector('#top .ex')")
    assert errors == []
    assert "not available" in driver.find_element("id", "valuenote").text
    assert driver.execute_script("return document.getElementById('quad').hidden") is True
    errors = open_page(driver, url(plain_report_dir / "index.html"), "document.querySelectorAll('table.neurons tbody tr').length")
    assert errors == [] and driver.execute_script(PWNED) is None


def test_prompt_page(driver, report_dir, report_run):
    from kvmem.report import prompt_page

    run, model = report_run
    page = prompt_page(model, "<script>window.__pwned = 10</script> The capital of France is", report_dir,
                       linked_layers=run.profiled_layers, per_layer=3)
    errors = open_page(driver, url(page), "document.querySelectorAll('#players table').length === 3")
    assert errors == [] and driver.execute_script(PWNED) is None
    links = driver.execute_script("return Array.from(document.querySelectorAll('#players a')).map(a => a.getAttribute('href'))")
    assert len(links) == 9 and all(re.fullmatch(r"neuron\.html#\d+\.\d+", h) for h in links)
    driver.execute_script("document.querySelectorAll('#ptokens .tok')[0].click()")
    wait_for(driver, "document.getElementById('ptitle').textContent.endsWith('position 0')")
    driver.find_element("css selector", "#players a").click()
    wait_for(driver, "document.getElementById('nid').textContent.startsWith('neuron ')")
    assert console_errors(driver) == []
