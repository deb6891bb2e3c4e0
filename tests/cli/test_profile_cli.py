"""kvmem profile / top / rank / merge from the command line, and their bad inputs."""

import json

import pytest

from kvmem.cli import main
from tests.cli.test_core_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("def f(x): return x + 1\n\nThe quick brown fox jumps over the lazy dog.\n\n" * 6)
    return path


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, tiny_dirs, corpus):
    out = tmp_path_factory.mktemp("runs") / "r"
    code = main(["profile", str(tiny_dirs["llama"]), "--corpus", str(corpus), "--seq-len", "16", "--top-k", "4",
                 "--out", str(out), "--json"])
    assert code == 0
    return out


def test_profile_json_summary_and_ran_out(capsys, tmp_path, tiny_dirs, corpus):
    code, out, err = run(capsys, "profile", str(tiny_dirs["gpt2"]), "--corpus", str(corpus), "--tokens", "100000",
                         "--seq-len", "16", "--out", str(tmp_path / "r"), "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["ran_out"] is True and 0 < s["tokens"] < 100000 and len(s["layers"]) == 3
    code, out, _ = run(capsys, "profile", str(tiny_dirs["gpt2"]), "--corpus", str(corpus), "--tokens", "50",
                       "--seq-len", "16", "--out", str(tmp_path / "r2"))
    assert code == 0 and "profiled 50 tokens" in out
    lay = json.loads((tmp_path / "r2" / "manifest.json").read_text())["layout"]
    want = (f"rows: BOS (id {lay['bos_id']}) + 15" if lay["bos_id"] is not None else "rows: 16")
    flat = " ".join(out.split())  # the console wraps long lines
    assert want + " tokens of one document (padded, masked); row position 0 not counted" in flat  # the layout is said


def test_top_and_rank(capsys, profiled):
    code, out, _ = run(capsys, "top", str(profiled), "1.5", "--json")
    res = json.loads(out)
    assert code == 0 and res["neuron"] == "1.5" and len(res["examples"]) == 4
    values = [e["value"] for e in res["examples"]]
    assert values == sorted(values, reverse=True)
    code, out, _ = run(capsys, "top", str(profiled), "1.5")
    assert code == 0 and "1.5: top examples" in out
    code, out, _ = run(capsys, "rank", str(profiled), "--by", "rate", "--top", "5", "--json")
    rates = [n["firing_rate"] for n in json.loads(out)["neurons"]]
    assert code == 0 and len(rates) == 5 and rates == sorted(rates, reverse=True)
    import kvmem

    table = kvmem.open_run(profiled).neurons
    assert rates[0] == pytest.approx(table.firing_rate.max())


@pytest.mark.parametrize("by, column", [("active", "active_10pct_maxabs"), ("maxabs", "max_abs"),
                                        ("neg", "neg_10pct_maxabs")])
def test_rank_by_magnitude(capsys, profiled, by, column):
    import kvmem

    code, out, _ = run(capsys, "rank", str(profiled), "--by", by, "--top", "6", "--json")
    res = json.loads(out)
    values = [n[column] for n in res["neurons"]]
    assert code == 0 and res["column"] == column and len(values) == 6 and values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(kvmem.open_run(profiled).neurons[column].max())
    code, out, _ = run(capsys, "rank", str(profiled), "--by", by, "--top", "3")
    assert code == 0 and f"top 3 neurons by {by} ({column})" in out


def summary_text(run, monkeypatch, width: int = 300) -> str:
    """The closing summary of a run as printed on a wide terminal."""
    import io

    from rich.console import Console

    import kvmem.cli.profile as cli

    buf = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buf, width=width))
    cli.print_summary(run, cli.run_summary(run))
    return buf.getvalue()


def test_summary_headlines_magnitude_figures(monkeypatch, tmp_path, tiny_dirs, corpus, profiled):
    """Gated: the magnitude figures per layer, each header with its threshold; m > 0 only named. GELU: both."""
    import kvmem

    gated = kvmem.open_run(profiled)
    text = summary_text(gated, monkeypatch)
    for header in ("active", "|m|>10%", "max|m|", "±bound", "m>+10%", "m<−10%", "dense/", ">50/<1%", "max", "neuron"):
        assert header in text, header
    words = " ".join(text.split())  # the title wraps at the table's width
    assert "τ = 10% of each neuron's max |m|" in words and "> 50% / < 1% of tokens" in words
    assert "m>0" not in text and "sign-symmetric" in text
    layers = gated.layers
    for row in layers.itertuples():
        line = next(x for x in text.splitlines() if x.split()[:1] == [str(row.layer)] and "±" in x)
        assert f"{100 * row.active_10pct_maxabs:.1f}±{100 * row.active_10pct_maxabs_err:.1f}%" in line
        assert f"{row.dense_10pct}/{row.rare_10pct}" in line and line.rstrip().endswith(row.max_abs_neuron)
        assert f" {row.mass50_mean:,.0f} " in line and f" {row.mass90_mean:,.0f} " in line
    assert layers["mass50_mean"].notna().all() and "mass-L0" in text and "50%" in text and "90%" in text
    assert main(["profile", str(tiny_dirs["gpt2"]), "--corpus", str(corpus), "--seq-len", "16",
                 "--out", str(tmp_path / "g"), "--json"]) == 0
    text = summary_text(kvmem.open_run(tmp_path / "g"), monkeypatch)
    for header in ("|m|>10%", "m>+10%", "m<−10%", "firing", "m>0", "dead", "never", "L0"):
        assert header in text, header
    assert "sign-symmetric" not in text and "m > 0, for comparison" not in text
    # a terminal too narrow for both: the m > 0 figures in a second table, every number whole
    narrow = summary_text(kvmem.open_run(tmp_path / "g"), monkeypatch, width=80)
    assert "m > 0, for comparison" in narrow and "…" not in narrow.split("per layer")[1]
    assert max(len(line) for line in narrow.splitlines()) <= 80


@pytest.mark.parametrize("argv, needle", [
    (["top", "{run}", "1.x"], "malformed neuron"),
    (["top", "{run}", "9.1"], "out of range"),
    (["top", "{run}", "1.999"], "out of range"),
    (["top", "{run}", "1.2", "--kind", "best"], "unknown example kind"),
    (["rank", "{run}", "--by", "fame"], "--by must be"),
    (["top", "{tmp}", "1.1"], "not a kvmem run"),
    (["profile", "{model}", "--corpus", "{empty}", "--out", "{tmp}/x"], "holds no text"),
    (["profile", "{model}", "--corpus", "{tmp}/none.txt", "--out", "{tmp}/x"], "no such file"),
    (["profile", "{model}", "--corpus", "{corpus}", "--shard", "2/2", "--out", "{tmp}/x"], "--shard"),
    (["profile", "{model}", "--corpus", "{corpus}", "--tokens", "0", "--out", "{tmp}/x"], "--tokens"),
    (["profile", "{model}", "--corpus", "{corpus}", "--resume", "--out", "{run}"], "nothing to resume"),
    (["profile", "{model}", "--config", "{badcfg}", "--out", "{tmp}/x"], "unknown keys"),
    (["profile", "{model}", "--corpus", "{corpus}", "--layers", "5", "--out", "{tmp}/x"], "out of range"),
    (["merge", "{run}", "--out", "{tmp}/m"], "at least two"),
])
def test_bad_input(capsys, tmp_path, tiny_dirs, corpus, profiled, argv, needle):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.toml").write_text('seq_len = 8\ncolour = "red"\n')
    paths = dict(run=profiled, tmp=tmp_path, model=tiny_dirs["llama"], empty=tmp_path / "empty.txt",
                 corpus=corpus, badcfg=tmp_path / "bad.toml")
    code, _, err = run(capsys, *[a.format(**paths) for a in argv])
    assert_one_line_error(code, err)
    assert needle in err


def test_an_existing_run_is_never_overwritten_without_force(capsys, tiny_dirs, corpus, profiled):
    before = {p.name: p.read_bytes() for p in profiled.iterdir() if p.is_file()}
    code, _, err = run(capsys, "profile", str(tiny_dirs["gpt2"]), "--corpus", str(corpus), "--out", str(profiled))
    assert_one_line_error(code, err)
    assert "already holds a kvmem run" in err
    assert {p.name: p.read_bytes() for p in profiled.iterdir() if p.is_file()} == before


def test_unreadable_statistics_give_one_line(capsys, tmp_path, profiled):
    import shutil

    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(profiled, old)
    state = load_file(str(old / "stats.safetensors"))
    save_file({k: v for k, v in state.items() if not k.endswith("sample.priority")}, str(old / "stats.safetensors"))
    code, _, err = run(capsys, "top", str(old), "1.1")
    assert_one_line_error(code, err)
    assert "profile the run again" in err
    (old / "stats.safetensors").write_bytes(b"not safetensors")
    code, _, err = run(capsys, "top", str(old), "1.1")
    assert_one_line_error(code, err)
    assert "cannot read the statistics" in err


def test_force_with_a_bad_corpus_keeps_the_old_run(capsys, tmp_path, tiny_dirs, corpus, profiled):
    before = {p.name: p.read_bytes() for p in profiled.iterdir() if p.is_file()}
    code, _, err = run(capsys, "profile", str(tiny_dirs["llama"]), "--corpus", str(tmp_path / "missing.txt"),
                       "--out", str(profiled), "--force")
    assert_one_line_error(code, err)
    assert {p.name: p.read_bytes() for p in profiled.iterdir() if p.is_file()} == before
    assert not profiled.with_name(profiled.name + ".partial").exists()  # and nothing is left beside it
