"""The report of a run with an MoE layer (tests/profile/moe_run.py: every corpus token hostile HTML) in headless
Chromium: the routing page draws its figures, the overview lists expert ids, an expert neuron's page opens from
its id and states its expert and tokens, and nothing runs a script."""

from __future__ import annotations

import pytest

from report_browser import console_errors, wait_for
from test_moe_report import moe_report  # noqa: F401  (the fixture)
from tests.profile.moe_run import MOE_LAYER
from tests.stats.moe_reference import D_EXPERT, neuron_ref

PWNED = "window.__pwned === undefined ? null : String(window.__pwned)"
PLOTS = "Array.from(document.querySelectorAll('.js-plotly-plot')).filter(d => d.data && d.data.length).length"


def test_routing_overview_and_expert_neuron_pages(driver, moe_report):  # noqa: F811
    from selenium.webdriver.common.by import By

    run, st, out, _ = moe_report
    driver.get((out / f"routing-{MOE_LAYER}.html").resolve().as_uri())
    assert wait_for(driver, f"({PLOTS}) >= 3 && {PLOTS}") == 3
    assert console_errors(driver) == [] and driver.execute_script(PWNED) is None
    driver.get((out / "index.html").resolve().as_uri())
    wait_for(driver, "document.querySelectorAll('table.neurons tbody tr').length > 0")
    box = driver.find_element(By.ID, "q")
    box.send_keys(f"{MOE_LAYER}.e1.2")
    wait_for(driver, "document.querySelectorAll('table.neurons tbody tr').length === 1")
    link = driver.find_element(By.CSS_SELECTOR, "table.neurons tbody tr a")
    assert link.text == f"{MOE_LAYER}.e1.2"
    link.click()
    wait_for(driver, f"document.getElementById('nid').textContent === 'neuron {MOE_LAYER}.e1.2'")
    n = int(neuron_ref(st, 6)["n"][D_EXPERT + 2])
    summary = driver.find_element(By.ID, "summary").text
    assert f"routed expert e1: {n} of {st.m.shape[0]} tokens routed to it" in summary
    assert f"of {n} of its expert's tokens" in summary
    assert not driver.find_element(By.ID, "expert").get_attribute("hidden")
    assert driver.find_element(By.CSS_SELECTOR, "#expert a").get_attribute("href").endswith(f"routing-{MOE_LAYER}.html")
    # the next neuron's link carries its expert id (e1.2 is expert 1's last); a shared neuron and a bad id
    assert driver.find_element(By.ID, "nextn").get_attribute("href").endswith(f"#{MOE_LAYER}.e2.0")
    driver.execute_script(f"location.hash = '{MOE_LAYER}.s0.1'")
    wait_for(driver, f"document.getElementById('nid').textContent === 'neuron {MOE_LAYER}.s0.1'")
    assert "shared expert s0" in driver.find_element(By.ID, "summary").text
    driver.execute_script(f"location.hash = '{MOE_LAYER}.e9.0'")
    wait_for(driver, "!document.getElementById('error').hidden")
    assert driver.execute_script(PWNED) is None and console_errors(driver) == []
