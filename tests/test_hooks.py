"""The hook layer against independent computations: every point on every tiny family, edits against weight
edits of a copy of the HF model, clean removal, early stop, read-only hooks leave the logits unchanged."""

import copy

import pytest
import torch
from torch import nn

from kvmem.errors import KvmemError
from kvmem.hooks import (POINTS, hooks, linearize, merge, record, scale_coefs, set_coefs, sites, skip_blocks,
                         zero_coefs, zero_ffn)
from kvmem.models.kvmodel import from_hf
from tests.conftest import FAMILIES

PROMPTS = ("Return the value of the named attribute of object.", "The built-in functions and types are listed.")


def batch(model):
    """Two prompts of equal length: [2, pos] (batch > 1 so a flattened [batch·pos] shape would show)."""
    a, b = (model.encode(p) for p in PROMPTS)
    n = min(a.shape[1], b.shape[1])
    return torch.cat([a[:, :n], b[:, :n]])


def all_points(model):
    return [(name, layer) for layer in range(model.n_layers) for name in POINTS
            if name != "ffn.gate" or model.gated]


def hook_count(model):
    mods = list(model.hf.modules())
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def ffn_norm(model, layer):
    """The block's pre-FFN norm module, and whether the FFN reads the block input (parallel residual)."""
    block = model.adapter.blocks()[layer]
    fam = model.hf.config.model_type
    if fam == "gpt2":
        return block.ln_2, False
    if fam == "opt":
        return block.final_layer_norm, False
    if fam == "gpt_neox":
        return block.post_attention_layernorm, model.hf.config.use_parallel_residual
    return block.post_attention_layernorm, False


@pytest.mark.parametrize("family", FAMILIES)
def test_every_point_against_an_independent_computation(tiny_models, family):
    model = tiny_models[family]
    ids = batch(model)
    got = {}
    with torch.no_grad(), hooks(model, record(all_points(model), got)):
        out = model.hf(input_ids=ids, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states
    b, p = ids.shape
    for layer in range(model.n_layers):
        lay = model.layers[layer]
        x = got[("ffn.x", layer)]
        for name in POINTS:
            if (name, layer) in got:
                assert got[(name, layer)].shape[:2] == (b, p), (name, layer)
        # the FFN from the adapter's weights applied to the captured input
        torch.testing.assert_close(got[("ffn.pre", layer)], x @ lay.W_in + (0 if lay.b_in is None else lay.b_in))
        if model.gated:
            torch.testing.assert_close(got[("ffn.gate", layer)], x @ lay.W_gate + (0 if lay.b_gate is None else lay.b_gate))
        torch.testing.assert_close(got[("ffn.coef", layer)], lay.coefficients(x))
        torch.testing.assert_close(got[("ffn.out", layer)], lay.output(got[("ffn.coef", layer)]))
        # the residual stream from HF's own hidden states
        torch.testing.assert_close(got[("resid.pre", layer)], hidden[layer])
        if layer < model.n_layers - 1:  # HF's last hidden state has the final norm applied
            torch.testing.assert_close(got[("resid.post", layer)], hidden[layer + 1])
        else:
            torch.testing.assert_close(model.final_norm(got[("resid.post", layer)]), hidden[-1])
        # ffn.x is the pre-FFN norm of the stream the FFN's update is added to (of the block input if parallel)
        norm, parallel = ffn_norm(model, layer)
        stream = got[("resid.pre", layer)] if parallel else got[("resid.post", layer)] - got[("ffn.out", layer)]
        torch.testing.assert_close(x, norm(stream), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_read_only_hooks_leave_the_logits_unchanged(tiny_models, family):
    model = tiny_models[family]
    ids = batch(model)
    with torch.no_grad():
        plain = model.hf(input_ids=ids, use_cache=False).logits
        with hooks(model, merge(record(all_points(model), {}), {p: [lambda t: None] for p in all_points(model)})):
            hooked = model.hf(input_ids=ids, use_cache=False).logits
    assert torch.equal(plain, hooked)


def weight_edited(model, edit):
    """A KVModel wrapping a deep copy of the HF model, ``edit(copy_kvmodel)`` applied to its weights."""
    hf = copy.deepcopy(model.hf)
    kv = from_hf(hf, model.tokenizer)
    with torch.no_grad():
        edit(kv)
    return kv


def set_bias(lay, delta):
    """b_out += delta (creating b_out on bias-free out modules)."""
    mod = lay.out_module
    if getattr(mod, "bias", None) is None:
        mod.bias = nn.Parameter(torch.zeros(delta.shape[0], dtype=delta.dtype))
    mod.bias += delta


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_change_the_logits_as_a_weight_edit_would(tiny_models, family):
    model = tiny_models[family]
    ids = batch(model)
    L, N, c, s = model.n_layers - 2, 7, 2.5, -1.5

    def logits(kv, fns=None):
        with torch.no_grad(), hooks(kv, fns or {}):
            return kv.hf(input_ids=ids, use_cache=False).logits

    def set_edit(kv):  # m_N := c  <=>  row N of W_out removed and c·v_N added to b_out
        lay = kv.layers[L]
        v = lay.W_out[N].clone()
        lay.W_out[N] = 0
        set_bias(lay, c * v)

    def scale_edit(kv):
        kv.layers[L].W_out[N] *= s
        kv.layers[L].W_out[N + 1] *= 0

    def zero_edit(kv):
        kv.layers[L].W_out.zero_()
        if kv.layers[L].b_out is not None:
            kv.layers[L].b_out.zero_()

    factor = torch.ones(model.d_mlp)
    factor[N] = s
    cases = [
        (set_edit, set_coefs(L, {N: c})),
        (scale_edit, merge(scale_coefs(L, factor), zero_coefs(L, [N + 1]))),
        (zero_edit, zero_ffn(L)),
    ]
    base = logits(model)
    for edit, fns in cases:
        expected = logits(weight_edited(model, edit))
        got = logits(model, fns)
        assert not torch.allclose(got, base)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_linearize_equals_the_identity_activation(tiny_models, family):
    model = tiny_models[family]
    ids = batch(model)
    L = 1
    hf = copy.deepcopy(model.hf)
    block = from_hf(hf, model.tokenizer).adapter.blocks()[L]
    if family == "opt":
        block.activation_fn = nn.Identity()
    elif family in ("gpt2", "gpt_neox"):
        block.mlp.act = nn.Identity()
    else:
        block.mlp.act_fn = nn.Identity()
    with torch.no_grad():
        expected = hf(input_ids=ids, use_cache=False).logits
        with hooks(model, linearize(model, L)):
            got = model.hf(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_set_coefs_at_positions_only(tiny_models):
    model = tiny_models["llama"]
    ids = batch(model)
    seen = {}
    with torch.no_grad(), hooks(model, merge(set_coefs(1, {3: 9.0}, positions=[2]), record([("ffn.coef", 1)], seen))):
        model.hf(input_ids=ids, use_cache=False)
    with torch.no_grad(), hooks(model, record([("ffn.coef", 1)], plain := {})):
        model.hf(input_ids=ids, use_cache=False)
    m, m0 = seen[("ffn.coef", 1)], plain[("ffn.coef", 1)]
    assert (m[:, 2, 3] == 9.0).all()
    keep = torch.ones_like(m, dtype=torch.bool)
    keep[:, 2, 3] = False
    assert torch.equal(m[keep], m0[keep])


@pytest.mark.parametrize("family", FAMILIES)
def test_early_stop_runs_no_later_block(tiny_models, family):
    model = tiny_models[family]
    ids = batch(model)
    ran = []
    blocks = model.adapter.blocks()
    probes = [blk.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, blk in enumerate(blocks)]
    probes.append(model.hf.get_output_embeddings().register_forward_pre_hook(lambda m, a: ran.append("head")))
    try:
        for name in ("resid.pre", "ffn.x", "ffn.coef", "resid.post"):
            ran.clear()
            with torch.no_grad(), hooks(model, {(name, 1): None}, stop_after=True) as run:
                model.hf(input_ids=ids, use_cache=False)
            assert run.stopped and ran == [0, 1], name
        ran.clear()
        with torch.no_grad(), hooks(model, {("ffn.coef", 2): None}, stop_after=("ffn.x", 0)) as run:
            model.hf(input_ids=ids, use_cache=False)
        assert run.stopped and ran == [0]
        ran.clear()
        with torch.no_grad(), hooks(model, {("ffn.coef", 0): None}) as run:
            model.hf(input_ids=ids, use_cache=False)
        assert not run.stopped and ran == [0, 1, 2, "head"]
    finally:
        for h in probes:
            h.remove()


def test_hooks_removed_on_exit_and_on_error(tiny_models):
    model = tiny_models["opt"]
    ids = batch(model)
    before = hook_count(model)
    fns = {p: None for p in all_points(model)}
    with hooks(model, fns):
        assert hook_count(model) > before
    assert hook_count(model) == before
    with pytest.raises(ValueError):
        with hooks(model, fns):
            raise ValueError("boom")
    assert hook_count(model) == before

    def bad(t):
        raise RuntimeError("inside the forward pass")

    with pytest.raises(RuntimeError, match="inside the forward pass"):
        with torch.no_grad(), hooks(model, {("ffn.coef", 1): bad}):
            model.hf(input_ids=ids, use_cache=False)
    assert hook_count(model) == before
    with pytest.raises(KvmemError, match="returned shape"):
        with torch.no_grad(), hooks(model, {("ffn.out", 0): lambda t: t[:, :1]}):
            model.hf(input_ids=ids, use_cache=False)
    assert hook_count(model) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_blocks_with_cached_outputs_gives_the_same_logits(tiny_models, family):
    model = tiny_models[family]
    ids = batch(model)
    got = {}
    with torch.no_grad(), hooks(model, record([("resid.post", i) for i in range(model.n_layers)], got)):
        plain = model.hf(input_ids=ids, use_cache=False).logits
    cached = {i: got[("resid.post", i)] for i in range(model.n_layers)}
    with torch.no_grad(), skip_blocks(model, cached, 2), hooks(model, zero_ffn(2)):
        skipped = model.hf(input_ids=ids, use_cache=False).logits
    with torch.no_grad(), hooks(model, zero_ffn(2)):
        full = model.hf(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(skipped, full)
    assert not torch.allclose(full, plain)
    assert all("forward" not in blk.__dict__ for blk in model.adapter.blocks())


def test_bad_points(tiny_models):
    model = tiny_models["gpt2"]
    with pytest.raises(KvmemError, match="unknown hook point"):
        with hooks(model, {("mlp.out", 0): None}):
            pass
    with pytest.raises(KvmemError, match="out of range"):
        with hooks(model, {("ffn.coef", 9): None}):
            pass
    with pytest.raises(KvmemError, match="not gated"):
        with hooks(model, {("ffn.gate", 0): None}):
            pass
    assert set(sites(model, 0)) == set(POINTS) - {"ffn.gate"}


@pytest.fixture(scope="module")
def new_models():
    from tests.conftest import NEW_FAMILIES, make_tiny_new

    return {name: from_hf(make_tiny_new(name), None) for name in NEW_FAMILIES}


NEW_IDS = torch.tensor([[3, 17, 250, 9, 41, 77, 120, 5, 300, 64, 11, 2], [4, 18, 251, 10, 42, 78, 121, 6, 301, 65, 12, 3]])


def _new_family_names():
    from tests.conftest import NEW_FAMILIES

    return NEW_FAMILIES


@pytest.mark.parametrize("name", _new_family_names())
def test_new_families_points_edits_and_logits(new_models, name):
    """Fused gate/up (Phi-3), FFN outputs edited in place by the block (Falcon), post-norms, parallel blocks,
    OPT post-LN: every point against the view's weights and HF's hidden states; read-only hooks leave the logits
    unchanged; m_N := c equals the weight edit; early stop."""
    model = new_models[name]
    ids = NEW_IDS
    got = {}
    with torch.no_grad():
        plain = model.hf(input_ids=ids, use_cache=False, output_hidden_states=True)
        with hooks(model, record(all_points(model), got)):
            out = model.hf(input_ids=ids, use_cache=False, output_hidden_states=True)
    assert torch.equal(plain.logits, out.logits)
    for layer, lay in enumerate(model.layers):
        x = got[("ffn.x", layer)]
        torch.testing.assert_close(got[("ffn.pre", layer)], x @ lay.W_in + (0 if lay.b_in is None else lay.b_in))
        if model.gated:
            torch.testing.assert_close(got[("ffn.gate", layer)],
                                       x @ lay.W_gate + (0 if lay.b_gate is None else lay.b_gate))
        torch.testing.assert_close(got[("ffn.coef", layer)], lay.coefficients(x))
        torch.testing.assert_close(got[("ffn.out", layer)], lay.output(got[("ffn.coef", layer)]))
        torch.testing.assert_close(got[("resid.pre", layer)], out.hidden_states[layer])
        if layer < model.n_layers - 1:
            torch.testing.assert_close(got[("resid.post", layer)], out.hidden_states[layer + 1])

    L, N, c = 1, 5, 2.0

    def set_edit(kv):
        lay = kv.layers[L]
        v = lay.W_out[N].clone()
        lay.W_out[N] = 0
        set_bias(lay, c * v)

    with torch.no_grad():
        expected = weight_edited(model, set_edit).hf(input_ids=ids, use_cache=False).logits
        with hooks(model, set_coefs(L, {N: c})):
            edited = model.hf(input_ids=ids, use_cache=False).logits
        # the pre-activation edited through a fused [gate | up] output reaches m: up := 0 gives m = 0
        seen = {}
        with hooks(model, merge({("ffn.pre", L): [torch.zeros_like]}, record([("ffn.coef", L)], seen))):
            model.hf(input_ids=ids, use_cache=False)
        with hooks(model, {("ffn.coef", 0): None}, stop_after=True) as run:
            model.hf(input_ids=ids, use_cache=False)
    assert not torch.allclose(edited, plain.logits)
    torch.testing.assert_close(edited, expected, atol=1e-4, rtol=1e-4)
    if model.gated or model.layers[L].act(torch.zeros(1)).abs().item() == 0:
        assert seen[("ffn.coef", L)].abs().max() == 0
    assert run.stopped


def test_no_other_module_registers_pytorch_hooks():
    """One hook layer: outside kvmem/hooks.py and kvmem/models/ nothing registers forward hooks or swaps a
    module's forward."""
    from pathlib import Path

    import kvmem

    root = Path(kvmem.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "hooks.py" or rel.startswith("models/"):
            continue
        text = path.read_text()
        for needle in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward", ".forward = "):
            if needle in text:
                offenders.append(f"{rel}: {needle}")
    assert offenders == []
