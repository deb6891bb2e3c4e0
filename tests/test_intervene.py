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
