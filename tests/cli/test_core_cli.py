"""The core commands from the command line: JSON output, and bad input -> one line, exit code 2."""

import json

import pytest
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

from kvmem.cli import main


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``kvmem ARGV`` in this process (paths given as Path are fine)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def test_query_json_on_a_tiny_model(capsys, tiny_dirs):
    code, out, err = run(capsys, "query", str(tiny_dirs["llama"]), "The value of x is", "--json", "--top", "7")
    assert code == 0, err
    res = json.loads(out)
    assert {"tokens", "position", "next_tokens", "neurons"} <= set(res)
    assert res["position"] == len(res["tokens"]) - 1
    assert len(res["neurons"]) == 7
    for n in res["neurons"]:
        assert {"layer", "neuron", "activation", "contribution", "top_tokens"} <= set(n)
        assert n["contribution"] >= 0
    contributions = [n["contribution"] for n in res["neurons"]]
    assert contributions == sorted(contributions, reverse=True)


def test_query_ranks_against_a_brute_force_scan(capsys, tiny_dirs, tiny_models):
    import torch

    import kvmem

    model = tiny_models["gpt_neox"]
    code, out, _ = run(capsys, "query", str(tiny_dirs["gpt_neox"]), "abs(x) returns", "--json",
                       "--by", "activation", "--top", "5", "--position", "1")
    res = json.loads(out)
    cap = kvmem.run_capture(model, model.encode("abs(x) returns"))
    scored = [(abs(cap.coef[layer][0, 1, i].item()), layer, i) for layer in range(model.n_layers)
              for i in range(model.d_mlp)]
    best = sorted(scored, reverse=True)[:5]
    assert [(n["layer"], n["neuron"]) for n in res["neurons"]] == [(layer, i) for _, layer, i in best]
    # top_tokens: what sign(m)·v_i promotes, checked against the LM head applied to the value vector
    first = res["neurons"][0]
    v = model.layers[first["layer"]].W_out[first["neuron"]] * (1 if first["activation"] >= 0 else -1)
    with torch.no_grad():
        expected = model.hf.get_output_embeddings()(v).topk(5).indices
    assert first["top_tokens"] == model.token_strings(expected)


def test_models_and_info(capsys, tiny_dirs):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and json.loads(out)["model_types"]["llama"] == "llama"
    code, out, _ = run(capsys, "info", str(tiny_dirs["opt"]), "--json")
    facts = json.loads(out)
    assert code == 0 and facts["n_layers"] == 3 and facts["activation"] == "relu" and facts["gated"] is False


@pytest.fixture
def not_models(tmp_path, tiny_tokenizer):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's bar would land in the captured stderr
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF but not really")
    bloom = tmp_path / "bloom"  # an architecture kvmem does not support (GPT-J is supported now)
    AutoModelForCausalLM.from_config(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)).save_pretrained(bloom)
    odd = tmp_path / "odd"  # a supported family with a config setting its adapter does not know
    AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=24,
                                                 num_attention_heads=2, vocab_size=50,
                                                 kvmem_unknown_switch=True)).save_pretrained(odd)
    for folder in (bloom, odd):
        tiny_tokenizer.save_pretrained(folder)
    return {"text": text, "empty": empty_dir, "gguf": bad_gguf, "bloom": bloom, "odd": odd}


@pytest.mark.parametrize("case, argv, needle", [
    ("missing", ["query", "./no/such/model", "hi"], "no such file"),
    ("missing_gguf", ["info", "nothing-here.gguf"], "no such file"),
    ("text", ["query", "{text}", "hi"], "not a model"),
    ("empty", ["info", "{empty}"], "no config.json"),
    ("gguf", ["info", "{gguf}"], "GGUF"),
    ("bloom", ["info", "{bloom}"], "unsupported architecture 'bloom'"),
    ("odd_config", ["info", "{odd}"], "config.kvmem_unknown_switch="),
    ("empty_prompt", ["query", "{llama}", "   "], "prompt is empty"),
    ("position", ["query", "{llama}", "two words", "--position", "40"], "outside the prompt"),
    ("layer", ["query", "{llama}", "two words", "--layers", "7"], "out of range"),
    ("layer_syntax", ["query", "{llama}", "two words", "--layers", "a-b"], "malformed layer list"),
    ("by", ["query", "{llama}", "two words", "--by", "magic"], "--by"),
    ("not_int", ["query", "{llama}", "two words", "--position", "last"], "position"),
    ("device", ["info", "{llama}", "--device", "cuda:7"], "CUDA"),
    ("dtype", ["info", "{llama}", "--dtype", "float8"], "dtype"),
    ("unknown_option", ["query", "{llama}", "x", "--frobnicate"], "frobnicate"),
])
def test_bad_input_gives_one_line_and_exit_2(capsys, tiny_dirs, not_models, case, argv, needle):
    paths = {**{k: str(v) for k, v in not_models.items()}, "llama": str(tiny_dirs["llama"])}
    code, out, err = run(capsys, *[a.format(**paths) for a in argv])
    assert_one_line_error(code, err)
    assert needle in err
