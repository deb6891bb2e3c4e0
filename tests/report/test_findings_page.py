"""The Findings page: kvmem analyze's claims and verdicts, rendered from findings.json, escaped."""

import json
import re
import shutil

from markupsafe import escape

import kvmem
from kvmem.analysis.analyze import analyze
from kvmem.report import build_report


def test_findings_page_shows_every_claim_and_verdict(tmp_path, report_run):
    run, model = report_run
    shutil.copytree(run.path, tmp_path / "run")
    copy = kvmem.open_run(tmp_path / "run")
    analyze(copy, model, tokens=256, knockout_tokens=128, composition_tokens=64)
    doc = json.loads((tmp_path / "run" / "analysis" / "findings.json").read_text())
    findings = doc["findings"]
    assert findings and doc["paper"]
    # a hostile claim text must render as text
    findings[0]["claim"] = '<script>window.__pwned=1</script> "quoted" & </textarea>'
    doc["paper"][0]["paper"] = '<img src=x onerror=alert(1)>'
    (tmp_path / "run" / "analysis" / "findings.json").write_text(json.dumps(doc))
    rep = build_report(kvmem.open_run(tmp_path / "run"), tmp_path / "report")
    assert "findings.html" in rep.pages
    page = (tmp_path / "report" / "findings.html").read_text()
    index = (tmp_path / "report" / "index.html").read_text()
    assert 'href="findings.html"' in index
    assert "<script>window.__pwned" not in page and "<img src=x" not in page
    assert doc["rules"]["sha256"] in page and "The papers beside this model" in page
    for row in doc["paper"]:
        assert str(escape(row["quantity"])) in page
    for f in findings:
        assert str(escape(f["claim"])) in page
    verdicts = re.findall(r'class="verdict verdict-\w+">([^<]+)<', page)
    assert verdicts == [f["verdict"] for f in findings]
    figs = re.findall(r'data-fig="(fig-f[\w-]+)">(.*?)</script>', page, flags=re.S)
    assert figs and all(json.loads(body)["data"] for _, body in figs)
    # interval bands: a filled trace for each rate that has _lo/_hi columns
    assert any(t.get("fill") == "tonexty" for _, body in figs for t in json.loads(body)["data"])
    # distributions per layer of continuous per-unit columns (e.g. the rank of a trigger's next token)
    assert any(t.get("type") == "box" for _, body in figs for t in json.loads(body)["data"])


def test_findings_page_reads_a_kvmem_02_list(tmp_path, report_run):
    """An analysis written by kvmem 0.2 (findings.json a bare list, verdict "mixed") still renders."""
    run, _ = report_run
    shutil.copytree(run.path, tmp_path / "run")
    (tmp_path / "run" / "analysis").mkdir(exist_ok=True)
    old = [{"claim": "c", "measure": "sparsity", "verdict": "mixed", "figures": [], "numbers": {"x": 1.0}}]
    (tmp_path / "run" / "analysis" / "findings.json").write_text(json.dumps(old))
    build_report(kvmem.open_run(tmp_path / "run"), tmp_path / "report")
    page = (tmp_path / "report" / "findings.html").read_text()
    assert 'verdict verdict-mixed">mixed<' in page


def test_no_findings_page_without_analysis(report_dir):
    assert not (report_dir / "findings.html").exists()
    assert 'href="findings.html"' not in (report_dir / "index.html").read_text()
