"""The run folder of a profile with mixture-of-experts layers (a synthetic run: tests/profile/moe_run.py):
the routing table and the neuron table's expert columns against brute force, the schema against what is
written (both ways), expert ids through Run.neuron, the refusal of a run missing its routing table."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import kvmem
from kvmem.analysis.ci import wilson
from kvmem.errors import KvmemError
from kvmem.profile import schema
from tests.profile.moe_run import DENSE_D, DENSE_LAYER, K, MOE_LAYER, synthetic_moe_run
from tests.profile.test_run_contract import _arrow_dtype
from tests.stats.moe_reference import D, D_EXPERT, E, EXPERT_OF, neuron_ref, routing_ref


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    return synthetic_moe_run(tmp_path_factory.mktemp("moe") / "run")


def test_routing_table_against_loops(moe_run):
    run, st = moe_run
    run = kvmem.open_run(run.path)
    assert run.moe and run.moe_layers == [MOE_LAYER]
    m = run.manifest["moe"]
    assert (m["n_experts"], m["top_k"], m["n_shared"]) == (E, 2, 1)
    ref = routing_ref(st)
    r = run.routing
    assert r["layer"].tolist() == [MOE_LAYER] * E and r["expert"].tolist() == list(range(E))
    assert r["load"].tolist() == ref["load"].tolist() and (r["n"] == ref["n"]).all()
    assert np.array(r["coselected"].tolist()).tolist() == ref["cosel"].tolist()
    for e in range(E):
        assert (r["share_lo"][e], r["share_hi"][e]) == wilson(int(ref["load"][e]), ref["n"])
    np.testing.assert_allclose(r["mean_weight"], ref["wsum"] / np.where(ref["load"] > 0, ref["load"], np.nan))
    layers = run.layers.set_index("layer")
    assert layers.loc[MOE_LAYER, "router_entropy_mean"] == pytest.approx(ref["h"].mean(), rel=1e-6)
    assert layers.loc[MOE_LAYER, "sel_entropy_mean"] == pytest.approx(ref["hs"].mean(), rel=1e-6)
    assert np.isnan(layers.loc[DENSE_LAYER, "router_entropy_mean"]) and layers["n_experts"].isna()[DENSE_LAYER]


def test_neuron_table_is_relative_to_the_experts_tokens(moe_run):
    run, st = moe_run
    df = run.neurons
    moe = df[df["layer"] == MOE_LAYER].reset_index(drop=True)
    ref = neuron_ref(st, K)
    assert moe["n"].tolist() == ref["n"].tolist()
    assert moe["count_pos"].tolist() == ref["pos"].tolist()
    np.testing.assert_array_equal(moe["top_index"], ref["top_i"][:, 0])
    np.testing.assert_array_equal(moe["max"].fillna(-99), np.nan_to_num(ref["top_v"][:, 0], nan=-99))
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(moe["firing_rate"], ref["pos"] / ref["n"], equal_nan=True)
    assert moe["id"].iloc[D_EXPERT + 2] == f"{MOE_LAYER}.e1.2" and moe["id"].iloc[-1] == f"{MOE_LAYER}.s0.1"
    assert moe["expert"].tolist() == [e if e >= 0 else -1 - e for e in EXPERT_OF.tolist()]
    dense = df[df["layer"] == DENSE_LAYER]
    assert len(dense) == DENSE_D and (dense["expert"] == -1).all() and not dense["shared"].any()
    assert dense["id"].tolist() == [f"{DENSE_LAYER}.{i}" for i in range(DENSE_D)]
    assert (dense["n"] == len(st.ti)).all()


def test_expert_ids_through_the_run(moe_run):
    run, _ = moe_run
    assert run.neuron(f"{MOE_LAYER}.e2.1") == (MOE_LAYER, 2 * D_EXPERT + 1)
    assert run.neuron(f"{MOE_LAYER}.s0.0") == (MOE_LAYER, E * D_EXPERT)
    assert run.neuron(f"{DENSE_LAYER}.3") == (DENSE_LAYER, 3)
    with pytest.raises(KvmemError, match="name the expert"):
        run.neuron(f"{MOE_LAYER}.3")
    with pytest.raises(KvmemError, match="no such neuron"):
        run.neuron(f"{MOE_LAYER}.e1.{D_EXPERT}")
    with pytest.raises(KvmemError, match="dense"):
        run.neuron(f"{DENSE_LAYER}.e0.1")


def test_the_schema_lists_exactly_what_an_moe_run_writes(moe_run):
    run, _ = moe_run
    assert {p.name for p in run.path.iterdir()} == set(schema.FILES) | set(schema.MOE_FILES)
    for table in (schema.NEURONS, schema.LAYERS, schema.ROUTING):
        written = {f.name: _arrow_dtype(f.type) for f in pq.read_schema(run.path / table.file)}
        missing = [c for c in table.required(False, moe=True) if c not in written]
        undocumented = [c for c in written if c not in table.known]
        assert not missing and not undocumented, (table.file, missing, undocumented)
        wrong = {c: (table.known[c][0], t) for c, t in written.items() if table.known[c][0] != t}
        assert not wrong, (table.file, wrong)
    for key in run.manifest["moe"]:
        assert f"moe.{key}" in schema.MANIFEST_OPTIONAL


def test_an_moe_run_without_its_routing_table_is_refused(moe_run, tmp_path):
    run, _ = moe_run
    broken = tmp_path / "broken"
    shutil.copytree(run.path, broken)
    (broken / schema.ROUTING_FILE).unlink()
    with pytest.raises(KvmemError, match="routing.parquet is missing"):
        kvmem.open_run(broken)


def test_merged_shards_equal_the_whole_run(moe_run, tmp_path):
    from kvmem.profile.job import merge

    run, _ = moe_run
    a, _ = synthetic_moe_run(tmp_path / "a", 0, 130)
    b, _ = synthetic_moe_run(tmp_path / "b", 130)
    merged = merge([a.path, b.path], tmp_path / "merged")
    assert merged.moe and merged.moe_layers == [MOE_LAYER] and merged.manifest["moe"] == run.manifest["moe"]
    for col in ("load", "n", "coselected"):
        assert [np.asarray(v).tolist() for v in merged.routing[col]] == [np.asarray(v).tolist() for v in run.routing[col]]
    np.testing.assert_allclose(merged.routing["mean_weight"], run.routing["mean_weight"], rtol=1e-12)
    for col in ("n", "count_pos", "top_index", "expert", "id"):
        assert merged.neurons[col].tolist() == run.neurons[col].tolist(), col


def test_expert_map_follows_the_flat_order_of_the_contract():
    from types import SimpleNamespace

    from kvmem.neurons import NeuronId
    from kvmem.profile.moe import expert_of
    from kvmem.stats.readout import expert_columns

    layout = SimpleNamespace(n_experts=3, d_expert=4, n_shared=2, d_shared=5)
    e = expert_of(layout)
    assert e.numel() == 3 * 4 + 2 * 5
    c = expert_columns(e)
    for flat in range(e.numel()):  # routed e, neuron i at e*d_expert + i; shared s at n_experts*d_expert + s*d_shared + i
        if flat < 12:
            want = NeuronId(7, flat % 4, flat // 4)
        else:
            want = NeuronId(7, (flat - 12) % 5, (flat - 12) // 5, True)
        got = NeuronId(7, int(c["expert_neuron"][flat]), int(c["expert"][flat]), bool(c["shared"][flat]))
        assert got == want, flat


def test_cli_top_takes_and_prints_expert_ids(moe_run, capsys):
    import json

    from tests.cli.test_core_cli import run as cli

    run, st = moe_run
    ref = neuron_ref(st, K)
    code, out, err = cli(capsys, "top", str(run.path), f"{MOE_LAYER}.e1.2", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["neuron"] == f"{MOE_LAYER}.e1.2"
    assert [e["index"] for e in got["examples"]] == [int(i) for i in ref["top_i"][D_EXPERT + 2] if i >= 0]
    code, out, err = cli(capsys, "top", str(run.path), f"{MOE_LAYER}.e9.0")
    assert code == 2 and err.startswith("error: ")


def test_closing_summary_states_the_routing(moe_run):
    from kvmem.cli.profile import routing_lines, run_summary

    run, st = moe_run
    ref = routing_ref(st)
    (line,) = routing_lines(run)
    busiest, idlest = int(np.argmax(ref["load"])), int(np.argmin(ref["load"]))
    lo, hi = wilson(int(ref["load"][busiest]), ref["n"])
    assert f"busiest expert e{busiest} {ref['load'][busiest] / ref['n']:.1%} [{lo:.1%}, {hi:.1%}]" in line
    assert f"idlest e{idlest} 0.0%" in line and f"router entropy {ref['h'].mean():.3f}" in line
    summary = run_summary(run)
    assert [r["load"] for r in summary["routing"]] == ref["load"].tolist()
    import json
    json.dumps(summary)  # JSON-able


def test_a_gated_dense_layer_beside_an_moe_layer_keeps_its_quadrants(tmp_path):
    written, _ = synthetic_moe_run(tmp_path / "gated", gated=True)
    gate, up = written.dense_gate_up
    run = kvmem.open_run(written.path)
    assert run.gated and run.quadrants
    df = run.neurons
    dense, moe = df[df["layer"] == DENSE_LAYER], df[df["layer"] == MOE_LAYER]
    assert dense["q_pp"].tolist() == ((gate > 0) & (up > 0)).sum(0).tolist()
    assert (moe[["q_pp", "q_pn", "q_np", "q_nn"]] == -1).all().all()
    assert str(df["q_pp"].dtype) == "int64"
