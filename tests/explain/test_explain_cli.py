"""``kvmem explain`` / ``kvmem score`` end to end with the LLM-free baseline on a tiny gated run, and the
one-line errors (bad URL, unreachable endpoint, bad selection)."""

import math

import pytest
from explain_runs import make_run

import kvmem
from kvmem.explain import store
from kvmem.explain.data import gather
from kvmem.explain.explainer import ExplainConfig, detection_items
from kvmem.explain.scorers import balanced_accuracy
from tests.cli.test_core_cli import assert_one_line_error, run as cli


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_models):
    return make_run(tmp_path_factory, tiny_models["llama"], "llama"), tiny_models["llama"]


def test_baseline_end_to_end(capsys, llama_run):
    run, model = llama_run
    code, out, err = cli(capsys, "explain", str(run.path), "--sample", "2", "--seed", "1")
    assert code == 0, err
    assert "baseline only" in out and "explanations.parquet" in out
    df = kvmem.open_run(run.path).explanations
    assert list(df.columns[:len(store.COLUMNS)]) == list(store.COLUMNS)
    assert len(df) == 2 * 2 * 2  # neurons x signs (gated) x sides
    assert set(df.side) == {"key", "value"} and set(df.sign) == {"+", "-"} and set(df.explainer) == {"baseline"}
    key = df[df.side == "key"]
    assert key.value.isna().all() and (key.simulation_n > 0).all()
    val = df[df.side == "value"]
    assert val.detection.isna().all() and (val.value_n > 0).all()
    ok = df[["detection", "fuzzing", "value"]].stack().dropna()
    assert ((ok >= 0) & (ok <= 1)).all()
    # detection of one key row recomputed here: a snippet is "activating" when it holds a trigger token
    r = key.iloc[0]
    layer, neuron = (int(x) for x in r.neuron.split("."))
    d = gather(run, model, layer, neuron, r.sign, seed=int(r.split_seed), n_top=ExplainConfig.n_top,
               n_bands=ExplainConfig.n_bands, per_band=ExplainConfig.per_band, before=ExplainConfig.before,
               after=ExplainConfig.after)
    from collections import Counter
    trig = {t for t, _ in Counter(s.tokens[s.at].strip().lower() or s.tokens[s.at] for s in d.explain).most_common(5)}
    items = detection_items(d, int(r.split_seed))
    pred = [any((t.strip().lower() or t) in trig for t in toks) for toks, _ in items]
    want = balanced_accuracy(pred, [y for _, y in items]).value
    assert (math.isnan(want) and math.isnan(r.detection)) or r.detection == pytest.approx(want)
    # a repeated run replaces its rows; score rescoring keeps them
    code, out, err = cli(capsys, "explain", str(run.path), "--sample", "2", "--seed", "1")
    assert code == 0, err
    assert len(kvmem.open_run(run.path).explanations) == 8
    code, out, err = cli(capsys, "score", str(run.path))
    assert code == 0, err
    again = kvmem.open_run(run.path).explanations
    assert len(again) == 8 and again.detection.equals(df.detection)


def test_dry_run_prints_one_prompt_and_writes_nothing(capsys, llama_run, tmp_path):
    run, _ = llama_run
    before = kvmem.open_run(run.path).explanations
    code, out, err = cli(capsys, "explain", str(run.path), "--neurons", "1.3", "--dry-run", "--local", "x")
    assert_one_line_error(code, err)  # --local x: an unknown model is a one-line error, never a traceback
    code, out, err = cli(capsys, "explain", str(run.path), "--neurons", "1.3", "--dry-run")
    assert code == 0, err
    assert "[user]" in out and "«" in out and "dry run" in out
    assert len(kvmem.open_run(run.path).explanations) == len(before)


@pytest.mark.parametrize("args", [
    ["--endpoint", "http://127.0.0.1:9/v1", "--explainer", "m"],  # nothing listens on port 9
    ["--endpoint", "not a url", "--explainer", "m"],
    ["--endpoint", "ftp://example.org", "--explainer", "m"],
    ["--endpoint", "http://127.0.0.1:9"],  # no --explainer
    ["--endpoint", "https://api.example.invalid/v1", "--explainer", "m", "--api-key-env", "KVMEM_NO_SUCH_VAR"],
    ["--layers", "7-9"],
    ["--neurons", "1.99999"],
    ["--sample", "0"],
])
def test_bad_options_are_one_line_errors(capsys, llama_run, args):
    run, _ = llama_run
    code, out, err = cli(capsys, "explain", str(run.path), *args)
    assert_one_line_error(code, err)


def test_score_errors(capsys, tmp_path_factory, tiny_models):
    run = make_run(tmp_path_factory, tiny_models["gpt2"], "fresh")
    code, out, err = cli(capsys, "score", str(run.path))
    assert_one_line_error(code, err)
    assert "kvmem explain" in err
    code, out, err = cli(capsys, "score", str(run.path), "--endpoint", "http://127.0.0.1:9", "--scorer", "m")
    assert_one_line_error(code, err)
