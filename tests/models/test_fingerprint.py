"""The fingerprint identifies what a model computes, wherever it was loaded from."""

from __future__ import annotations

import shutil

import pytest
import torch

import kvmem
from kvmem.models.fingerprint import architecture, fingerprint


def test_the_same_weights_from_another_folder_and_dtype_give_one_fingerprint(tmp_path, tiny_dirs, tiny_models):
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tiny_dirs["llama"], copy)
    assert kvmem.load(str(copy), device="cpu").fingerprint() == tiny_models["llama"].fingerprint()
    bf16 = kvmem.load(str(tiny_dirs["llama"]), device="cpu", dtype="bfloat16")
    assert bf16.fingerprint() == tiny_models["llama"].fingerprint()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_changed_ffn_weight_gives_another_fingerprint(tiny_dirs, family):
    model = kvmem.load(str(tiny_dirs[family]), device="cpu")
    before = model.fingerprint()
    with torch.no_grad():
        model.layers[1].W_out[0, 0] += 0.5  # the first entry is always sampled
    assert model.fingerprint() != before
    with torch.no_grad():
        model.layers[1].W_out[0, 0] -= 0.5
    assert model.fingerprint() == before
    with torch.no_grad():  # a fine-tune moves every weight a little
        for lay in model.layers:
            lay.W_out.mul_(1.01)
    assert model.fingerprint() != before


def test_the_architecture_counts_but_paths_and_dtypes_do_not(tiny_dirs):
    model = kvmem.load(str(tiny_dirs["llama"]), device="cpu")
    arch = architecture(model.hf.config)
    assert "_name_or_path" not in arch and "dtype" not in arch and arch["rms_norm_eps"] == model.hf.config.rms_norm_eps
    before = fingerprint(model.hf)
    model.hf.config._name_or_path = "/somewhere/else"
    model.hf.config.quantization_config = {"quant_method": "gguf"}
    assert fingerprint(model.hf) == before
    model.hf.config.rms_norm_eps = 1e-3
    assert fingerprint(model.hf) != before


@pytest.mark.slow
def test_bundled_model_first_and_second_load_and_a_copy_agree(tmp_path, monkeypatch):
    """Regression: on a cold cache the first load used to return the model built from the GGUF file,
    whose config (paths, quantization) hashed differently from every later load of the cached folder."""
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "cache"))
    first = kvmem.load("smollm2-135m", device="cpu")
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    second = kvmem.load("smollm2-135m", device="cpu")
    assert first.fingerprint() == second.fingerprint()
    assert first.hf.config.to_dict() == second.hf.config.to_dict()  # the same model, not just the same hash
    copy = tmp_path / "copy"
    shutil.copytree(cached[0], copy)
    assert kvmem.load(str(copy), device="cpu").fingerprint() == first.fingerprint()
