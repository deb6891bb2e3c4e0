"""The whole-model value projection and ``search``, against direct computations with the HF modules."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from kvmem.errors import KvmemError
from kvmem.search import search
from kvmem.vocab import compute_projection, neuron_vocab, project_values
from tests.conftest import FAMILIES


# --- independent access to HF's own storage (not through the adapters) --------------------------
def raw_value(hf, family: str, layer: int, neuron: int) -> torch.Tensor:
    """v_i [d_model] read straight from the HF parameters of each family."""
    if family == "gpt2":
        return hf.transformer.h[layer].mlp.c_proj.weight[neuron]  # Conv1D stores [in, out]
    if family == "gpt_neox":
        return hf.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight[:, neuron]
    if family == "opt":
        return hf.model.decoder.layers[layer].fc2.weight[:, neuron]
    return hf.model.layers[layer].mlp.down_proj.weight[:, neuron]  # llama, mistral, qwen2, gemma


def raw_final_norm(hf, family: str):
    return {"gpt2": lambda: hf.transformer.ln_f, "gpt_neox": lambda: hf.gpt_neox.final_layer_norm,
            "opt": lambda: hf.model.decoder.final_layer_norm}.get(family, lambda: hf.model.norm)()


def direct_rows(model, family, pairs, through_norm=False, sign=None) -> torch.Tensor:
    """HF's own LM head applied to (the final norm of) each value vector: [n, d_vocab]."""
    hf = model.hf
    with torch.no_grad():
        v = torch.stack([raw_value(hf, family, a, b) for a, b in pairs])
        if sign is not None:
            v = v * torch.tensor(sign, dtype=v.dtype)[:, None]
        if through_norm:
            v = raw_final_norm(hf, family)(v)
        rows = hf.get_output_embeddings()(v)
        bias = getattr(hf.get_output_embeddings(), "bias", None)
        return (rows if bias is None else rows - bias).float()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("through_norm", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_projection_equals_direct_computation(tiny_models, family, through_norm):
    model = tiny_models[family]
    k = 7
    # 5 neurons per chunk: several chunks per layer, the last one ragged (48 = 9·5 + 3)
    chunked = compute_projection(model, k=k, through_norm=through_norm, chunk_mb=5 * model.d_vocab * 4 / 2**20)
    whole = compute_projection(model, k=k, through_norm=through_norm, chunk_mb=None)
    assert chunked["top_ids"].shape == (model.n_layers, model.d_mlp, k)
    for name in chunked:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-5, rtol=1e-5)

    rng = np.random.default_rng(0)
    pairs = [(int(a), int(b)) for a, b in zip(rng.integers(0, model.n_layers, 12), rng.integers(0, model.d_mlp, 12))]
    rows = direct_rows(model, family, pairs, through_norm)
    for (a, b), row in zip(pairs, rows):
        top, bottom = row.topk(k), row.topk(k, largest=False)
        torch.testing.assert_close(chunked["top_logits"][a, b], top.values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(chunked["bottom_logits"][a, b], bottom.values, atol=1e-4, rtol=1e-4)
        # the ids point at those logits in the direct row (robust to near-ties swapping order)
        torch.testing.assert_close(row[chunked["top_ids"][a, b]], top.values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(row[chunked["bottom_ids"][a, b]], bottom.values, atol=1e-4, rtol=1e-4)
        assert chunked["mean"][a, b].item() == pytest.approx(row.mean().item(), abs=1e-5)
        assert chunked["std"][a, b].item() == pytest.approx(row.std(correction=0).item(), rel=1e-4)
        v = raw_value(model.hf, family, a, b).float()
        assert chunked["norm"][a, b].item() == pytest.approx(v.norm().item(), rel=1e-5)


def test_projection_cache_format_and_reuse(tiny_models, tmp_cache):
    model = tiny_models["llama"]
    first = project_values(model, k=6)
    assert not first.cached and first.path is not None and first.path.parent == tmp_cache / "vocab"
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["format"] == "kvmem-vocab/2" and manifest["k"] == 6 and manifest["through_norm"] is False
    assert manifest["fingerprint"] == model.fingerprint()
    assert {p.name for p in first.path.iterdir()} == {"manifest.json", "tensors.safetensors", "table.parquet"}

    table = pd.read_parquet(first.path / "table.parquet")
    assert len(table) == model.n_layers * model.d_mlp
    row = table[(table.layer == 2) & (table.neuron == 17)].iloc[0]
    assert row["id"] == "2.17"
    direct = direct_rows(model, "llama", [(2, 17)])[0]
    assert list(row["top_tokens"]) == model.token_strings(direct.topk(6).indices)
    assert list(row["bottom_ids"]) == direct.topk(6, largest=False).indices.tolist()

    again = project_values(model, k=6)
    assert again.cached and again.path == first.path
    for name in first.tensors:
        assert torch.equal(again[name], first[name]), name
    smaller = project_values(model, k=3)  # served from the k=6 folder
    assert smaller.cached and smaller["top_ids"].shape[-1] == 3
    assert torch.equal(smaller["top_ids"], first["top_ids"][..., :3])
    assert smaller.table.top_tokens.map(len).eq(3).all()
    normed = project_values(model, k=3, through_norm=True)  # a different folder
    assert not normed.cached and normed.path != first.path


def test_neuron_vocab_against_lm_head(tiny_models):
    model = tiny_models["gemma"]
    res = neuron_vocab(model, ["1.5", (2, 40)], k=4, through_norm=True)
    rows = direct_rows(model, "gemma", [(1, 5), (2, 40)], through_norm=True)
    assert res.neurons.id.tolist() == ["1.5", "2.40"]
    for row, direct in zip(res.neurons.itertuples(), rows):
        assert row.top_ids == direct.topk(4).indices.tolist()
        assert row.bottom_tokens == model.token_strings(direct.topk(4, largest=False).indices)
    assert res.gated and "negative" in res.note
    assert neuron_vocab(tiny_models["gpt2"], ["0.0"]).note == ""


@pytest.mark.parametrize("bad", ["3.0", "0.48", "1-2", "x", ""])
def test_neuron_vocab_bad_ids(tiny_models, bad):
    with pytest.raises(KvmemError):
        neuron_vocab(tiny_models["gpt2"], [bad])


# --- search ---------------------------------------------------------------------------------------
def brute_force(model, family, token, signs, suppress, through_norm=False):
    """For every (neuron, sign): rank of the token in its full row and its z-score."""
    pairs = [(a, b) for a in range(model.n_layers) for b in range(model.d_mlp)]
    out = []
    for s in signs:
        rows = direct_rows(model, family, pairs, through_norm, sign=[s] * len(pairs))
        col = rows[:, token : token + 1]
        rank = ((rows < col) if suppress else (rows > col)).sum(1) + 1
        z = (col[:, 0] - rows.mean(1)) / rows.std(1, correction=0)
        out += [((a, b, s), int(r), float(zz)) for (a, b), r, zz in zip(pairs, rank, z)]
    return out


@pytest.mark.parametrize("family,suppress,through_norm", [
    ("llama", False, False), ("gpt2", False, False), ("gpt_neox", True, False), ("qwen2", True, False),
    ("gemma", False, True), ("opt", True, True)])
def test_search_ranks_against_brute_force(tiny_models, tmp_cache, family, suppress, through_norm):
    model = tiny_models[family]
    k = 8
    token = model.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    res = search(model, " the", top=15, k=k, suppress=suppress, through_norm=through_norm)
    signs = [1, -1] if model.gated else [1]
    assert res.signs == signs and res.token_id == token and res.note == ""
    brute = brute_force(model, family, token, signs, suppress, through_norm)
    strength = -1 if suppress else 1  # a suppressing row has the token far below its mean
    qualified = sorted((r, -strength * z, key) for key, r, z in brute if r <= k)
    assert res.n_in_top_k == len(qualified) > 0
    got = [(row.layer, row.neuron, row.sign) for row in res.neurons.itertuples()]
    n = min(len(qualified), 15)
    # the neurons with the token among their k first come first, by rank (ties by z-score)
    assert got[:n] == [key for _, _, key in qualified[:n]]
    lookup = {key: (r, z) for key, r, z in brute}
    for row, key in zip(res.neurons.itertuples(), got):
        r, z = lookup[key]
        assert row.rank == r
        assert row.z == pytest.approx(z, abs=1e-4)
    ranks = res.neurons["rank"].tolist()
    assert ranks == sorted(ranks)


def test_search_options_and_errors(tiny_models, tmp_cache):
    model = tiny_models["mistral"]
    only_pos = search(model, " the", signs="positive", layers=[1, 2], top=5)
    assert set(only_pos.neurons.sign) == {1} and set(only_pos.neurons.layer) <= {1, 2}
    multi = search(model, "Return the value", top=3)
    assert f"{len(multi.pieces)} tokens" in multi.note and "first" in multi.note
    assert multi.token == multi.pieces[0] and len(multi.pieces) > 1
    with pytest.raises(KvmemError, match="empty"):
        search(model, "")
    with pytest.raises(KvmemError):
        search(model, " the", layers=[3])
    with pytest.raises(KvmemError):
        search(model, " the", signs="negative")
    with pytest.raises(KvmemError):
        search(model, " the", top=0)
    with pytest.raises(KvmemError, match="bias"):  # LayerNorm: norm(-v) is not -norm(v)
        search(tiny_models["gpt2"], " the", signs="both", through_norm=True)
    assert search(tiny_models["gpt2"], " the", signs="both", top=3).signs == [1, -1]


# --- the real SmolLM2 --------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_search_paris(smollm):
    """Only a handful of SmolLM2's 46,080 neurons have ' Paris' in their top 10 (either sign):
    search finds them first; ranking by the raw logit does not."""
    res = search(smollm, " Paris", top=10)
    paris = res.token_id
    assert res.token == " Paris" and res.note == ""
    assert 1 <= res.n_in_top_k <= 20
    first = res.neurons.head(res.n_in_top_k)
    rows = direct_rows(smollm, "llama", list(zip(first.layer, first.neuron)), sign=first.sign.tolist())
    for row, direct in zip(first.itertuples(), rows):
        top10 = direct.topk(10).indices.tolist()
        assert paris in top10, row.id
        assert row.rank == top10.index(paris) + 1
    # the raw logit v_i·W_U[Paris] ranks large-norm values that promote many tokens first
    with torch.no_grad():
        raw = torch.stack([lay.W_out.float() @ smollm.W_U[:, paris].float() for lay in smollm.layers])
    best = raw.flatten().topk(5).indices.tolist()
    pairs = [divmod(i, smollm.d_mlp) for i in best]
    rows = direct_rows(smollm, "llama", pairs)
    assert not any(paris in row.topk(10).indices.tolist() for row in rows)


# --- float32 products and undefined ids (issue 12, defect 11) ----------------------------------------
PAD = 64  # unembedding rows past the tokenizer, as Llama/Qwen pad d_vocab to a multiple of 64/128


def padded_llama(tokenizer):
    """A tiny Llama whose unembedding has PAD rows past the tokenizer's ids, made large so that without
    masking they would be the top and bottom tokens of most value vectors."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvmem.models.kvmodel import from_hf
    from tests.conftest import D, FF, H, L, VOCAB

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=FF, num_attention_heads=H,
                      num_key_value_heads=2, vocab_size=VOCAB + PAD, max_position_embeddings=128)
    hf = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    for p in hf.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.3)
    hf.lm_head.weight[VOCAB:] *= 20
    return from_hf(hf, tokenizer)


@pytest.mark.parametrize("through_norm", [False, True])
def test_projection_masks_ids_the_tokenizer_does_not_define(tiny_tokenizer, through_norm):
    from tests.conftest import VOCAB

    model = padded_llama(tiny_tokenizer)
    assert model.d_vocab == VOCAB + PAD and len(tiny_tokenizer) == VOCAB
    k = 5
    t = compute_projection(model, k=k, through_norm=through_norm, chunk_mb=None)
    pairs = [(a, b) for a in range(model.n_layers) for b in range(0, model.d_mlp, 7)]
    rows = direct_rows(model, "llama", pairs, through_norm).double()
    would = sum(int(row.argmax()) >= VOCAB or int(row.argmin()) >= VOCAB for row in rows)
    assert would > len(pairs) // 2  # without the mask, padded ids would lead most rows
    assert int(t["top_ids"].max()) < VOCAB and int(t["bottom_ids"].max()) < VOCAB
    for (a, b), row in zip(pairs, rows):
        defined = row[:VOCAB]
        assert t["top_ids"][a, b].tolist() == defined.topk(k).indices.tolist()
        assert t["bottom_ids"][a, b].tolist() == defined.topk(k, largest=False).indices.tolist()
        assert t["mean"][a, b].item() == pytest.approx(defined.mean().item(), abs=1e-5)
        assert t["std"][a, b].item() == pytest.approx(defined.std(correction=0).item(), rel=1e-4)
    res = neuron_vocab(model, ["1.5", "2.40"], k=k, through_norm=through_norm)
    for row, (a, b) in zip(res.neurons.itertuples(), [(1, 5), (2, 40)]):
        defined = direct_rows(model, "llama", [(a, b)], through_norm)[0, :VOCAB].double()
        assert row.top_ids == defined.topk(k).indices.tolist()
        assert row.bottom_ids == defined.topk(k, largest=False).indices.tolist()
        assert max(row.top_ids + row.bottom_ids) < VOCAB


def test_projection_in_float32_for_a_bf16_model(tiny_tokenizer):
    """Two logits 1 + 2^-9 and 1 tie once the product is rounded to bf16; the float32 projection keeps
    float64's order (the higher id first, its logit strictly larger)."""
    from kvmem.models.kvmodel import from_hf
    from tests.conftest import make_tiny

    model = from_hf(make_tiny("llama"), tiny_tokenizer, dtype=torch.bfloat16)
    a, b = 20, 10  # a wins in exact arithmetic; b has the lower id, which a tie would favour
    with torch.no_grad():
        down = model.hf.model.layers[0].mlp.down_proj.weight  # [d_model, d_mlp]: column 0 is v_0 of layer 0
        down[:, 0] = 0
        down[0, 0], down[1, 0] = 1.0, 2.0 ** -9
        head = model.hf.lm_head.weight  # [d_vocab, d_model]
        head.mul_(0.01)
        head[b] = 0
        head[a] = 0
        head[b, 0] = 1.0
        head[a, 0], head[a, 1] = 1.0, 1.0
    v = model.layers[0].W_out[0]
    bf16 = v @ model.W_U
    assert bf16.dtype == torch.bfloat16 and bf16[a] == bf16[b]  # the bf16 product ties them
    exact = v.double() @ model.W_U.double()
    assert exact[a] > exact[b] and int(exact.argmax()) == a
    t = compute_projection(model, k=3, layers=[0], chunk_mb=None)
    assert t["top_ids"][0, 0, :2].tolist() == [a, b]
    assert t["top_logits"][0, 0, 0] > t["top_logits"][0, 0, 1]
    assert t["top_logits"][0, 0, 0].item() == pytest.approx(exact[a].item(), abs=1e-6)
    res = neuron_vocab(model, ["0.0"], k=2)
    assert res.neurons.top_ids[0] == [a, b] and res.neurons.top_logits[0][0] > res.neurons.top_logits[0][1]


def test_projection_of_a_post_norm_family_uses_the_written_values(tiny_tokenizer):
    """Gemma 2 writes N(y) = (1 + w)⊙y/rms(y): neuron i's write is along (1 + w)⊙v_i, which is what is projected."""
    from kvmem.models.kvmodel import from_hf
    from tests.conftest import make_tiny_new

    model = from_hf(make_tiny_new("gemma2"), tiny_tokenizer)
    t = compute_projection(model, k=4, chunk_mb=None)
    hf = model.hf
    differs = []
    for a, b in [(0, 3), (1, 8), (2, 17)]:
        with torch.no_grad():
            v = hf.model.layers[a].mlp.down_proj.weight[:, b].double()
            w = v * (1 + hf.model.layers[a].post_feedforward_layernorm.weight.double())
            row = w @ hf.lm_head.weight.double().T
            plain = v @ hf.lm_head.weight.double().T
        differs.append(row.topk(4).indices.tolist() != plain.topk(4).indices.tolist())
        assert t["top_ids"][a, b].tolist() == row.topk(4).indices.tolist()
        assert t["bottom_ids"][a, b].tolist() == row.topk(4, largest=False).indices.tolist()
        res = neuron_vocab(model, [f"{a}.{b}"], k=4)
        assert res.neurons.top_ids[0] == row.topk(4).indices.tolist()
    assert any(differs)  # the gain matters: projecting v_i itself would give other tokens
