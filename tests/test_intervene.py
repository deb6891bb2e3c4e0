"""``intervene``: hooks against edited copies of the HF model, exact no-op, and clean removal."""

import copy

import pytest
import torch
from torch import nn

from kvmem.errors import KvmemError
from kvmem.intervene import intervene, intervention, parse_scale
from tests.conftest import FAMILIES
from tests.test_trace import hook_snapshot
from tests.test_vocab import raw_value

PROMPT = "Return the value of the named attribute"


def edited_copy(model, family, factors: dict, linear=()):
    """A deep copy of the HF model with value vectors scaled in its own storage (m_i·(s·v_i) = (s·m_i)·v_i)
    and, for ``linear`` layers, the activation module replaced by the identity."""
    hf = copy.deepcopy(model.hf)
    with torch.no_grad():
        for (layer, neuron), s in factors.items():
            raw_value(hf, family, layer, neuron).mul_(s)  # a view into the parameter
    for layer in linear:
        if family == "gpt2":
            hf.transformer.h[layer].mlp.act = nn.Identity()
        elif family == "gpt_neox":
            hf.gpt_neox.layers[layer].mlp.act = nn.Identity()
        elif family == "opt":
            hf.model.decoder.layers[layer].activation_fn = nn.Identity()
        else:
            hf.model.layers[layer].mlp.act_fn = nn.Identity()
    return hf


def plain_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_no_op_is_exact_and_hooks_are_removed(tiny_models, family):
    model = tiny_models[family]
    ids = model.encode(PROMPT)
    original = plain_logits(model.hf, ids)
    hooks = hook_snapshot(model.hf)
    res = intervene(model, PROMPT)
    assert torch.equal(res.logits_before, original[-1]) and torch.equal(res.logits_after, original[-1])
    # hooks installed, but every factor is 1: the logits are bit-identical
    res = intervene(model, PROMPT, scale={(0, 3): 1.0, (2, 7): 1.0})
    assert torch.equal(res.logits_after, original[-1])
    assert res.prob_after == res.prob_before and res.kl == 0.0
    # a real intervention, then the hooks are gone: a later plain forward gives the original logits
    changed = intervene(model, PROMPT, ablate=["0.1", "1.2"], scale=["2.3=4"], linearize=[1])
    assert not torch.equal(changed.logits_after, original[-1])
    assert hook_snapshot(model.hf) == hooks
    assert torch.equal(plain_logits(model.hf, ids), original)


def test_hooks_removed_on_error(tiny_models):
    model = tiny_models["opt"]
    hooks = hook_snapshot(model.hf)
    with pytest.raises(RuntimeError, match="boom"):
        with intervention(model, ablate=[(0, 1)], linearize=[2]):
            assert hook_snapshot(model.hf) != hooks
            raise RuntimeError("boom")
    assert hook_snapshot(model.hf) == hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_ablate_and_scale_match_edited_weights(tiny_models, family):
    model = tiny_models[family]
    ablate, scale = [(0, 5), (2, 11)], {(1, 7): 3.0, (2, 40): -0.5}
    res = intervene(model, PROMPT, ablate=[f"{a}.{b}" for a, b in ablate],
                    scale=[f"{a}.{b}={s}" for (a, b), s in scale.items()])
    hf = edited_copy(model, family, {**{p: 0.0 for p in ablate}, **scale})
    expected = plain_logits(hf, model.encode(PROMPT))[-1]
    torch.testing.assert_close(res.logits_after, expected, atol=1e-4, rtol=1e-4)
    assert res.ablated == ["0.5", "2.11"] and res.scaled == {"1.7": 3.0, "2.40": -0.5}
    p = expected.softmax(-1)
    assert res.prob_after == pytest.approx(p[res.target_id].item(), abs=1e-5)
    assert res.rank_after == int((expected > expected[res.target_id]).sum()) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_linearize_matches_identity_activation(tiny_models, family):
    model = tiny_models[family]
    res = intervene(model, PROMPT, linearize=[0, 2], ablate=["1.4"])
    hf = edited_copy(model, family, {(1, 4): 0.0}, linear=[0, 2])
    expected = plain_logits(hf, model.encode(PROMPT))[-1]
    torch.testing.assert_close(res.logits_after, expected, atol=1e-4, rtol=1e-4)
    assert res.linearized == [0, 2]


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT flattens [batch·pos] before fc2
def test_only_position(tiny_models, family):
    model = tiny_models[family]
    ids = model.encode(PROMPT)
    pos = ids.shape[1] - 1
    original = plain_logits(model.hf, ids)
    with intervention(model, ablate=[(a, b) for a in range(3) for b in range(0, 48, 2)], positions=[pos]):
        changed = plain_logits(model.hf, ids)
    assert torch.equal(changed[:pos], original[:pos])  # causal: earlier positions untouched
    assert not torch.allclose(changed[pos], original[pos])
    hf = edited_copy(model, family, {(a, b): 0.0 for a in range(3) for b in range(0, 48, 2)})
    every = plain_logits(hf, ids)
    assert not torch.allclose(changed[pos], every[pos], atol=1e-4)  # not the same as ablating everywhere
    res = intervene(model, PROMPT, ablate=["0.0"], only_position=True)
    assert res.positions == [pos]


@pytest.mark.parametrize("text", ["20.99", "x.y=2", "1.2=abc", "1.2=", "1.2=nan", "1.2=inf"])
def test_parse_scale_errors(text):
    with pytest.raises(KvmemError):
        parse_scale(text, 30, 1536)


def test_parse_scale_and_bad_neurons(tiny_models):
    assert parse_scale("20.99=3.0") == ((20, 99), 3.0)
    assert parse_scale(" 1.2 = -0.5") == ((1, 2), -0.5)
    model = tiny_models["gpt2"]
    for kwargs in ({"ablate": ["3.0"]}, {"ablate": ["0.48"]}, {"ablate": ["1-2"]}, {"scale": ["0.1=x"]},
                   {"linearize": [5]}, {"position": 50}, {"target": ""}):
        with pytest.raises(KvmemError):
            intervene(model, PROMPT, **kwargs)


def set_copy(model, family, values: dict, hf=None):
    """A deep copy of the HF model (or of ``hf``) where m_N := c holds by construction: v_N's column of W_out is removed and
    c·v_N added to b_out (created where the family has none), in the HF module's own storage."""
    hf = copy.deepcopy(model.hf if hf is None else hf)
    with torch.no_grad():
        for (layer, neuron), c in values.items():
            v = raw_value(hf, family, layer, neuron)  # a view into the parameter
            out = {"gpt2": lambda: hf.transformer.h[layer].mlp.c_proj,
                   "gpt_neox": lambda: hf.gpt_neox.layers[layer].mlp.dense_4h_to_h,
                   "opt": lambda: hf.model.decoder.layers[layer].fc2}.get(
                       family, lambda: hf.model.layers[layer].mlp.down_proj)()
            if out.bias is None:
                out.bias = nn.Parameter(torch.zeros(v.shape[0], dtype=v.dtype))
            out.bias += c * v
            v.zero_()
    return hf


@pytest.mark.parametrize("family", FAMILIES)
def test_set_matches_a_weight_edit(tiny_models, family):
    model = tiny_models[family]
    values = {(0, 5): 3.0, (2, 11): -2.0}
    res = intervene(model, PROMPT, set_coef=[f"{a}.{b}={c}" for (a, b), c in values.items()])
    expected = plain_logits(set_copy(model, family, values), model.encode(PROMPT))[-1]
    assert not torch.allclose(res.logits_after, res.logits_before, atol=1e-3)
    torch.testing.assert_close(res.logits_after, expected, atol=1e-4, rtol=1e-4)
    assert res.set_coef == {"0.5": 3.0, "2.11": -2.0}
    assert res.to_dict()["set_coef"] == res.set_coef
    # the same through a dict, beside an ablation of another neuron
    res2 = intervene(model, PROMPT, set_coef=values, ablate=["1.1"])
    hf = edited_copy(model, family, {(1, 1): 0.0})
    hf = set_copy(model, family, values, hf=hf)
    torch.testing.assert_close(res2.logits_after, plain_logits(hf, model.encode(PROMPT))[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_set_at_one_position_adds_c_minus_m_times_v(tiny_models, family):
    """m_N := c at the last layer and last position changes the FFN output by (c − m_N)·v_N there: the logits
    computed by hand from the captured m and block output equal the intervened model's."""
    from kvmem.capture import run_capture

    model = tiny_models[family]
    ids = model.encode(PROMPT)
    L, N, c = model.n_layers - 1, 9, 4.0
    cap = run_capture(model, ids, layers=[L], what=("coef",), stop=False)
    m = cap.coef[L][0, -1, N]
    got = {}
    from kvmem.hooks import hooks, record
    with torch.no_grad(), hooks(model, record([("resid.post", L)], got)):
        model.hf(input_ids=ids, use_cache=False)
    resid = got[("resid.post", L)][0, -1] + (c - m) * raw_value(model.hf, family, L, N)
    head = model.hf.get_output_embeddings()
    with torch.no_grad():
        expected = head(model.final_norm(resid)).float()
    res = intervene(model, PROMPT, set_coef=[f"{L}.{N}={c}"], only_position=True)
    torch.testing.assert_close(res.logits_after, expected, atol=1e-4, rtol=1e-4)
    assert res.positions == [ids.shape[1] - 1]


def test_set_errors(tiny_models):
    from kvmem.intervene import parse_set

    assert parse_set("2.40=-1.5") == ((2, 40), -1.5)
    model = tiny_models["gpt2"]
    for kwargs in ({"set_coef": ["0.1"]}, {"set_coef": ["0.1=x"]}, {"set_coef": ["0.1=inf"]},
                   {"set_coef": ["0.48=1"]}, {"set_coef": ["0.1=1"], "ablate": ["0.1"]},
                   {"set_coef": {(0, 1): 1.0}, "scale": {(0, 1): 2.0}}):
        with pytest.raises(KvmemError):
            intervene(model, PROMPT, **kwargs)


def test_cli_set(capsys, tiny_dirs):
    import json

    from tests.cli.test_core_cli import assert_one_line_error, run

    path = str(tiny_dirs["llama"])
    code, out, err = run(capsys, "intervene", path, PROMPT, "--set", "1.4=2.5,2.3=-1", "--json")
    assert code == 0, err
    assert json.loads(out)["set_coef"] == {"1.4": 2.5, "2.3": -1.0}
    code, out, err = run(capsys, "intervene", path, PROMPT, "--set", "1.4=2.5")
    assert code == 0 and "set 1.4=2.5" in out
    for bad in (["--set", "1.4"], ["--set", "1.4=x"], ["--set", "1.4=1", "--ablate", "1.4"]):
        code, out, err = run(capsys, "intervene", path, PROMPT, *bad)
        assert_one_line_error(code, err)
    assert "--set" in err
