"""kvmem profile on document rows: position 0 left out by default and kept on request, rows without a BOS,
legacy stream rows, and the layout in the run folder (formats 2 and 3)."""

import json
from dataclasses import replace

import pytest
import torch

import kvmem
from kvmem.errors import KvmemError
from kvmem.profile.runner import ProfileConfig

SEQ = 8


@pytest.fixture
def no_bos(tiny_models, monkeypatch):
    """The tiny Qwen2 model with a tokenizer that defines no BOS (like Qwen2's own)."""
    model = tiny_models["qwen2"]
    monkeypatch.setattr(model.tokenizer, "bos_token", None)
    assert model.tokenizer.bos_token_id is None
    return model


def _examples(s) -> torch.Tensor:
    parts = [s.top.index, s.bottom.index, s.top_docs.index, s.sample.index]
    idx = torch.cat([p.flatten() for p in parts])
    return idx[idx >= 0]


def test_bos_rows_count_every_token_once_and_never_position_0(tmp_path, corpus, tiny_models):
    model = tiny_models["gpt2"]
    run = kvmem.profile(ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=2, top_k=4, checkpoint_every=1e9),
                        tmp_path / "run", model=model)
    lay = run.layout
    assert run.format == 3 and run.manifest["layout"] == lay.settings()
    assert lay.bos_id == model.tokenizer.bos_token_id and lay.doc_rows and lay.skip_first
    for s in run.stats.values():
        assert s.n == run.tokens.n_tokens  # the BOS is not a store token; every store token once
        assert int(s.l0_pos_count[0]) == 0 and int(s.l0_pos_count[1]) == lay.n_rows
        assert (lay.position(_examples(s)) >= 1).all()


def test_without_bos_position_0_is_left_out_unless_kept(tmp_path, corpus, no_bos):
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=2, top_k=4, checkpoint_every=1e9)
    run = kvmem.profile(cfg, tmp_path / "skip", model=no_bos)
    lay = run.layout
    assert lay.bos_id is None and lay.skip_first and run.manifest["settings"]["bos_id"] is None
    starts = set(lay.starts.tolist())
    for s in run.stats.values():
        assert s.n == run.tokens.n_tokens - lay.n_rows and int(s.l0_pos_count[0]) == 0
        assert not starts & set(_examples(s).tolist())  # no example at a row's first token
    kept = kvmem.profile(replace(cfg, skip_first=False), tmp_path / "keep", model=no_bos)
    assert not kept.layout.skip_first and torch.equal(kept.layout.starts, lay.starts)
    for layer, s in kept.stats.items():
        assert s.n == run.tokens.n_tokens and int(s.l0_pos_count[0]) == lay.n_rows
        # position 0 (the attention sink) enters: the statistics over the other tokens are the same
        assert torch.equal(s.count_pos - run.stats[layer].count_pos,
                           kept_first_counts(no_bos, kept, layer))


def kept_first_counts(model, run, layer) -> torch.Tensor:
    """m > 0 counts [d_mlp] over the rows' first tokens, each row's first token run alone (brute force)."""
    firsts = run.tokens.ids[run.layout.starts - run.tokens.offset].long()
    m = kvmem.run_capture(model, firsts[:, None], layers=[layer]).coef[layer][:, 0]  # [rows, d_mlp]
    return (m > 0).sum(0)


def test_stream_rows_are_the_legacy_layout(tmp_path, corpus, tiny_models):
    model = tiny_models["gpt2"]
    run = kvmem.profile(ProfileConfig(corpus=str(corpus), seq_len=SEQ, top_k=4, rows="stream", skip_first=False),
                        tmp_path / "run", model=model)
    lay = run.layout
    assert lay.bos_id is None and not lay.doc_rows
    assert lay.starts.tolist() == list(range(0, run.tokens.n_tokens, SEQ))
    with pytest.raises(KvmemError, match="^rows must be one of") as info:
        ProfileConfig(rows="docs").validate()
    assert info.value.for_flag().startswith("--rows must be one of")


def test_layout_of_format_2_and_a_format_3_manifest_without_it(tmp_path, corpus, tiny_models):
    run = kvmem.profile(ProfileConfig(corpus=str(corpus), seq_len=SEQ, top_k=4, tokens=60), tmp_path / "run",
                        model=tiny_models["gpt2"])
    path = run.path / "manifest.json"
    m = json.loads(path.read_text())
    layout = m.pop("layout")
    path.write_text(json.dumps(m))
    with pytest.raises(KvmemError, match="layout"):
        kvmem.open_run(run.path)
    path.write_text(json.dumps(m | {"format": 2}))
    old = kvmem.open_run(run.path).layout  # a run of kvmem before document rows
    assert old.bos_id is None and not old.doc_rows and not old.skip_first
    assert old.starts.tolist() == list(range(0, 60, SEQ))
    assert layout["bos_id"] is not None


def test_bos_option_none_or_a_named_token(tmp_path, corpus, tiny_models):
    model = tiny_models["gpt2"]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, top_k=4, tokens=60)
    from kvmem.profile.runner import bos_id

    assert bos_id(model, replace(cfg, bos="none")) is None
    assert bos_id(model, replace(cfg, bos="<|endoftext|>")) == model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(KvmemError, match="--bos"):
        bos_id(model, replace(cfg, bos="<|not a token|>"))
    run = kvmem.profile(replace(cfg, bos="none"), tmp_path / "run", model=model)
    assert run.layout.bos_id is None and run.manifest["settings"]["bos"] == "none"
    other = kvmem.profile(cfg, tmp_path / "other", model=model)
    with pytest.raises(KvmemError, match="rows"):  # runs cut into other rows do not merge
        kvmem.merge([run.path, other.path], tmp_path / "merged")
