"""Context shading from the run's stored windows, against shade.py's re-run of the model (the oracle) and a
brute-force forward pass; no forward pass for shading when the run covers the options; the fallbacks."""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
import torch
from test_report_build import load_data

import kvmem
from kvmem.report import ReportOptions, build_report
from kvmem.report import data as rdata
from kvmem.report import shade as shade_mod

BASE = dict(seq_len=32, top_k=5, batch_size=4, checkpoint_every=1e9)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, hostile_corpus):
    """The tiny gated Llama over the hostile corpus, profiled with exact (float32) windows, with narrow
    windows (2 top slots, 6 tokens before), and without windows (as kvmem before them)."""
    model = tiny_models["llama"]
    cfg = kvmem.ProfileConfig(corpus=str(hostile_corpus), **BASE)
    root = tmp_path_factory.mktemp("shading-runs")
    out = {}
    for name, c in {"f32": replace(cfg, context_dtype="float32"),
                    "narrow": replace(cfg, context_dtype="float32", context_top=2, context_before=6),
                    "old": replace(cfg, context=False)}.items():
        out[name] = kvmem.profile(c, root / name, model=model)
    return out


def oracle(model, run, opts: ReportOptions):
    """shade.py's re-run of the model over every example's rows: {layer: {kind: [d_mlp][n] str | None}}."""
    examples = {layer: rdata.layer_examples(s, run.tokens, opts) for layer, s in run.stats.items()}
    got = shade_mod.shade(model, run, examples, opts.before, opts.after, budget_tokens=10**9)
    assert got.shaded == got.total > 0
    return got.per_layer, examples


def page_strings(report, layer: int, kind: str, examples) -> list[list]:
    """The shading strings of one kind in a layer's data file, back in slot order [d_mlp][n] (None:
    an empty slot, or no shading)."""
    data = load_data(report / "data" / f"layer-{layer}.js")
    index = examples[layer][kind][1]
    out = []
    for n, d in enumerate(data["neurons"]):
        shown = iter(d[kind])
        row = []
        for i in index[n].tolist():
            if i >= 0 or kind == "quad":
                ex = next(shown)
                row.append(ex[2] if len(ex) > 2 else None)
            else:
                row.append(None)
        out.append(row)
    return out


def assert_same_as_oracle(report, run, expected, examples, kinds=rdata.KINDS):
    checked = 0
    for layer in run.profiled_layers:
        for kind in expected[layer]:
            if kind not in kinds:
                continue
            got = page_strings(report, layer, kind, examples)
            index = examples[layer][kind][1]
            for n in range(len(got)):
                for j, i in enumerate(index[n].tolist()):
                    if i >= 0:
                        assert got[n][j] == expected[layer][kind][n][j], (layer, kind, n, j)
                        checked += 1
    assert checked > 100


def test_stored_windows_give_the_oracle_shading_without_a_model(tmp_path, runs, report_run):
    _, model = report_run
    run, opts = runs["f32"], ReportOptions()
    expected, examples = oracle(model, run, opts)
    rep = build_report(run, tmp_path / "rep")  # no model at all
    assert_same_as_oracle(rep.path, run, expected, examples)
    meta = load_data(rep.path / "data" / "meta.js")
    assert "kept by the profile" in meta["shade_note"] and "only the activating token" not in meta["shade_note"]
    assert load_data(rep.path / "data" / "layer-0.js")["shaded"]


def test_report_with_the_model_runs_no_forward_pass_for_shading(tmp_path, runs, report_run):
    _, model = report_run
    run = runs["f32"]
    expected, examples = oracle(model, run, ReportOptions())
    with mock.patch.object(shade_mod, "shade", side_effect=AssertionError("shade.py re-ran the model")), \
            mock.patch.object(model.hf, "forward", side_effect=AssertionError("forward pass")):
        rep = build_report(run, tmp_path / "rep", model=model)
    assert_same_as_oracle(rep.path, run, expected, examples)
    assert load_data(rep.path / "data" / "meta.js")["has_values"]  # the model was used, for the value side


def test_bfloat16_windows_are_the_brute_force_m_rounded(report_dir, report_run):
    """The default run (bfloat16 windows), report built with the model: every shaded position is
    round(10·bf16(m)/max|m|) of m from a brute-force forward pass over each document row alone (BOS first,
    pieces of seq_len - 1 tokens), 'K' outside the example's row; against the oracle's float32 m that moves
    a level by at most one, rarely."""
    run, model = report_run
    seq_len, store = run.manifest["settings"]["seq_len"], run.tokens
    ids, bos = store.ids.long(), model.tokenizer.bos_token_id
    assert bos is not None and run.layout.bos_id == bos
    pieces = [(a, min(a + seq_len - 1, int(store.doc_offsets[d + 1]))) for d in range(store.n_docs)
              for a in range(int(store.doc_offsets[d]), int(store.doc_offsets[d + 1]), seq_len - 1)]
    row = torch.cat([torch.full((b - a,), r) for r, (a, b) in enumerate(pieces)])  # row of each token
    opts = ReportOptions()
    expected, examples = oracle(model, run, opts)
    meta = load_data(report_dir / "data" / "meta.js")
    assert "kept by the profile" in meta["shade_note"]
    positions = differ = 0
    for layer in run.profiled_layers:
        m = torch.cat([kvmem.run_capture(model, torch.cat([torch.tensor([bos]), ids[a:b]])[None],
                                         layers=[layer]).coef[layer][0, 1:] for a, b in pieces])  # [n_tokens, d_mlp]
        s = run.stats[layer]
        scale = torch.maximum(s.max.abs(), s.min.abs())
        for kind in examples[layer]:
            got = page_strings(report_dir, layer, kind, examples)
            index = examples[layer][kind][1]
            for n, j in (index >= 0).nonzero().tolist():
                g = int(index[n, j]) + torch.arange(-opts.before, opts.after + 1)
                inside = (g >= 0) & (g < len(ids)) & (row[g.clamp(0, len(ids) - 1)] == row[int(index[n, j])])
                mb = m[g.clamp(0, len(ids) - 1), n].to(torch.bfloat16).float()
                level = torch.round(10 * mb / scale[n]).clamp(-10, 10).long()
                want = "".join(chr(ord("K") + int(x)) if ok else "K" for x, ok in zip(level, inside))
                assert got[n][j] == want, (layer, kind, n, j)
                for a, b in zip(got[n][j], expected[layer][kind][n][j]):
                    assert abs(ord(a) - ord(b)) <= 1
                    differ += a != b
                positions += len(want)
    assert positions > 1000 and differ < positions / 100


def test_a_run_without_windows_falls_back_on_the_model(tmp_path, runs, report_run):
    _, model = report_run
    run = runs["old"]
    assert not any(run.has_context(layer) for layer in run.profiled_layers)
    assert shade_mod.stored(run, {0: {}}, 10, 4) is None
    plain = build_report(run, tmp_path / "plain")
    assert load_data(plain.path / "data" / "meta.js")["shade_note"] == shade_mod.NO_CONTEXT
    assert not load_data(plain.path / "data" / "layer-0.js")["shaded"]
    expected, examples = oracle(model, run, ReportOptions())
    rerun = build_report(run, tmp_path / "rerun", model=model)
    assert "re-running the model" in load_data(rerun.path / "data" / "meta.js")["shade_note"]
    assert_same_as_oracle(rerun.path, run, expected, examples)


def test_options_beyond_the_profile_rerun_only_what_it_lacks(tmp_path, runs, report_run):
    """The narrow run kept 2 top slots and 6 tokens before: asked for 5 top slots and 6 tokens before,
    the model re-runs only the rows of top slots 2-4; asked for 10 tokens before, every example."""
    _, model = report_run
    run = runs["narrow"]
    opts = ReportOptions(n_top=5, before=6)
    expected, examples = oracle(model, run, opts)
    calls = []
    real = shade_mod.shade

    def spy(model, run, ex, *args, **kwargs):
        calls.append(ex)
        return real(model, run, ex, *args, **kwargs)

    without = build_report(run, tmp_path / "without", options=opts)
    note = load_data(without.path / "data" / "meta.js")["shade_note"]
    assert "kept by the profile" in note and "the rest show only the activating token" in note
    top = page_strings(without.path, 0, "top", examples)
    assert all(r[j] is not None for r in top for j in range(2))
    index = examples[0]["top"][1]
    kept = ~run.stats[0].context.lookup(torch.arange(index.shape[0])[:, None].expand_as(index), index).isnan().all(-1)
    assert [[x is not None for x in r[2:]] for r in top] == kept[:, 2:].tolist()  # only slots another store shows
    assert not kept[:, 2:].all()
    with mock.patch.object(shade_mod, "shade", spy):
        rep = build_report(run, tmp_path / "with", options=opts, model=model)
    assert len(calls) == 1
    for layer, kinds in calls[0].items():
        for kind, (_, index) in kinds.items():
            if kind == "top":
                assert (index[:, :2] < 0).all() and (index[:, 2:] >= 0).any()
            else:
                assert (index < 0).all(), kind  # every other example came from the run
    assert_same_as_oracle(rep.path, run, expected, examples)
    wide = ReportOptions(n_top=5, before=10)
    expected, examples = oracle(model, run, wide)
    calls.clear()
    with mock.patch.object(shade_mod, "shade", spy):
        rep = build_report(run, tmp_path / "wide", options=wide, model=model)
    assert len(calls) == 1 and "re-running the model" in load_data(rep.path / "data" / "meta.js")["shade_note"]
    assert_same_as_oracle(rep.path, run, expected, examples)
