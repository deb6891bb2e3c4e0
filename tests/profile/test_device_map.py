"""Statistics that follow their layer's device (kvmem.stats.placement), on CPU: a device map read like
accelerate's, each layer's LayerStats placed where the map puts the layer, and a run over a map (all CPU
here) equal to a single-device run."""

import pytest
import torch
from test_sync_free_profile import BATCH, K, SEQ, same_stats

import kvmem
from kvmem.errors import KvmemError
from kvmem.profile.runner import ProfileConfig
from kvmem.stats import LayerStats, placement

NAMES = {0: "model.layers.0", 1: "model.layers.1", 10: "model.layers.10"}


def test_devices_from_map_takes_the_deepest_entry_holding_the_layer():
    dmap = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cuda:1", "model.layers.10": "cpu",
            "model.norm": 1, "lm_head": 1}
    got = placement.devices_from_map(dmap, NAMES)
    assert got == {0: torch.device("cuda", 0), 1: torch.device("cuda", 1), 10: torch.device("cpu")}
    # a parent entry covers its children; "model.layers.1" is not a parent of "model.layers.10"
    got = placement.devices_from_map({"model": "cpu", "model.layers.1": 1}, NAMES)
    assert got == {0: torch.device("cpu"), 1: torch.device("cuda", 1), 10: torch.device("cpu")}
    assert placement.devices_from_map({"": "cpu"}, NAMES)[10] == torch.device("cpu")
    assert placement.devices_from_map({"model.layers.0": "disk"}, {0: "model.layers.0"})[0].type == "meta"
    with pytest.raises(KvmemError, match="layer 1"):
        placement.devices_from_map({"model.layers.0": 0}, {1: "model.layers.1"})


def test_layer_devices_read_the_model(tiny_models):
    model = tiny_models["llama"]
    assert placement.block_names(model.hf) == {i: f"model.layers.{i}" for i in range(model.n_layers)}
    assert placement.block_names(tiny_models["gpt2"].hf)[2] == "transformer.h.2"
    assert placement.layer_devices(model, [0, 2]) == {0: torch.device("cpu"), 2: torch.device("cpu")}
    model.hf.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    try:
        assert placement.layer_devices(model, [0]) == {0: torch.device("cpu")}
        with pytest.raises(KvmemError, match="layer 1 is offloaded"):
            placement.layer_devices(model, [0, 1])
    finally:
        del model.hf.hf_device_map


def test_a_run_over_a_device_map_equals_a_single_device_run(tmp_path, corpus, tiny_models, monkeypatch):
    model = tiny_models["llama"]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    ref = kvmem.profile(cfg, tmp_path / "ref", model=model)
    seen = []
    real = placement.device_of
    monkeypatch.setattr(placement, "device_of", lambda v: seen.append(v) or real(v))
    model.hf.hf_device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)},
                              "model.norm": "cpu", "lm_head": "cpu"}
    try:
        run = kvmem.profile(cfg, tmp_path / "run", model=model)
    finally:
        del model.hf.hf_device_map
    assert len(seen) == model.n_layers  # every layer's statistics placed from the map
    same_stats(run.stats, ref.stats)
    gathered = placement.gather(run.stats, "cpu")
    assert all(isinstance(s, LayerStats) and s.device == torch.device("cpu") for s in gathered.values())
    same_stats(gathered, ref.stats)


def test_accelerate_dispatch_then_profile(tmp_path, corpus, tiny_dirs, tiny_models):
    """kvmem.models.load.dispatch (accelerate's dispatch_model) with a map of CPU devices: the map is left on
    the model, the statistics follow it, and the run equals one of the undispatched model."""
    from kvmem.models.load import dispatch

    kv = kvmem.load(str(tiny_dirs["llama"]), device="cpu")
    dmap = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(kv.n_layers)},
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    assert dispatch(kv.hf, dmap) == dmap and kv.hf.hf_device_map == dmap
    assert placement.layer_devices(kv, range(kv.n_layers)) == {i: torch.device("cpu") for i in range(kv.n_layers)}
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    same_stats(kvmem.profile(cfg, tmp_path / "run", model=kv).stats,
               kvmem.profile(cfg, tmp_path / "ref", model=tiny_models["llama"]).stats)


def test_device_map_options_refused_with_one_line(capsys, tmp_path, tiny_dirs, corpus):
    from kvmem.cli import main

    for value, msg in (("bogus", "--device-map must be auto"), ("auto", "needs CUDA GPUs")):
        if value == "auto" and torch.cuda.is_available():
            continue
        code = main(["profile", str(tiny_dirs["llama"]), "--corpus", str(corpus), "--out", str(tmp_path / value),
                     "--device-map", value])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
