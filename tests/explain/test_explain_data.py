"""What the explainer sees of a neuron, against independent computations on a tiny GPT-2 run: snippet
coefficients against a full-row forward pass and the profile's stored values, the seeded held-out split,
quiet windows below the threshold, the value side against the HF module's own weights."""

import pytest
import torch
from explain_runs import make_run

from kvmem.capture import run_capture
from kvmem.explain.data import QUIET, gather


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tiny_models):
    return make_run(tmp_path_factory, tiny_models["gpt2"], "gpt2"), tiny_models["gpt2"]


def _full_row_coefs(run, model, layer, neuron, index):
    """m of ``neuron`` over the whole model row holding ``index`` (one unpadded pass), and the index's position."""
    lay = run.layout
    row = int(lay.row_of(torch.tensor([index]))[0])
    b = lay.batch(run.tokens, [row])
    n = int(b.mask[0].sum())
    m = run_capture(model, b.ids[:, :n], [layer]).data["coef"][layer][0, :, neuron].float()
    return m, int(lay.position(torch.tensor([index]))[0]), b.ids[0, :n].tolist()


def test_snippets_have_the_profiles_coefficients(gpt2_run):
    run, model = gpt2_run
    layer, neuron = 1, 7
    d = gather(run, model, layer, neuron, "+", seed=3, n_top=6, before=5, after=2)
    assert d.explain and d.score
    top = run.slots(layer, "top_docs")
    stored = dict(zip(top.index[neuron].tolist(), top.value[neuron].tolist()))
    for s in d.explain + d.score + [x for _, b in d.bands for x in b] + d.quiet:
        full, pos, ids = _full_row_coefs(run, model, layer, neuron, s.index)
        at = s.at if s.at >= 0 else 5 if pos - 5 >= run.layout.first else pos - run.layout.first
        lo = pos - at
        assert s.coefs == pytest.approx(full[lo:lo + len(s.coefs)].tolist(), abs=1e-4)
        assert s.tokens == [run.vocab[i] for i in ids[lo:lo + len(s.tokens)]]
        if s in d.explain or s in d.score:
            assert s.coefs[s.at] == pytest.approx(stored[s.index], abs=1e-4)


def test_split_is_seeded_disjoint_and_complete(gpt2_run):
    run, model = gpt2_run
    top = run.slots(1, "top_docs")
    stored = [i for i, v in zip(top.index[7].tolist(), top.value[7].tolist()) if i >= 0 and v > 0][:6]
    a = gather(run, model, 1, 7, "+", seed=3, n_top=6)
    b = gather(run, model, 1, 7, "+", seed=3, n_top=6)
    ex, sc = {s.index for s in a.explain}, {s.index for s in a.score}
    assert not ex & sc and ex | sc == set(stored) and len(ex) == (len(stored) + 1) // 2
    assert [s.index for s in b.explain] == [s.index for s in a.explain]
    assert [s.index for s in b.quiet] == [s.index for s in a.quiet]
    splits = {tuple(sorted(s.index for s in gather(run, model, 1, 7, "+", seed=k, n_top=6).explain)) for k in range(6)}
    assert len(splits) > 1  # the seed moves the split
    for s in a.quiet:
        assert max(s.coefs) < QUIET * a.max_abs and s.at == -1


def test_value_side_matches_the_hf_weights(gpt2_run):
    run, model = gpt2_run
    hf = model.hf
    layer, neuron = 2, 11
    d = gather(run, model, layer, neuron, "+", seed=0)
    v = hf.transformer.h[layer].mlp.c_proj.weight[neuron].detach().float()  # Conv1D [d_mlp, d_model]: row = v_i
    with torch.no_grad():
        logits = hf.lm_head(hf.transformer.ln_f(v)).float()
    order = logits.argsort(descending=True).tolist()
    strings = [model.tokenizer.decode([i]) for i in range(len(logits))]
    assert d.promoted == [strings[i] for i in order[:20:2]]
    assert d.held_promoted == [strings[i] for i in order[1:20:2]]
    assert d.suppressed == [strings[i] for i in logits.argsort()[:10].tolist()]
    assert set(d.distractors).isdisjoint(strings[i] for i in order[:100]) or len(set(strings)) < len(strings)
