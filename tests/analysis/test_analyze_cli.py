"""``kvmem analyze`` and ``kvmem compare`` end to end on profiled tiny models."""

import hashlib
import json

import pandas as pd
import pytest

import kvmem
from kvmem.analysis.rules import RULES_PATH
from kvmem.cli import main


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, tiny_dirs):
    """family -> a profiled run folder (gpt2: GELU; llama: gated SiLU, i.e. SwiGLU)."""
    root = tmp_path_factory.mktemp("analyze")
    out = {}
    for family in ("gpt2", "llama"):
        path = root / family
        code = main(["profile", str(tiny_dirs[family]), "--corpus", "pydoc", "--tokens", "1500", "--seq-len", "32",
                     "--top-k", "5", "--batch-size", "4", "--out", str(path), "--device", "cpu", "--json"])
        assert code == 0
        out[family] = path
    return out


def test_analyze_writes_tables_and_findings(capsys, analyzed):
    run = analyzed["gpt2"]
    code, out, err = cli(capsys, "analyze", run, "--tokens", "640", "--knockout-tokens", "256",
                         "--composition-tokens", "128", "--device", "cpu", "--json")
    assert code == 0, err
    res = json.loads(out)
    folder = run / "analysis"
    for name in ("agreement_layers", "agreement_pairs", "lexical_layers", "lexical_truncation", "sparsity_layers",
                 "sparsity_model", "composition_layers", "knockouts_layers", "knockouts_long", "coactivation_partners",
                 "mutation_layers", "mutation_units"):
        assert (folder / f"{name}.parquet").is_file(), name
    doc = json.loads((folder / "findings.json").read_text())
    findings = doc["findings"]
    assert findings == res["findings"] and doc["paper"] == res["paper"]
    assert doc["kvmem_version"] == kvmem.__version__
    assert doc["rules"]["sha256"] == hashlib.sha256(RULES_PATH.read_bytes()).hexdigest()
    assert {f["measure"] for f in findings} == {"agreement", "lexical", "sparsity", "composition", "knockouts"}
    for f in findings:
        assert {"claim", "source", "measure", "figures", "threshold", "n_tokens", "baseline", "rule", "verdict",
                "numbers", "checks", "reason"} <= set(f)
        assert f["verdict"] in ("supported", "not supported", "inconclusive", "not tested")
        assert f["n_tokens"] > 0
        if f["verdict"] == "not tested":
            assert f["reason"]
        else:
            assert f["numbers"] and f["checks"]
            for c in f["checks"]:
                assert c["lo"] <= c["estimate"] <= c["hi"], c
        for fig in f["figures"]:
            df = pd.read_parquet(folder / fig["table"])
            assert set(fig["y"]) <= set(df.columns)
    meta = json.loads((folder / "analysis.json").read_text())
    assert meta["settings"]["sparsity"]["tokens"] == 640 and meta["settings"]["knockouts"]["knockout_tokens"] == 256
    assert meta["settings"]["composition"]["composition_tokens"] == 128
    assert meta["sample_tokens"]["sparsity"] >= 640  # counted tokens of whole rows drawn until 640 are counted
    assert set(meta["cost"]) == set(meta["seconds"]) == set(meta["settings"])
    # the run's own max sets the "% of max" thresholds (the run saw more tokens than the sample)
    assert "given" in meta["measures"]["sparsity"]["maxima"]
    # refreshing one measure keeps the others' tables and findings
    code, out, err = cli(capsys, "analyze", run, "--tokens", "320", "--measures", "knockouts", "--knockout-k", "2",
                         "--device", "cpu", "--json")
    assert code == 0, err
    again = json.loads((folder / "findings.json").read_text())["findings"]
    assert [f["measure"] for f in again] == [f["measure"] for f in findings]
    assert [f for f in again if f["measure"] != "knockouts"] == [f for f in findings if f["measure"] != "knockouts"]
    assert set(pd.read_parquet(folder / "knockouts_long.parquet").k) == {0, 2}
    meta = json.loads((folder / "analysis.json").read_text())
    assert meta["settings"]["knockouts"]["tokens"] == 320 and meta["settings"]["sparsity"]["tokens"] == 640


def test_analyze_tables_print_and_compare(capsys, analyzed):
    code, out, err = cli(capsys, "analyze", analyzed["llama"], "--tokens", "320", "--knockout-tokens", "128",
                         "--composition-tokens", "64", "--measures", "sparsity,agreement,knockouts", "--device", "cpu",
                         "--layers", "0,2", "--knockout-k", "2")
    assert code == 0, err
    knock = pd.read_parquet(analyzed["llama"] / "analysis" / "knockouts_long.parquet")
    assert sorted(knock.layer.unique()) == [0, 2] and set(knock.k) == {0, 2}
    assert sorted(pd.read_parquet(analyzed["llama"] / "analysis" / "agreement_layers.parquet").layer) == [0, 2]
    assert "agreement" in out and "findings" in out and "the papers beside this model" in out
    assert "planned cost" in err
    if not (analyzed["gpt2"] / "analysis" / "findings.json").exists():
        assert cli(capsys, "analyze", analyzed["gpt2"], "--tokens", "320", "--measures", "sparsity",
                   "--device", "cpu", "--json")[0] == 0
    code, out, err = cli(capsys, "compare", analyzed["gpt2"], analyzed["llama"], "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["meta"]["same_corpus"] is True
    assert [m["family"] for m in res["models"]] == ["gpt2", "llama"]
    assert [m["gated"] for m in res["models"]] == [False, True]
    for m in res["models"]:
        assert 0 <= m["active_gt0"] <= 1
    gated = res["models"][1]
    quads = [gated[f"q_gate_{g}_up_{u}"] for g in ("pos", "neg") for u in ("pos", "neg")]
    assert sum(quads) == pytest.approx(1.0)
    layers = pd.DataFrame(res["layers"])
    assert layers.depth.between(0, 1).all()
    code, out, err = cli(capsys, "compare", analyzed["gpt2"], analyzed["llama"])
    assert code == 0 and "active10" in out


def test_an_empty_depth_third_reads_not_tested(capsys, analyzed, tmp_path):
    """Issue 12 defect 8 end to end: --layers covering only the upper third leaves the lower third empty; the
    agreement and lexical verdicts read "not tested" (kvmem 0.2: "not supported"), and say why."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(analyzed["llama"], run)
    code, out, err = cli(capsys, "analyze", run, "--measures", "agreement,lexical", "--layers", "2", "--device", "cpu",
                         "--json")
    assert code == 0, err
    got = {f["name"]: f for f in json.loads(out)["findings"]}
    for name in ("agreement", "lexical"):
        assert got[name]["verdict"] == "not tested" and "lower third" in got[name]["reason"]


def test_annotate_is_opt_in_and_writes_the_sheet_apart_from_its_key(capsys, analyzed):
    run = analyzed["gpt2"]
    code, out, err = cli(capsys, "analyze", run, "--measures", "annotate", "--device", "cpu")
    assert code == 0, err
    folder = run / "analysis"
    sheet, key = pd.read_csv(folder / "annotation.csv"), pd.read_csv(folder / "annotation_key.csv")
    assert "kind" not in sheet.columns and set(key.kind) == {"key", "random"}
    assert set(sheet["item"]) == set(key["item"])
    assert "annotation.csv" in out and "annotate" in json.loads((folder / "analysis.json").read_text())["measures"]


@pytest.mark.parametrize("argv", [
    ["analyze", "/nonexistent/run"],
    ["analyze", "{gpt2}", "--measures", "sparsity,bogus"],
    ["analyze", "{gpt2}", "--tokens", "1"],
    ["compare", "{gpt2}"],
])
def test_bad_input_is_one_line(capsys, analyzed, argv):
    argv = [a.format(gpt2=analyzed["gpt2"]) for a in argv]
    code, out, err = cli(capsys, *argv, "--device", "cpu") if argv[0] == "analyze" else cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


def test_an_analysis_interrupted_while_writing_keeps_the_old_one_and_reruns(capsys, analyzed, monkeypatch):
    from kvmem.analysis import result

    run = analyzed["llama"]
    args = ["analyze", run, "--tokens", "320", "--measures", "sparsity", "--device", "cpu", "--json"]
    assert cli(capsys, *args)[0] == 0
    folder = run / "analysis"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = result.AnalysisResult.write

    def killed(self, where):
        real(self, where)
        raise KeyboardInterrupt  # Ctrl-C after the tables, before findings.json

    monkeypatch.setattr(result.AnalysisResult, "write", killed)
    args[3] = "256"  # another sample: tables that differ from the finished ones
    code, _, err = cli(capsys, *args)
    assert code == 130 and err.splitlines()[-1].startswith("interrupted: nothing finished was replaced")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the finished analysis is whole
    monkeypatch.setattr(result.AnalysisResult, "write", real)
    assert cli(capsys, *args)[0] == 0
    assert not (run / "analysis.partial").exists()
