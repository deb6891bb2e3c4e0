"""End to end on tiny random MoE models (saved to a folder, loaded by path like any model): ``kvmem profile`` +
``kvmem report`` from the CLI, and the numbers checked against an independent computation over the Hugging
Face modules themselves (the router's own weight, the experts' own 3-D weights and the shared expert's MLP,
one row at a time, unpadded): the load of every expert, one routed expert neuron's count, top example, max and
mean over its expert's tokens, and one shared-expert neuron's (Qwen2-MoE) over every token."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

import kvmem
from tests.cli.test_core_cli import run as cli
from tests.conftest import VOCAB

N_EXPERTS, TOP_K, D_EXPERT, D_SHARED, D_DENSE = 4, 2, 12, 8, 20
COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              max_position_embeddings=128)
CONFIGS = {  # family -> (config, MoE layers)
    "mixtral": (lambda: MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=D_EXPERT,
                                      num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K), [0, 1]),
    "qwen2_moe": (lambda: Qwen2MoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=20,
                                         moe_intermediate_size=D_EXPERT, num_experts=N_EXPERTS,
                                         num_experts_per_tok=TOP_K, shared_expert_intermediate_size=D_SHARED,
                                         norm_topk_prob=False), [0, 1]),
    # a dense layer 0 of width 20 before an MoE layer of flat width 4*12+8 (like DeepSeek-V3's leading dense
    # layers): the run's tables, the value projection and the report take layers of different widths
    "qwen2_moe_mixed": (lambda: Qwen2MoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=D_DENSE,
                                               moe_intermediate_size=D_EXPERT, num_experts=N_EXPERTS,
                                               num_experts_per_tok=TOP_K, shared_expert_intermediate_size=D_SHARED,
                                               norm_topk_prob=False, mlp_only_layers=[0]), [1]),
}


def save_tiny(family: str, path):
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(CONFIGS[family][0]())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(path)


def brute_force(path, run, moe_layers):
    """Per MoE layer: load [E] over the run's counted tokens, and raw m {(expert, neuron): {global index: m}}
    of the routed experts' neurons on their counted tokens ("s" for the shared expert's, on every counted token),
    from the HF modules (rows run alone, unpadded)."""
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    layout, store = run.layout, run.tokens
    load = {layer: np.zeros(N_EXPERTS, np.int64) for layer in moe_layers}
    m = {layer: {} for layer in range(len(hf.model.layers))}
    dense = [layer for layer in range(len(hf.model.layers)) if layer not in moe_layers]
    silu = torch.nn.functional.silu
    for row in range(layout.n_rows):
        b = layout.batch(store, [row])
        xs = {}
        hooks = [hf.model.layers[layer].mlp.register_forward_pre_hook(
            lambda mod, a, layer=layer: xs.__setitem__(layer, a[0].detach())) for layer in m]
        try:
            with torch.no_grad():
                hf(input_ids=b.ids, attention_mask=b.mask)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for layer in dense:  # a dense SwiGLU layer: m = silu(x W_gate) * x W_up on every counted token
                mlp, x = hf.model.layers[layer].mlp, xs[layer][0]
                act = silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # [L, d_mlp]
                for p in range(x.shape[0]):
                    if b.counted[0, p]:
                        for i in range(act.shape[1]):
                            m[layer].setdefault(i, {})[int(b.index[0, p])] = float(act[p, i])
            for layer in moe_layers:
                block = hf.model.layers[layer].mlp
                x = xs[layer][0]  # [L, d_model]
                idx = torch.topk(torch.softmax(x @ block.gate.weight.T, -1), TOP_K, -1).indices  # [L, k]
                for p in range(x.shape[0]):
                    if not b.counted[0, p]:
                        continue
                    t = int(b.index[0, p])
                    for e in idx[p].tolist():
                        load[layer][e] += 1
                        gate, up = (block.experts.gate_up_proj[e] @ x[p]).chunk(2)
                        act = silu(gate) * up  # the expert's own activation [d_expert]
                        for i in range(D_EXPERT):
                            m[layer].setdefault((e, i), {})[t] = float(act[i])
                    if hasattr(block, "shared_expert"):
                        sh = block.shared_expert
                        act = silu(sh.gate_proj.weight @ x[p]) * (sh.up_proj.weight @ x[p])
                        for i in range(D_SHARED):
                            m[layer].setdefault(("s", i), {})[t] = float(act[i])
    return load, m


def check_neuron(row, vals: dict):
    assert row["n"] == len(vals)
    assert row["count_pos"] == sum(v > 0 for v in vals.values())
    best = max(vals.items(), key=lambda kv: (kv[1], -kv[0]))
    assert row["top_index"] == best[0]
    assert row["max"] == pytest.approx(best[1], rel=1e-4, abs=1e-5)
    assert row["mean"] == pytest.approx(np.mean(list(vals.values())), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_profile_and_report_of_a_tiny_moe_model(family, tmp_path, tiny_tokenizer, corpus, capsys):
    path, out, rep = tmp_path / family, tmp_path / "run", tmp_path / "report"
    save_tiny(family, path)
    tiny_tokenizer.save_pretrained(path)
    moe_layers = CONFIGS[family][1]
    code, _, err = cli(capsys, "profile", str(path), "--corpus", str(corpus), "--seq-len", "16", "--top-k", "4",
                       "--batch-size", "4", "--out", str(out))
    assert code == 0, err
    code, _, err = cli(capsys, "report", str(out), "--out", str(rep))
    assert code == 0, err
    run = kvmem.open_run(out)
    assert run.moe and run.moe_layers == moe_layers
    load, m = brute_force(path, run, moe_layers)
    n_counted = int(run.layers.set_index("layer").loc[0, "n_tokens"])
    neurons = run.neurons.set_index("id")
    for layer in moe_layers:
        got = run.routing[run.routing["layer"] == layer].sort_values("expert")
        assert got["load"].tolist() == load[layer].tolist()
        assert int(load[layer].sum()) == TOP_K * n_counted
    layer = moe_layers[-1]
    e = int(np.argmax(load[layer]))  # one neuron of the busiest expert: count, top example, max, mean
    check_neuron(neurons.loc[f"{layer}.e{e}.3"], m[layer][(e, 3)])
    assert neurons.loc[f"{layer}.e{e}.3", "n"] == load[layer][e]
    if family == "qwen2_moe_mixed":  # the dense layer 0 beside it: its own width, neurons over every token
        widths = run.neurons.groupby("layer").size()
        assert widths.tolist() == [D_DENSE, N_EXPERTS * D_EXPERT + D_SHARED]
        check_neuron(neurons.loc["0.7"], m[0][7])
        assert neurons.loc["0.7", "n"] == n_counted
        hf = AutoModelForCausalLM.from_pretrained(path)
        for nid, v in (("0.7", hf.model.layers[0].mlp.down_proj.weight[:, 7]),
                       (f"1.e{e}.3", hf.model.layers[1].mlp.experts.down_proj[e][:, 3])):
            top = (v.double() @ hf.lm_head.weight.double().T).topk(5).indices.tolist()  # the brute-force value tokens
            assert neurons.loc[nid, "value_top_tokens"].tolist() == [tiny_tokenizer.decode([t]) for t in top]
        assert 'href="routing-0.html"' not in (rep / "index.html").read_text(encoding="utf-8")
    if family.startswith("qwen2_moe"):  # the shared expert: every token
        check_neuron(neurons.loc[f"{layer}.s0.5"], m[layer][("s", 5)])
        assert neurons.loc[f"{layer}.s0.5", "n"] == n_counted
        assert neurons.loc[f"{layer}.s0.5", "shared"] and run.manifest["moe"]["n_shared"] == 1
    # the report: a routing page per MoE layer with the loads, linked from the overview
    index = (rep / "index.html").read_text(encoding="utf-8")
    for layer in moe_layers:
        assert f'href="routing-{layer}.html"' in index
        page = (rep / f"routing-{layer}.html").read_text(encoding="utf-8")
        cells = re.findall(r'<tr class="expert" data-expert="(\d+)"><td>e\d+</td><td class="num">([\d,]+)</td>', page)
        assert [int(c.replace(",", "")) for _, c in cells] == load[layer].tolist()


def test_moe_profile_hooks_make_no_host_sync(tmp_path, tiny_tokenizer, corpus, monkeypatch):
    """The sync-free statistics path with the routing rule and every MoE statistic under the host-sync guard
    (kvmem.stats.syncguard): the same statistics as the checked CPU path."""
    from kvmem.profile import runner
    from kvmem.stats.syncguard import no_host_sync
    from tests.profile.test_sync_free_profile import same_stats

    path = tmp_path / "qwen2_moe"
    save_tiny("qwen2_moe", path)
    tiny_tokenizer.save_pretrained(path)
    model = kvmem.load(str(path))
    cfg = kvmem.ProfileConfig(corpus=str(corpus), seq_len=16, batch_size=3, top_k=5, checkpoint_every=1e9)
    ref = kvmem.profile(cfg, tmp_path / "ref", model=model)
    calls = []

    def guard():
        calls.append(1)
        return no_host_sync()

    monkeypatch.setattr(runner, "SYNC_FREE", True)
    monkeypatch.setattr(runner, "HOOK_GUARD", guard)
    run = kvmem.profile(cfg, tmp_path / "run", model=model)
    assert len(calls) >= 2 * model.n_layers and run.moe
    same_stats(run.stats, ref.stats)
