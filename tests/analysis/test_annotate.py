"""The annotation export against brute force on real runs of tiny models: every pool row run alone (no padding),
every key's and random direction's top triggers found by a plain sort over the counted positions, each text rebuilt
from the token store, and the sheet blind (no kind / neuron / raw score in it; the key in its own file)."""

import pandas as pd
import pytest
import torch

from kvmem.analysis.annotate import NEWLINE, annotate, write_annotation
from kvmem.analysis.common import sample_from_run
from kvmem.capture import run_capture
from kvmem.errors import KvmemError
from trigger_runs import brute_doc_id, make_runs

RUNS = {"gpt2": ("gpt2", None, "doc"), "llama": ("llama", "1/2", "doc"), "gpt2-stream": ("gpt2", None, "stream")}
ARGS = dict(n_keys=3, n_triggers=4, n_random=2, tokens=200, context=5, seed=3)


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    return make_runs(tiny_models, tmp_path_factory.mktemp("annotate"), RUNS)


@pytest.mark.parametrize("name", list(RUNS))
def test_annotation_matches_brute_force(tiny_models, runs, name, tmp_path):
    model, run = tiny_models[RUNS[name][0]], runs[name]
    store, layout = run.tokens, run.layout
    res = annotate(model, run, **ARGS)
    items, key, trig = res["items"], res["key"].set_index("item"), res["triggers"]
    dirs = res["directions"].set_index("item")
    pool = sample_from_run(run, ARGS["tokens"], ARGS["seed"])
    per_layer = {layer: ([], [], []) for layer in run.profiled_layers}  # index, m, x per counted position
    for r in range(pool.rows.shape[0]):
        n = int(pool.mask[r].sum())
        cap = run_capture(model, pool.rows[r:r + 1, :n], what=("coef", "x"))
        keep = pool.counted[r, :n]
        for layer in run.profiled_layers:
            per_layer[layer][0].append(pool.index[r, :n][keep])
            per_layer[layer][1].append(cap.coef[layer][0][keep].double())
            per_layer[layer][2].append(cap["x"][layer][0][keep].double())
    ids = store.ids.tolist()
    bos = 0 if layout.bos_id is None else 1
    for layer in run.profiled_layers:
        index, m, x = (torch.cat(t) for t in per_layer[layer])
        k = key[key.layer == layer]
        assert sorted(k.kind) == ["key"] * 3 + ["random"] * 2
        for item, row in k.iterrows():
            score = m[:, row.neuron] if row.kind == "key" else x @ torch.tensor(dirs.loc[item, "vector"]).double()
            order = sorted(range(len(index)), key=lambda t: (-float(score[t]), int(index[t])))[:4]
            got = trig[trig.item == item].sort_values("rank")
            assert got["index"].tolist() == [int(index[t]) for t in order]
            assert got["score"].tolist() == pytest.approx([float(score[t]) for t in order], rel=1e-4, abs=1e-5)
            assert got["doc"].tolist() == [brute_doc_id(int(index[t]), store) for t in order]
            sheet = items[items.item == item].sort_values("rank")
            assert sheet["rank"].tolist() == [1, 2, 3, 4] and sheet.rel_score.iloc[0] == 1.0
            for i, text, tok in zip(got["index"], sheet.text, sheet.token):
                pos = int(layout.position(torch.tensor(i)))
                start = i - (pos - bos)  # the row's first store token
                ctx = ids[max(start, i - 4) - store.offset: i - store.offset + 1]
                want = model.tokenizer.decode(ctx[:-1]) + "[[" + model.tokenizer.decode(ctx[-1:]) + "]]"
                assert text == want.replace("\n", NEWLINE)
                assert tok == model.tokenizer.decode(ctx[-1:]).replace("\n", NEWLINE)
    # blind: the sheet names no kind, neuron or raw score; the item numbers of a layer are a shuffle
    assert set(items.columns) == {"item", "layer", "rank", "text", "token", "rel_score", "label", "pattern"}
    assert set(items.item) == set(key.index)
    sheet, key_path = write_annotation(res, tmp_path / "ann")
    back = pd.read_csv(sheet, keep_default_na=False)
    assert list(back.columns) == list(items.columns) and len(back) == len(items)
    assert back.text.tolist() == items.text.tolist()
    assert set(pd.read_csv(key_path).kind) == {"key", "random"}


def test_annotation_is_seeded_and_rejects_bad_input(tiny_models, runs):
    model, run = tiny_models["gpt2"], runs["gpt2"]
    a, b = annotate(model, run, **ARGS), annotate(model, run, **ARGS)
    pd.testing.assert_frame_equal(a["items"], b["items"])
    pd.testing.assert_frame_equal(a["key"], b["key"])
    with pytest.raises(KvmemError, match="n_triggers"):
        annotate(model, run, n_triggers=0)
