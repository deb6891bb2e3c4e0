"""The report of a run with a mixture-of-experts layer (the synthetic run of tests/profile/moe_run.py, every
corpus token a hostile HTML string): the routing page's numbers against plain loops over the routing, the
neuron pages' expert facts against brute force over each expert's own tokens, links, escaping."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from kvmem.analysis.ci import wilson
from kvmem.report import build_report
from tests.profile.moe_run import HOSTILE, K, MOE_LAYER, synthetic_moe_run
from tests.report.test_report_build import Links, load_data, pages, values
from tests.stats.moe_reference import D, D_EXPERT, E, EXPERT_OF, neuron_ref, routing_ref


@pytest.fixture(scope="module")
def moe_report(tmp_path_factory):
    run, st = synthetic_moe_run(tmp_path_factory.mktemp("moe") / "run")
    out = tmp_path_factory.mktemp("moe-report") / "rep"
    rep = build_report(run, out)
    return run, st, out, rep


class Rows(HTMLParser):
    """The cells of the expert table rows (tr.expert) of a routing page."""

    def __init__(self):
        super().__init__()
        self.rows, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr" and ("class", "expert") in attrs:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def figures(html: str) -> dict:
    return {m.group(1): json.loads(m.group(2)) for m in
            re.finditer(r'<script type="application/json" data-fig="fig-(\w+)">(.*?)</script>', html, re.S)}


def test_routing_page_numbers_match_the_routing(moe_report):
    run, st, out, rep = moe_report
    assert f"routing-{MOE_LAYER}.html" in rep.pages and (out / f"routing-{MOE_LAYER}.html").is_file()
    html = (out / f"routing-{MOE_LAYER}.html").read_text(encoding="utf-8")
    ref = routing_ref(st)
    n = ref["n"]
    parser = Rows()
    parser.feed(html)
    assert [r[0] for r in parser.rows] == [f"e{e}" for e in range(E)]
    for e, row in enumerate(parser.rows):
        assert int(row[1].replace(",", "")) == ref["load"][e]
        assert row[2] == f"{100 * ref['load'][e] / n:.2f}%"
        lo, hi = wilson(int(ref["load"][e]), n)
        assert row[3] == f"[{100 * lo:.2f}%, {100 * hi:.2f}%]"
        if ref["load"][e]:
            assert float(row[5]) == pytest.approx(ref["wsum"][e] / ref["load"][e], rel=1e-3)
    figs = figures(html)
    load = figs["load"]["data"][0]
    np.testing.assert_allclose(values(load["y"]), ref["load"] / n)
    np.testing.assert_allclose(np.array(values(load["y"])) + np.array(values(load["error_y"]["array"])),
                               [wilson(int(c), n)[1] for c in ref["load"]])
    assert values(figs["cosel"]["data"][0]["z"]) == ref["cosel"].tolist()
    h = ref["h"]
    assert f"{h.mean():.4g} ± {h.std():.4g} nats" in html  # router entropy, mean ± std over tokens
    # each expert's strongest neuron: the largest max m over its own tokens, brute force
    nref = neuron_ref(st, K)
    for e, row in enumerate(parser.rows):
        cols = [j for j in range(D) if EXPERT_OF[j] == e and nref["n"][j] > 0]
        if not cols:
            assert row[7] == "–"
            continue
        j = max(cols, key=lambda c: nref["top_v"][c, 0])
        assert row[7] == f"{MOE_LAYER}.e{e}.{j - e * D_EXPERT}"
        assert float(row[8]) == pytest.approx(float(nref["top_v"][j, 0]), rel=1e-3)
        assert row[9] == run.vocab[int(run.tokens.ids[int(nref["top_i"][j, 0])])]  # the text, unescaped by the parser


def test_neuron_pages_show_the_expert_and_its_tokens(moe_report):
    run, st, out, _ = moe_report
    payload = load_data(out / "data" / f"layer-{MOE_LAYER}.js")
    facts = payload["moe"]
    nref = neuron_ref(st, K)
    assert facts["n"] == nref["n"].tolist()
    assert facts["ids"][D_EXPERT + 1] == f"{MOE_LAYER}.e1.1" and facts["ids"][-1] == f"{MOE_LAYER}.s0.1"
    assert facts["shared"] == [bool(e < 0) for e in EXPERT_OF.tolist()] and facts["page"] == f"routing-{MOE_LAYER}.html"
    ref = routing_ref(st)
    for j, e in enumerate(EXPERT_OF.tolist()):
        if e >= 0:
            lo, hi = wilson(int(ref["load"][e]), ref["n"])
            assert facts["share_lo"][j] == pytest.approx(lo) and facts["share_hi"][j] == pytest.approx(hi)
        else:
            assert facts["share_lo"][j] is None
    for j in range(D):  # the top examples and the rate are of the expert's tokens only
        tops = [v for v, _ in payload["neurons"][j]["top"]]
        want = [float(v) for v in nref["top_v"][j] if not np.isnan(v)][:len(tops)]
        np.testing.assert_allclose(tops, want, rtol=1e-3, atol=1e-6)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.nan_to_num(nref["pos"][j] / nref["n"][j])
        assert payload["rate"][j] == pytest.approx(rate, rel=1e-3, abs=1e-6)
    table = load_data(out / "data" / "neurons.js")
    assert table["id"][:len(run.neurons)] == run.neurons["id"].tolist()
    js = (out / "static" / "report.js").read_text()
    assert "L.moe.ids.indexOf(expert)" in js and "routed to this neuron's expert only" in js


def test_overview_links_the_routing_pages_and_links_resolve(moe_report):
    run, st, out, _ = moe_report
    index = (out / "index.html").read_text(encoding="utf-8")
    assert f'href="routing-{MOE_LAYER}.html"' in index
    assert f"{E} routed (top-2) + 1 shared in MoE layers {MOE_LAYER}" in index  # the model card
    for page in pages(out):
        parser = Links()
        parser.feed(page.read_text(encoding="utf-8"))
        for ref in parser.refs:
            target = ref.split("#")[0]
            if target:
                assert (out / target).is_file(), (page.name, ref)


def test_vocabulary_strings_are_escaped(moe_report):
    run, st, out, _ = moe_report
    html = (out / f"routing-{MOE_LAYER}.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html or "&lt;b&gt;bold&lt;/b&gt;" in html
    for page in pages(out):
        text = page.read_text(encoding="utf-8")
        for bad in HOSTILE[:1] + ["<b>bold</b>", '"onmouseover="']:
            assert bad not in text, (page.name, bad)
        for m in re.finditer(r"<script([^>]*)>(.*?)</script>", text, re.S):
            assert "<" not in m.group(2), (page.name, m.group(2)[:80])
    for path in (out / "data").glob("*.js"):
        assert not set("<>&") & set(path.read_text(encoding="utf-8")), path.name
