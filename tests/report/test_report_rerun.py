"""A report killed midway and re-run succeeds; its own old and unfinished folders are replaced, others refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmem.cli import main
from kvmem.errors import KvmemError
from kvmem.report import build_report

ROOT = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


KILL_MIDWAY = """
import os, signal, sys
from kvmem.report import data
real = data.layer_payload
def payload(layer, *a, **kw):
    if layer == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of writing the layers
    return real(layer, *a, **kw)
data.layer_payload = payload
from kvmem.cli import main
sys.exit(main(["report", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_a_report_killed_midway_and_rerun_with_the_same_command_succeeds(tmp_path, report_run, capsys):
    run, _ = report_run
    out = tmp_path / "reports" / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_MIDWAY, str(run.path), str(out)], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and (tmp_path / "reports" / "r.partial").is_dir()  # half a report, beside out
    code = main(["report", str(run.path), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "index.html").is_file() and (out / "report.json").is_file()
    assert not (tmp_path / "reports" / "r.partial").exists()
    meta = json.loads((out / "report.json").read_text())
    assert set(meta["stages"]) >= {"value_projection", "shading", "writing", "total"}
    # and once more over the finished report (its own), keeping a prompt page that joined it
    (out / "prompt-x.html").write_text("<p>joined</p>")
    assert main(["report", str(run.path), "--out", str(out)]) == 0
    assert (out / "prompt-x.html").read_text() == "<p>joined</p>"


def test_an_error_midway_leaves_the_finished_report_whole(tmp_path, report_run, monkeypatch):
    from kvmem.report import data

    run, _ = report_run
    out = tmp_path / "r"
    build_report(run, out)
    before = snapshot(out)
    real = data.layer_payload

    def failing(layer, *a, **kw):
        if layer == 1:
            raise RuntimeError("disk full")
        return real(layer, *a, **kw)

    monkeypatch.setattr(data, "layer_payload", failing)
    with pytest.raises(RuntimeError):  # other options: files written before the error would differ
        build_report(run, out, options=data.ReportOptions(n_top=3, before=4))
    assert snapshot(out) == before
    assert not (tmp_path / "r.partial").exists()


def test_a_folder_with_foreign_files_is_refused_and_left_untouched(tmp_path, report_run, capsys):
    run, _ = report_run
    out = tmp_path / "mine"
    (out / "static").mkdir(parents=True)  # the folder a failed report of kvmem 0.1 left behind looks like this
    (out / "static" / "site.css").write_text("body {}")
    (out / "index.html").write_text("<h1>my homepage</h1>")
    before = snapshot(out)
    code = main(["report", str(run.path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "other files" in err and "--force" in err
    assert snapshot(out) == before
    with pytest.raises(KvmemError, match="not made by kvmem"):
        (tmp_path / "x.partial").mkdir()
        (tmp_path / "x.partial" / "a.txt").write_text("a")
        build_report(run, tmp_path / "x")
    assert (tmp_path / "x.partial" / "a.txt").read_text() == "a"


def test_a_run_with_the_old_fingerprint_is_refused_with_how_to_reprofile(tmp_path, report_run, capsys):
    import shutil

    run, _ = report_run
    old = tmp_path / "old-run"
    shutil.copytree(run.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["model"]["fingerprint_scheme"]
    manifest["model"]["fingerprint"] = "0123456789abcdef"
    (old / "manifest.json").write_text(json.dumps(manifest))
    code = main(["report", str(old), "--out", str(tmp_path / "rep"), "--model", manifest["model"]["model"]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "profile it again: kvmem profile" in err
