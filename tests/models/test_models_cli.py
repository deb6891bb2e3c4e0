"""``kvmem models``: every registered family with its activation, gating, norm placement and MoE layout."""

import json

from kvmem.cli import main
from kvmem.models.registry import adapters


def test_models_lists_every_family_with_its_layout(capsys):
    assert main(["models", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["model_type"]: r for r in res["families"]}
    assert set(rows) == set(adapters()) == set(res["model_types"])
    want = {"gemma2": "post-ffn", "gemma3_text": "post-ffn", "olmo2": "post-ffn", "gptj": "parallel",
            "cohere": "parallel", "llama": "pre", "qwen3": "pre", "granite": "pre"}
    for mt, placement in want.items():
        assert rows[mt]["norm_placement"] == placement
    assert "post-residual" in rows["opt"]["norm_placement"]
    assert rows["phi3"]["gating"] == "gated (fused gate_up)" and rows["gptj"]["gating"] == "none"
    assert rows["qwen3"]["activation"] == ["silu"] and "gelu_pytorch_tanh" in rows["gemma2"]["activation"]
    moe = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"}
    assert all((r["moe"].startswith("experts") if mt in moe else r["moe"] == "dense") for mt, r in rows.items())
    assert all(r["activation"] for r in rows.values())
    assert "shared" in rows["qwen2_moe"]["moe"] and "group-limited" in rows["deepseek_v3"]["moe"]
    assert "experts" in res["refused"]["granitemoe"] and not set(res["refused"]) & set(rows)
    assert main(["models"]) == 0
    assert "olmo2" in capsys.readouterr().out
