"""The commands on a tiny random Qwen2-MoE (routed plus a shared expert in every layer), saved as a HF folder
and loaded by path: the ids they print are expert ids (L.eE.N / L.sS.N) and their numbers equal a brute force
over the HF expert weights (tests/moe_helpers.py), not kvmem's own MoE code."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvmem.neurons import NeuronId
from tests.moe_helpers import MOE_CONFIGS, brute_block, brute_expert, brute_route, brute_shared
from tests.cli.test_core_cli import run

PROMPT = "The value of x is"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tiny_tokenizer):
    config = MOE_CONFIGS["qwen2_moe"]()
    config.mlp_only_layers = []
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.3) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("moe") / "qwen2_moe"
    hf.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, hf, tiny_tokenizer


def _block_inputs(hf, ids, replace=None):
    """(logits [pos, d_vocab], layer -> block input [pos, d_model]); ``replace``: layer -> fn(x [pos, d]) giving
    that block's output instead of its own (the brute-force intervention)."""
    xs, handles = {}, []
    for i, blk in enumerate(hf.model.layers):
        def hook(mod, args, out, i=i):
            xs[i] = args[0][0].detach().clone()
            if replace and i in replace:
                return replace[i](args[0][0]).unsqueeze(0).to(out.dtype)
        handles.append(blk.mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, xs


def _brute_c(hf, layer, x):
    """The flat c = w·m of one token (float64) by the brute force: routed experts, then the shared expert."""
    blk = hf.model.layers[layer].mlp
    E, d = blk.experts.gate_up_proj.shape[0], blk.experts.gate_up_proj.shape[1] // 2
    c = torch.zeros(E * d, dtype=torch.float64)
    for e, w in zip(*brute_route("qwen2_moe", blk, x)):
        c[e * d:(e + 1) * d] = w * brute_expert("qwen2_moe", blk, e, x)
    m, w, _ = brute_shared("qwen2_moe", blk, x)
    return torch.cat([c, w * m])


def _value(hf, nid: NeuronId):
    blk = hf.model.layers[nid.layer].mlp
    if nid.shared:
        return blk.shared_expert.down_proj.weight[:, nid.neuron].double()
    return blk.experts.down_proj[nid.expert][:, nid.neuron].double()


def test_query_prints_expert_ids_with_brute_force_contributions(capsys, moe_dir):
    path, hf, tok = moe_dir
    code, out, err = run(capsys, "query", path, PROMPT, "--json", "--top", "6")
    assert code == 0, err
    res = json.loads(out)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    _, xs = _block_inputs(hf, ids)
    contrib = []
    for layer in range(3):
        c = _brute_c(hf, layer, xs[layer][-1])
        d_routed = 4 * 16
        for flat in range(c.numel()):
            nid = (NeuronId(layer, flat % 16, flat // 16) if flat < d_routed
                   else NeuronId(layer, flat - d_routed, 0, True))
            contrib.append((float(c[flat].abs() * _value(hf, nid).norm()), str(nid), float(c[flat])))
    contrib.sort(reverse=True)
    assert [n["id"] for n in res["neurons"]] == [name for _, name, _ in contrib[:6]]
    for n, (want, _, act) in zip(res["neurons"], contrib):
        assert n["contribution"] == pytest.approx(want, rel=1e-4) and n["activation"] == pytest.approx(act, rel=1e-4)
    assert any(".e" in n["id"] for n in res["neurons"]) or any(".s" in n["id"] for n in res["neurons"])


def test_vocab_and_search_project_expert_values(capsys, moe_dir):
    path, hf, tok = moe_dir
    code, out, err = run(capsys, "vocab", path, "1.e2.3", "2.s0.7", "--json", "--top", "4")
    assert code == 0, err
    res = json.loads(out)
    W_U = hf.lm_head.weight.double().T
    for row in res["neurons"]:
        logits = _value(hf, NeuronId.parse(row["id"])) @ W_U
        assert row["top_ids"] == logits.topk(4).indices.tolist()
        assert row["top_logits"] == pytest.approx(logits.topk(4).values.tolist(), rel=1e-4, abs=1e-5)
    assert [r["id"] for r in res["neurons"]] == ["1.e2.3", "2.s0.7"]
    code, out, err = run(capsys, "search", path, " the", "--json", "--top", "5")
    assert code == 0, err
    res = json.loads(out)
    tid = res["token_id"]
    for row in res["neurons"]:
        nid = NeuronId.parse(row["id"])
        assert not nid.dense
        assert row["logit"] == pytest.approx(float(row["sign"] * _value(hf, nid) @ W_U[:, tid]), rel=1e-4, abs=1e-5)


def test_trace_neuron_coefficients_equal_the_brute_force(capsys, moe_dir):
    path, hf, tok = moe_dir
    code, out, err = run(capsys, "trace", path, PROMPT, "--json", "--neurons", "5")
    assert code == 0, err
    res = json.loads(out)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    _, xs = _block_inputs(hf, ids)
    for row in res["neurons"]:
        nid = NeuronId.parse(row["id"])
        assert not nid.dense and nid.layer == row["layer"]
        c = _brute_c(hf, nid.layer, xs[nid.layer][-1])
        assert row["coef"] == pytest.approx(float(c[row["neuron"]]), rel=1e-4, abs=1e-6)
    assert all(not NeuronId.parse(n).dense for layer in res["layers"] for n in layer["neurons"])


def test_intervene_ablates_experts_and_expert_neurons_like_the_brute_force(capsys, moe_dir):
    path, hf, tok = moe_dir
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    blk1 = hf.model.layers[1].mlp
    plain, xs = _block_inputs(hf, ids)
    e = brute_route("qwen2_moe", blk1, xs[1][-1])[0][0]  # the last token's top expert at layer 1
    code, out, err = run(capsys, "intervene", path, PROMPT, "--ablate", f"1.e{e}", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["ablated"] == [f"1.e{e}"]
    rerouted = {1: lambda x: torch.stack([brute_block("qwen2_moe", blk1, t, mask=e) for t in x])}
    after, _ = _block_inputs(hf, ids, rerouted)
    t = res["target_id"]
    assert res["logit_after"] == pytest.approx(float(after[-1, t]), abs=2e-4)
    assert res["logit_before"] == pytest.approx(float(plain[-1, t]), abs=1e-5)
    assert abs(res["logit_after"] - res["logit_before"]) > 1e-3  # the ablation did something
    # one expert neuron zeroed at every position: the block's output loses w·m·v on each routed token
    top = brute_route("qwen2_moe", blk1, xs[1][-1])[0]
    nid = NeuronId(1, 5, top[1])
    code, out, err = run(capsys, "intervene", path, PROMPT, "--ablate", str(nid), "--json")
    assert code == 0, err
    res = json.loads(out)
    v = _value(hf, nid)

    def minus_term(x):
        rows = []
        for tok_x in x:
            y = brute_block("qwen2_moe", blk1, tok_x)
            chosen, w = brute_route("qwen2_moe", blk1, tok_x)
            if nid.expert in chosen:
                y = y - w[chosen.index(nid.expert)] * brute_expert("qwen2_moe", blk1, nid.expert, tok_x)[5] * v
            rows.append(y)
        return torch.stack(rows)
    after, _ = _block_inputs(hf, ids, {1: minus_term})
    assert res["ablated"] == [str(nid)]
    assert res["logit_after"] == pytest.approx(float(after[-1, res["target_id"]]), abs=2e-4)


def test_info_and_models_show_the_moe_layout(capsys, moe_dir):
    path, _, _ = moe_dir
    code, out, err = run(capsys, "info", path, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["moe"] == {"n_experts": 4, "top_k": 2, "d_expert": 16, "n_shared": 1, "d_shared": 24,
                          "d_mlp": 88, "dense_layers": []}
    assert res["d_mlp"] == 4 * 16 + 24


@pytest.mark.parametrize("argv, needle", [
    (["intervene", "{p}", PROMPT, "--ablate", "1.e9"], "expert 9 out of range"),
    (["intervene", "{p}", PROMPT, "--ablate", "1.5"], "layer 1 is a mixture of experts"),
    (["vocab", "{p}", "1.e0.16"], "index 16 out of range"),
    (["vocab", "{p}", "1.s1.0"], "shared expert 1 out of range"),
])
def test_bad_expert_ids_give_one_line_and_exit_2(capsys, moe_dir, argv, needle):
    path, _, _ = moe_dir
    code, out, err = run(capsys, *[a.replace("{p}", str(path)) for a in argv])
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
