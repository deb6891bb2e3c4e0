"""``kvmem vocab / search / trace / intervene`` from the command line: JSON, tables, one-line errors."""

import json

import pytest
import torch

from tests.cli.test_core_cli import assert_one_line_error, run
from tests.test_vocab import direct_rows

PROMPT = "Return the value of the named attribute"


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "cache"))


def test_vocab_json_and_table(capsys, tiny_dirs, tiny_models):
    path = str(tiny_dirs["llama"])
    code, out, err = run(capsys, "vocab", path, "1.5", "2.40", "--top", "4", "--json")
    assert code == 0, err
    res = json.loads(out)
    rows = direct_rows(tiny_models["llama"], "llama", [(1, 5), (2, 40)])
    assert [n["id"] for n in res["neurons"]] == ["1.5", "2.40"]
    for n, row in zip(res["neurons"], rows):
        assert n["top_ids"] == row.topk(4).indices.tolist()
        assert n["bottom_ids"] == row.topk(4, largest=False).indices.tolist()
    assert res["gated"] and "negative" in res["note"]
    code, out, err = run(capsys, "vocab", path, "1.5", "--top", "3")
    assert code == 0 and "neuron 1.5" in out and "promotes" in out and "note:" in out


def test_vocab_all_writes_the_cache(capsys, tiny_dirs, tmp_path):
    code, out, err = run(capsys, "vocab", str(tiny_dirs["gpt2"]), "--all", "--json", "--top", "5")
    assert code == 0, err
    m = json.loads(out)["projection"]
    assert m["n_layers"] == 3 and m["k"] == 5 and not m["cached"]
    assert (tmp_path / "cache" / "vocab").is_dir() and m["path"].startswith(str(tmp_path / "cache"))
    code, out, err = run(capsys, "vocab", str(tiny_dirs["gpt2"]), "--all", "--top", "5")
    assert code == 0 and "loaded from the cache" in out


def test_search_json_and_table(capsys, tiny_dirs):
    path = str(tiny_dirs["qwen2"])
    code, out, err = run(capsys, "search", path, " the", "--top", "6", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["token"] == " the" and res["signs"] == [1, -1] and len(res["neurons"]) == 6
    ranks = [n["rank"] for n in res["neurons"]]
    assert ranks == sorted(ranks)
    code, out, err = run(capsys, "search", path, "Return the value", "--layers", "1-2", "--suppress",
                         "--signs", "positive", "--json")
    res = json.loads(out)
    assert res["direction"] == "suppress" and "first" in res["note"] and res["signs"] == [1]
    assert {n["layer"] for n in res["neurons"]} <= {1, 2} and all(n["z"] < 0 for n in res["neurons"][:3])
    code, out, err = run(capsys, "search", path, " the", "--top", "3")
    assert code == 0 and "neurons that promote" in out and "-v:" in out


def test_trace_and_intervene(capsys, tiny_dirs):
    path = str(tiny_dirs["gpt_neox"])
    code, out, err = run(capsys, "trace", path, PROMPT, "--json", "--neurons", "4")
    assert code == 0, err
    res = json.loads(out)
    assert len(res["layers"]) == 3 and len(res["neurons"]) == 4 and res["target"] == res["prediction"][0]["token"]
    code, out, err = run(capsys, "trace", path, PROMPT)
    assert code == 0 and "trace of" in out and ("first enters" in out or "never" in out)

    code, out, err = run(capsys, "intervene", path, PROMPT, "--ablate", "0.1,0.2", "--ablate", "2.3",
                         "--scale", "1.4=2.5", "--linearize", "1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["ablated"] == ["0.1", "0.2", "2.3"] and res["scaled"] == {"1.4": 2.5} and res["linearized"] == [1]
    assert res["before"][0]["token"] == res["target"] and res["prob_before"] == pytest.approx(res["before"][0]["prob"])
    code, out, err = run(capsys, "intervene", path, PROMPT, "--ablate", "0.1")
    assert code == 0 and "next token" in out and "ablate 0.1" in out


@pytest.mark.parametrize("argv", [
    ("vocab", "{gpt2}", "1-2"),
    ("vocab", "{gpt2}", "9.0"),
    ("vocab", "{gpt2}", "0.999"),
    ("vocab", "{gpt2}"),
    ("search", "{gpt2}", ""),
    ("search", "{gpt2}", " the", "--layers", "9"),
    ("search", "{gpt2}", " the", "--top", "x"),
    ("trace", "{gpt2}", PROMPT, "--position", "99"),
    ("trace", "{gpt2}", PROMPT, "--target", ""),
    ("intervene", "{gpt2}", PROMPT, "--scale", "0.1=abc"),
    ("intervene", "{gpt2}", PROMPT, "--scale", "0.1"),
    ("intervene", "{gpt2}", PROMPT, "--ablate", "x"),
    ("intervene", "{gpt2}", PROMPT, "--ablate", "0.48"),
    ("intervene", "{gpt2}", PROMPT, "--linearize", "7"),
])
def test_bad_input_is_one_line_exit_2(capsys, tiny_dirs, argv):
    argv = [a.format(gpt2=tiny_dirs["gpt2"]) for a in argv]
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err)


@pytest.mark.slow
def test_smollm2_search_paris_cli(capsys, smollm, monkeypatch):
    monkeypatch.delenv("KVMEM_CACHE")  # the user's cache: the projection is computed once and kept
    code, out, err = run(capsys, "search", "smollm2-135m", " Paris", "--top", "5", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["n_in_top_k"] >= 1
    first = res["neurons"][: min(2, res["n_in_top_k"])]
    rows = direct_rows(smollm, "llama", [(n["layer"], n["neuron"]) for n in first], sign=[n["sign"] for n in first])
    for row in rows:
        assert res["token_id"] in row.topk(10).indices.tolist()
    with torch.no_grad():
        assert smollm.tokenizer.decode([res["token_id"]]) == " Paris"
