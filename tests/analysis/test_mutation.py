"""The mutation test (Geva et al. 2021 Fig. 3) against brute force on real runs of tiny models (gated and not, and a
shard with offset > 0): every prefix rebuilt from plain lists, each variant re-run alone without padding, and the
unmutated prefix checked against the activation the profiler stored."""

import numpy as np
import pytest
import torch

from kvmem.analysis.mutation import KINDS, mutants, mutation
from kvmem.analysis.prefixes import layout_of
from kvmem.capture import run_capture
from kvmem.errors import KvmemError
from trigger_runs import RUNS, brute_doc_id, make_runs


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    return make_runs(tiny_models, tmp_path_factory.mktemp("mutation"))


def test_mutants():
    got = mutants([10, 11, 12, 13], 2)
    assert got == {"first": [11, 12, 13], "last": [10, 11, 12], "random": [10, 11, 13]}


@pytest.mark.parametrize("name", list(RUNS))
def test_mutation_matches_brute_force(tiny_models, runs, name):
    model, run = tiny_models[RUNS[name][0]], runs[name]
    store = run.tokens
    ids, base = store.ids.tolist(), store.offset
    res = mutation(model, run, n_neurons=4, n_examples=3, n_boot=200)
    units, table = res["units"], res["layers"].set_index("layer")
    assert len(units) > 0
    layout = layout_of(run)
    bos = [] if layout.bos_id is None else [layout.bos_id]

    def m_last(seq, layer, neuron):
        return float(run_capture(model, torch.tensor([seq]), [layer]).coef[layer][0, -1, neuron])

    for row in units.itertuples():
        pos = int(layout.position(torch.tensor(row.index)))
        start = row.index - (pos - len(bos))  # global index of the row's first store token
        real = ids[start - base: row.index - base + 1]
        assert row.n_prefix == len(real) >= 3 and 1 <= row.removed <= len(real) - 2
        assert row.doc == brute_doc_id(row.index, store)
        orig = m_last(bos + real, row.layer, row.neuron)
        assert row.m_orig == pytest.approx(orig, rel=1e-4, abs=1e-5)
        assert row.m_stored == pytest.approx(orig, rel=1e-4, abs=1e-5)  # the prefix is what the profiler saw
        want = {"first": real[1:], "last": real[:-1], "random": real[:row.removed] + real[row.removed + 1:]}
        for kind in KINDS:
            m = m_last(bos + want[kind], row.layer, row.neuron)
            assert getattr(row, f"m_{kind}") == pytest.approx(m, rel=1e-4, abs=1e-5)
            assert getattr(row, f"kept_{kind}") == pytest.approx(m / orig, rel=1e-3, abs=1e-4)
    for layer, g in units.groupby("layer"):
        assert table.loc[layer, "n_examples"] == len(g) and table.loc[layer, "n_docs"] == g.doc.nunique()
        for kind in KINDS:
            c = f"kept_{kind}"
            assert table.loc[layer, c] == pytest.approx(g[c].mean())
            assert table.loc[layer, f"{c}_median"] == pytest.approx(g[c].median())
            assert table.loc[layer, f"{c}_lo"] - 1e-12 <= table.loc[layer, c] <= table.loc[layer, f"{c}_hi"] + 1e-12
    # seeded: the same call gives the same sample and the same numbers
    again = mutation(model, run, n_neurons=4, n_examples=3, n_boot=200)["units"]
    np.testing.assert_array_equal(again[["neuron", "index", "removed"]].to_numpy(),
                                  units[["neuron", "index", "removed"]].to_numpy())


def test_mutation_on_the_per_document_store(tiny_models, runs):
    model, run = tiny_models["llama"], runs["llama"]
    units = mutation(model, run, n_neurons=3, n_examples=2, store="top_docs", n_boot=50)["units"]
    assert len(units) > 0
    for row in units.itertuples():
        docs = run.stats[row.layer].top_docs
        slot = docs.index[row.neuron].tolist().index(row.index)
        assert slot < 2 and row.m_stored == pytest.approx(float(docs.value[row.neuron, slot]))
        assert row.m_orig == pytest.approx(row.m_stored, rel=1e-4, abs=1e-5)


def test_mutation_rejects_bad_input(tiny_models, runs):
    with pytest.raises(KvmemError, match="n_neurons"):
        mutation(tiny_models["gpt2"], runs["gpt2"], n_neurons=0)
    with pytest.raises(KvmemError, match="store"):
        mutation(tiny_models["gpt2"], runs["gpt2"], store="bottom")
