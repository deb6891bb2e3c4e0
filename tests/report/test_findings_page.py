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
    findings = json.loads((tmp_path / "run" / "analysis" / "findings.json").read_text())
    findings = findings["findings"] if isinstance(findings, dict) else findings
    assert findings
    # a hostile claim text must render as text
    findings[0]["claim"] = '<script>window.__pwned=1</script> "quoted" & </textarea>'
    (tmp_path / "run" / "analysis" / "findings.json").write_text(json.dumps(findings))
    rep = build_report(kvmem.open_run(tmp_path / "run"), tmp_path / "report")
    assert "findings.html" in rep.pages
    page = (tmp_path / "report" / "findings.html").read_text()
    index = (tmp_path / "report" / "index.html").read_text()
    assert 'href="findings.html"' in index
    assert "<script>window.__pwned" not in page
    for f in findings:
        assert str(escape(f["claim"])) in page
    verdicts = re.findall(r'class="verdict verdict-\w+">([^<]+)<', page)
    assert verdicts == [f["verdict"] for f in findings]
    figs = re.findall(r'data-fig="(fig-f[\d-]+)">(.*?)</script>', page, flags=re.S)
    assert figs and all(json.loads(body)["data"] for _, body in figs)


def test_no_findings_page_without_analysis(report_dir):
    assert not (report_dir / "findings.html").exists()
    assert 'href="findings.html"' not in (report_dir / "index.html").read_text()
