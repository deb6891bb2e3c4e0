"""The commands on a tiny random Gemma 2 (a post-FFN RMSNorm with gain 1 + γ, final-logit soft-capping,
embedding scaling), saved as a HF folder and loaded by path: what ``query``, ``vocab``, ``search``, ``trace``,
``intervene`` and a short ``profile`` + ``report`` print equals a brute force over the HF modules' own tensors
(the FFN's down-projection input m, its output y, the residual the final norm reads), written here by hand:

    neuron i's update on a token = m_i · (1 + γ) ⊙ v_i / sqrt(mean(y²) + eps)      (y: the FFN's output)
"""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import kvmem
from tests.conftest import make_tiny_new
from tests.cli.test_core_cli import run

PROMPT = "The value of x is"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, tiny_tokenizer):
    hf = make_tiny_new("gemma2", seed=2)
    path = tmp_path_factory.mktemp("postnorm") / "gemma2"
    hf.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    return path, hf, tiny_tokenizer


def forward(hf, ids, mask=None, zero=None):
    """(logits [pos, vocab], per layer: m [pos, d_mlp], y [pos, d]; h: the last block's output [pos, d]).
    ``zero``: (layer, neuron) whose m is set to 0 at every position before the down projection."""
    rec, handles = {}, []
    for i, blk in enumerate(hf.model.layers):
        def pre(mod, args, i=i):
            if zero and zero[0] == i:
                x = args[0].clone()
                x[..., zero[1]] = 0
                rec[("m", i)] = x[0]
                return (x,)
            rec[("m", i)] = args[0][0].clone()
        handles.append(blk.mlp.down_proj.register_forward_pre_hook(pre))
        handles.append(blk.mlp.register_forward_hook(lambda mod, a, out, i=i: rec.__setitem__(("y", i), out[0])))
    handles.append(hf.model.norm.register_forward_pre_hook(lambda mod, a: rec.__setitem__("h", a[0][0])))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, rec


def written(hf, layer):
    """[d_mlp, d_model]: (1 + γ) ⊙ v_i for every neuron of ``layer`` (float64)."""
    blk = hf.model.layers[layer]
    return (blk.mlp.down_proj.weight.T * (1 + blk.post_feedforward_layernorm.weight)).double()


def inv_rms(x, eps):
    return 1 / torch.sqrt(x.double().pow(2).mean() + eps)


def updates(hf, rec, layer):
    """(m [d_mlp], the neurons' updates [d_mlp, d_model]) of ``layer`` at the last position: m_i·(1+γ)⊙v_i/rms(y)."""
    m, y = rec[("m", layer)][-1].double(), rec[("y", layer)][-1]
    s = inv_rms(y, hf.model.layers[layer].post_feedforward_layernorm.eps)
    return m, m[:, None] * written(hf, layer) * s


def test_query_contributions_are_the_post_norm_updates(capsys, gemma):
    path, hf, tok = gemma
    code, out, err = run(capsys, "query", path, PROMPT, "--json", "--top", "8")
    assert code == 0, err
    res = json.loads(out)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    logits, rec = forward(hf, ids)
    want = []
    for layer in range(len(hf.model.layers)):
        m, upd = updates(hf, rec, layer)
        norms = upd.norm(dim=1)
        want += [(float(norms[i]), f"{layer}.{i}", float(m[i])) for i in range(m.numel())]
    want.sort(reverse=True)
    assert [n["id"] for n in res["neurons"]] == [name for _, name, _ in want[:8]]
    for n, (c, _, act) in zip(res["neurons"], want):
        assert n["contribution"] == pytest.approx(c, rel=1e-4) and n["activation"] == pytest.approx(act, rel=1e-4)
    # the next-token table is the model's own (soft-capped) logits
    assert res["next_tokens"][0]["id"] == int(logits[-1].argmax())
    assert res["next_tokens"][0]["logit"] == pytest.approx(float(logits[-1].max()), rel=1e-5)


def test_vocab_and_search_project_the_written_values(capsys, gemma):
    path, hf, tok = gemma
    W_U = hf.lm_head.weight.double().T
    code, out, err = run(capsys, "vocab", path, "1.5", "2.17", "--json", "--top", "4")
    assert code == 0, err
    for row in json.loads(out)["neurons"]:
        layer, i = map(int, row["id"].split("."))
        logits = written(hf, layer)[i] @ W_U
        assert row["top_ids"] == logits.topk(4).indices.tolist()
        assert row["top_logits"] == pytest.approx(logits.topk(4).values.tolist(), rel=1e-4, abs=1e-5)
        assert row["bottom_ids"] == (-logits).topk(4).indices.tolist()
    # the raw v_i (no post-norm gain) ranks differently for at least one of the layer's neurons
    raw = hf.model.layers[1].mlp.down_proj.weight.T.double() @ W_U
    assert not torch.equal(raw.topk(4).indices, (written(hf, 1) @ W_U).topk(4).indices)
    code, out, err = run(capsys, "search", path, " the", "--json", "--top", "5")
    assert code == 0, err
    res = json.loads(out)
    tid = res["token_id"]
    assert len(res["neurons"]) == 5
    for row in res["neurons"]:
        w = written(hf, row["layer"])[row["neuron"]] * row["sign"]
        assert row["logit"] == pytest.approx(float(w @ W_U[:, tid]), rel=1e-4, abs=1e-5)
        l = w @ W_U
        assert row["rank"] == int((l > l[tid]).sum()) + 1


def test_trace_attributes_the_post_norm_updates(capsys, gemma):
    path, hf, tok = gemma
    code, out, err = run(capsys, "trace", path, PROMPT, "--json", "--neurons", "6")
    assert code == 0, err
    res = json.loads(out)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    logits, rec = forward(hf, ids)
    t = res["target_id"]
    assert t == int(logits[-1].argmax())  # the default target: the model's own prediction
    h, fn = rec["h"][-1], hf.model.norm
    u = (1 + fn.weight.double()) * inv_rms(h, fn.eps) * hf.lm_head.weight[t].double()  # frozen final norm, then W_U
    dla = {}
    for layer in range(len(hf.model.layers)):
        _, upd = updates(hf, rec, layer)
        for i, d in enumerate(upd @ u):
            dla[f"{layer}.{i}"] = float(d)
    best = sorted(dla, key=dla.get, reverse=True)[:6]
    assert [n["id"] for n in res["neurons"]] == best
    for n in res["neurons"]:
        assert n["dla"] == pytest.approx(dla[n["id"]], rel=1e-4, abs=1e-6)
        assert n["coef"] == pytest.approx(float(rec[("m", n["layer"])][-1, n["neuron"]]), rel=1e-4, abs=1e-6)


def test_intervene_zeroes_a_neuron_before_the_post_norm(capsys, gemma):
    path, hf, tok = gemma
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    plain, rec = forward(hf, ids)
    i = int(rec[("m", 1)][-1].abs().argmax())  # the strongest neuron of layer 1 on the last token
    code, out, err = run(capsys, "intervene", path, PROMPT, "--ablate", f"1.{i}", "--json")
    assert code == 0, err
    res = json.loads(out)
    after, _ = forward(hf, ids, zero=(1, i))  # the post-norm renormalises the ablated output: the real effect
    t = res["target_id"]
    assert res["logit_before"] == pytest.approx(float(plain[-1, t]), abs=1e-5)
    assert res["logit_after"] == pytest.approx(float(after[-1, t]), abs=1e-4)
    assert abs(res["logit_after"] - res["logit_before"]) > 1e-3


def test_profile_and_report_of_a_post_norm_model(capsys, gemma, tmp_path):
    path, hf, tok = gemma
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(["the value of x is one", "a longer document about loops and iterators " * 6,
                                   "def f(x): return x"]))
    out, rep = tmp_path / "run", tmp_path / "report"
    code, _, err = run(capsys, "profile", path, "--corpus", corpus, "--seq-len", "16", "--top-k", "4",
                       "--batch-size", "3", "--out", out)
    assert code == 0, err
    code, _, err = run(capsys, "report", out, "--out", rep)
    assert code == 0, err
    assert (rep / "index.html").is_file() and "γ ⊙ v_i behind a post-FFN norm" in (rep / "data" / "meta.js").read_text()
    r = kvmem.open_run(out)
    layout, store = r.layout, r.tokens
    vals = {}  # global token index -> m of neuron 1.5, every counted token, rows run alone (unpadded)
    for row in range(layout.n_rows):
        b = layout.batch(store, [row])
        _, rec = forward(hf, b.ids, b.mask)
        for p in range(b.ids.shape[1]):
            if b.counted[0, p]:
                vals[int(b.index[0, p])] = float(rec[("m", 1)][p, 5])
    got = r.neurons.set_index("id").loc["1.5"]
    assert got["n"] == len(vals)
    best = max(vals.items(), key=lambda kv: (kv[1], -kv[0]))
    assert got["top_index"] == best[0] and got["max"] == pytest.approx(best[1], rel=1e-4, abs=1e-5)
    assert got["mean"] == pytest.approx(np.mean(list(vals.values())), rel=1e-4, abs=1e-6)
    top = (written(hf, 1)[5] @ hf.lm_head.weight.double().T).topk(5).indices.tolist()
    assert got["value_top_tokens"].tolist() == [tok.decode([t]) for t in top]
