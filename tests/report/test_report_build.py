"""The report's files, links, escaping and data, checked against independent computations."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch


URL = re.compile(r"(?:https?:|ftp:|wss?:)?//[A-Za-z0-9]", re.I)


def load_data(path: Path):
    """The JSON object of a data script (`KV.x = {...};` or `KV.addPacked("name", "base64 gzip");`)."""
    from kvmem.report.data import unpacked

    text = path.read_text(encoding="utf-8")
    m = re.fullmatch(r'KV\.addPacked\("[\w-]+", "([A-Za-z0-9+/=]*)"\);\n', text)
    if m:
        return unpacked(m.group(1))
    m = re.fullmatch(r"KV\.\w+ = (.*);\n", text, re.S)
    assert m, f"{path.name}: unexpected shape"
    return json.loads(m.group(1))


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.scripts = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.refs.append(value)


def pages(root: Path) -> list[Path]:
    return sorted(root.glob("*.html"))


def test_files(report_dir, report_run):
    from plotly.offline import get_plotlyjs

    run, _ = report_run
    assert (report_dir / "index.html").is_file() and (report_dir / "neuron.html").is_file()
    assert (report_dir / "static" / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()
    for name in ("report.js", "report.css"):
        assert (report_dir / "static" / name).stat().st_size > 1000
    for name in ("vocab.js", "neurons.js", "meta.js") + tuple(f"layer-{layer}.js" for layer in run.profiled_layers):
        assert (report_dir / "data" / name).is_file(), name
    # plotly.js is written once, never inlined into a page
    for page in pages(report_dir):
        assert page.stat().st_size < 500_000, page.name


def test_links_resolve_and_no_network(report_dir, plain_report_dir):
    for root in (report_dir, plain_report_dir):
        for page in pages(root):
            parser = Links()
            parser.feed(page.read_text(encoding="utf-8"))
            assert parser.refs, page.name
            for ref in parser.refs:
                assert not URL.match(ref) and not ref.startswith(("data:", "javascript:")), (page.name, ref)
                target = ref.split("#")[0].split("?")[0]
                if target:
                    assert (root / target).is_file(), (page.name, ref)
        own = list(pages(root)) + list((root / "data").glob("*.js")) + [root / "static" / "report.js",
                                                                         root / "static" / "report.css"]
        for path in own:
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"https?://|\bwss?://|//cdn|@import", text), path.name
        # the neuron links the table builds point at a page that exists
        assert "neuron.html#" in (root / "static" / "report.js").read_text() and (root / "neuron.html").is_file()


def test_hostile_text_is_escaped(report_dir, report_run):
    run, _ = report_run
    index = (report_dir / "index.html").read_text(encoding="utf-8")
    assert "&lt;img src=x onerror=window.__pwned=9&gt;" in index  # the corpus name, autoescaped
    assert "<img" not in index
    for page in pages(report_dir):
        text = page.read_text(encoding="utf-8")
        assert text.count("<script") == text.count("</script>"), page.name
        for m in re.finditer(r"<script([^>]*)>(.*?)</script>", text, re.S):
            assert "<" not in m.group(2), (page.name, m.group(2)[:80])
    for path in (report_dir / "data").glob("*.js"):
        text = path.read_text(encoding="utf-8")
        assert not set("<>&\u2028\u2029") & set(text), path.name
    # escaping is lossless: the vocabulary comes back exactly, hostile characters included
    vocab = load_data(report_dir / "data" / "vocab.js")
    assert vocab[: len(run.vocab)] == run.vocab
    assert any("<" in t or ">" in t or "&" in t or '"' in t for t in vocab)


def test_safe_json():
    from kvmem.report.data import safe_json

    obj = {"a": "</script><script>alert(1)</script>", "b": "<!-- & \u2028 \u2029 ' \" `"}
    s = safe_json(obj)
    assert not set("<>&\u2028\u2029") & set(s)
    assert json.loads(s) == obj


def test_layer_data_matches_run(report_dir, report_run):
    """Examples vs run.examples (its own code path), histogram vs token count, value side vs W_U."""
    run, model = report_run
    meta = load_data(report_dir / "data" / "meta.js")
    assert meta["n_tokens"] == run.manifest["corpus"]["n_tokens"] and meta["has_values"] and meta["gated"]
    layer = run.profiled_layers[-1]
    data = load_data(report_dir / "data" / f"layer-{layer}.js")
    before = data["before"]
    assert len(data["neurons"]) == model.d_mlp
    logits = model.value_logits([(layer, n) for n in range(model.d_mlp)]).float()  # [d_mlp, d_vocab]
    for neuron in (0, 7, model.d_mlp - 1):
        d = data["neurons"][neuron]
        ref = run.examples(layer, neuron, "top", before=before, after=4)
        assert len(d["top"]) == len(ref)
        for ex, row in zip(d["top"], ref.itertuples()):
            assert ex[0] == pytest.approx(row.value, rel=1e-3)
            assert data["wdoc"][ex[1]] == row.doc
            win = data["win"][ex[1]]
            assert [run.vocab[t] for t in win if t >= 0] == list(row.context)
            assert win[before] >= 0 and run.vocab[win[before]] == row.token
        lo, counts = d["h"]
        assert sum(counts) == run.manifest["corpus"]["n_tokens"]
        assert sum(d["q"]) == run.manifest["corpus"]["n_tokens"]
        top = logits[neuron].topk(len(d["vt"]))
        assert [i for i, _ in d["vt"]] == top.indices.tolist()
        assert [v for _, v in d["vt"]] == pytest.approx(top.values.tolist(), rel=1e-3, abs=1e-4)
        bottom = logits[neuron].topk(len(d["vb"]), largest=False)
        assert [i for i, _ in d["vb"]] == bottom.indices.tolist()


def test_shading_matches_brute_force(report_dir, report_run):
    """Context shading (from the run's bfloat16 windows) vs m recomputed here row by row with run_capture:
    each document cut into pieces of seq_len - 1 tokens run alone after the BOS; positions of the document
    outside the example's row are unshaded ('K')."""
    import kvmem

    run, model = report_run
    seq_len, store = run.manifest["settings"]["seq_len"], run.tokens
    ids, bos = store.ids.long(), model.tokenizer.bos_token_id
    layer = run.profiled_layers[0]
    pieces = [(a, min(a + seq_len - 1, int(store.doc_offsets[d + 1]))) for d in range(store.n_docs)
              for a in range(int(store.doc_offsets[d]), int(store.doc_offsets[d + 1]), seq_len - 1)]
    row = torch.cat([torch.full((b - a,), r) for r, (a, b) in enumerate(pieces)])  # row of each token
    m = torch.cat([kvmem.run_capture(model, torch.cat([torch.tensor([bos]), ids[a:b]])[None],
                                     layers=[layer]).coef[layer][0, 1:] for a, b in pieces])  # [n_tokens, d_mlp]
    data = load_data(report_dir / "data" / f"layer-{layer}.js")
    assert data["shaded"]
    before, checked = data["before"], 0
    for neuron in range(0, model.d_mlp, 5):
        d = data["neurons"][neuron]
        scale = max(abs(data["max"][neuron]), abs(data["min"][neuron]))
        for ex in d["top"] + d["bands"]:
            shade = ex[2]
            assert shade is not None
            assert len(shade) == len(data["win"][ex[1]])
            at_level = ord(shade[before]) - ord("K")
            assert at_level == pytest.approx(10 * ex[0] / scale, abs=0.5 + 1e-3)
            checked += 1
        # the whole window of the first top example, against brute force
        top_index = int(run.stats[layer].top.index[neuron, 0])
        ex = d["top"][0]
        for j, tok in enumerate(data["win"][ex[1]]):
            if tok < 0:
                continue
            g = top_index - before + j
            assert ids[g] == tok
            want = 10 * float(m[g, neuron]) / scale if row[g] == row[top_index] else 0.0
            assert ord(ex[2][j]) - ord("K") == pytest.approx(want, abs=0.5 + 1e-3)
    assert checked > 0


def test_plain_report_degrades(plain_report_dir):
    meta = load_data(plain_report_dir / "data" / "meta.js")
    assert not meta["has_values"] and "not available" in meta["value_note"]
    # no model, yet contexts are shaded: from the windows the profile kept (runs without them: test_report_shading)
    assert "kept by the profile" in meta["shade_note"] and "only the activating token" not in meta["shade_note"]
    assert not meta["gated"]
    d = load_data(plain_report_dir / "data" / "layer-0.js")
    assert d["shaded"] and "vt" not in d["neurons"][0] and "q" not in d["neurons"][0]
    assert all(len(ex) == 3 and ex[2] for ex in d["neurons"][0]["top"])
    neurons = load_data(plain_report_dir / "data" / "neurons.js")
    assert "val" not in neurons
    assert "not available" in (plain_report_dir / "index.html").read_text(encoding="utf-8")


def test_neuron_index(report_dir, report_run):
    run, _ = report_run
    cols = load_data(report_dir / "data" / "neurons.js")
    df = run.neurons
    assert cols["layer"] == df["layer"].tolist() and cols["neuron"] == df["neuron"].tolist()
    assert cols["rate"] == pytest.approx(df["firing_rate"].tolist(), rel=2e-3)
    # the magnitude columns the table sorts and filters by (τ = 10% of the neuron's max |m|)
    for key, column, digits in (("act", "active_10pct_maxabs", 3), ("pos", "pos_10pct_maxabs", 3),
                                ("neg", "neg_10pct_maxabs", 3), ("maxabs", "max_abs", 4),
                                ("act_err", "active_10pct_maxabs_err", 2)):
        assert cols[key] == pytest.approx(df[column].tolist(), rel=0.5 * 10 ** (1 - digits), abs=1e-12), key
    ids = run.tokens.ids
    assert [run.vocab[ids[i]] for i in df["top_index"]] == [run.vocab[t] for t in cols["trig"]]
    assert df["top_token"].tolist() == [run.vocab[t] for t in cols["trig"]]


def overview_figures(root: Path) -> tuple[list[str], dict[str, dict], list[str]]:
    """(section headings, {name: figure JSON} in page order, names in page order) of an overview page."""
    text = (root / "index.html").read_text(encoding="utf-8")
    heads = re.findall(r'<h2 class="section">(.*?)</h2>', text)
    figs = {m.group(1): json.loads(m.group(2)) for m in
            re.finditer(r'<script type="application/json" data-fig="fig-([\w-]+)">(.*?)</script>', text, re.S)}
    return heads, figs, list(figs)


def test_overview_puts_magnitude_first(report_dir, plain_report_dir, report_run):
    """Both families: the magnitude figures first (τ and token count in every title, max |m| on a log axis
    with its outliers named), the m > 0 figures below for comparison."""
    run, _ = report_run
    n = f"{run.manifest['corpus']['n_tokens']:,} tokens"
    for root, gated in ((report_dir, True), (plain_report_dir, False)):
        heads, figs, order = overview_figures(root)
        assert heads[0].startswith("Magnitude: |m| against τ = 10% of each neuron&#39;s max |m|")
        assert heads[1].startswith("For comparison: m &gt; 0")
        assert order[:6] == ["active_share", "dense_rare", "mass_l0", "max_abs", "mass_distribution", "mass_by_position"]
        assert order[6:] == ["firing_rate", "dead_dense", "l0", "l0_distribution"] + (["quadrants"] if gated else [])
        for name, fig in figs.items():
            title = fig["layout"]["title"]["text"]
            assert n in title, (name, title)
            if name in ("active_share", "dense_rare"):
                assert "τ = 10% of each neuron's max |m|" in title, name
            elif name.startswith("mass"):
                assert "50% / 90% of Σ" in title, name
            elif name in ("firing_rate", "dead_dense", "l0", "l0_distribution"):
                assert title.startswith("m > 0"), name
        # the active share stacks m > +τ and m < -τ per layer, with the bound as error bar
        bars = {tr["name"]: tr for tr in figs["active_share"]["data"]}
        layers = kvmem_layers(root)
        assert values(bars["m > +τ"]["y"]) == pytest.approx(layers["pos_10pct_maxabs"].tolist())
        assert values(bars["m < −τ"]["y"]) == pytest.approx(layers["neg_10pct_maxabs"].tolist())
        assert values(bars["m < −τ"]["error_y"]["array"]) == pytest.approx(layers["active_10pct_maxabs_err"].tolist())
        # mass-L0: mean bars per layer; the distribution heatmaps add up to every token of each layer
        means = [tr for tr in figs["mass_l0"]["data"] if tr["type"] == "bar"]
        assert values(means[0]["y"]) == pytest.approx(layers["mass50_mean"].tolist())
        assert values(means[1]["y"]) == pytest.approx(layers["mass90_mean"].tolist())
        for heat in figs["mass_distribution"]["data"]:
            z = np.array(values(heat["z"]), dtype=np.float64)
            assert z.sum(1) == pytest.approx(np.ones(len(layers)))
        # max |m|: log axis, the largest neurons named layer.neuron with their value
        fig = figs["max_abs"]
        assert fig["layout"]["yaxis"]["type"] == "log"
        named = [a["text"] for a in fig["layout"]["annotations"]]
        assert named and all(re.fullmatch(r"\d+\.\d+: [\d,.]+", t) for t in named)


def values(v) -> list:
    """A data array of a figure's JSON: a list, or plotly's {"dtype", "bdata"} (base64) for numpy arrays."""
    import base64

    if isinstance(v, dict):
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return a.reshape([int(x) for x in str(v["shape"]).split(",")]).tolist() if "shape" in v else a.tolist()
    return list(v)


def kvmem_layers(root: Path):
    """The layers table of the run a report was built from (report.json names it)."""
    import kvmem

    return kvmem.open_run(json.loads((root / "report.json").read_text())["run"]).layers


def test_figures_api(report_run):
    from kvmem.report import figures
    from kvmem.stats import HIST_EDGES

    run, _ = report_run
    d_mlp = run.manifest["model"]["d_mlp"]
    gen = np.random.default_rng(0)
    dist = {layer: {f: np.bincount(gen.integers(1, d_mlp, 300), minlength=d_mlp + 1) for f in (0.5, 0.9)}
            for layer in run.stats}
    by_pos = {layer: {f: np.r_[gen.uniform(1, d_mlp, 20), [np.nan] * 12] for f in (0.5, 0.9)} for layer in run.stats}
    figs = figures.layer_figures(run.layers, run.neurons, {k: s.l0_hist.numpy() for k, s in run.stats.items()},
                                 {"distribution": dist, "by_position": by_pos})
    assert set(figs) == {"active_share", "dense_rare", "mass_l0", "max_abs", "mass_distribution", "mass_by_position",
                         "firing_rate", "dead_dense", "l0", "l0_distribution", "quadrants"}
    for name, fig in figs.items():
        assert isinstance(fig, go.Figure) and fig.data, name
        assert "token" in fig.layout.title.text, name
    assert list(figs["firing_rate"].data[0].y) == pytest.approx(run.layers["firing_rate"].tolist())
    # mass-L0 distribution: per layer and share, the tokens in each range of counts add up to all of them
    heat = figs["mass_distribution"].data
    assert len(heat) == 2 and np.asarray(heat[1].z).sum(1) == pytest.approx(np.ones(len(dist)))
    # by position: log-spaced ranges 0, 1, 2–3, ..., 16–19 (the positions with tokens), means of the positions
    pos = figs["mass_by_position"].data[0]
    assert list(pos.x) == ["0", "1", "2–3", "4–7", "8–15", "16–31"]
    assert pos.z[0][3] == pytest.approx(by_pos[0][0.5][4:8].mean())
    assert pos.z[0][5] == pytest.approx(by_pos[0][0.5][16:20].mean())
    # mass-L0 per layer from the layers table (a stand-in frame where the run kept no mass statistic)
    layers = run.layers.assign(mass50_mean=3.0, mass50_median=2, mass50_p90=5, mass90_mean=9.0, mass90_median=8,
                               mass90_p90=12)
    fig = figures.mass_l0(layers)
    assert [tr.name for tr in fig.data if tr.type == "bar"] == ["mean, 50% of the mass", "mean, 90% of the mass"]
    assert "50% / 90% of Σ" in fig.layout.title.text and "tokens" in fig.layout.title.text
    hist = run.stats[0].hist[3].numpy()
    fig = figures.activation_histogram(HIST_EDGES.numpy(), hist)
    assert fig.data[0].y.sum() == hist.sum() == run.manifest["corpus"]["n_tokens"]
    q = run.stats[0].quadrant_count[3].numpy()
    assert np.asarray(figures.neuron_quadrants(q).data[0].y).sum() == pytest.approx(1.0)


def test_cli_report_and_prompt(tmp_path, report_run, tiny_dirs, capsys):
    import kvmem
    from kvmem.cli import main

    run, model = report_run
    out = tmp_path / "rep"
    assert main(["report", str(run.path), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files"] >= 8 and (out / "index.html").is_file()
    # refuses to overwrite a folder holding other things; a missing run is a one-line error
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert main(["report", str(run.path), "--out", str(tmp_path / "other")]) == 2
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["report", str(run.path), "--out", str(tmp_path / "neg"), "--examples", "-1"]) == 2
    assert "not a kvmem run" in capsys.readouterr().err
    # the prompt page joins the run's report and links neurons of profiled layers
    prompt = "The capital of France is"
    assert main(["report", str(tiny_dirs["llama"]), "--prompt", prompt, "--run", str(run.path), "--out", str(out),
                 "--device", "cpu", "--json"]) == 0
    page = Path(json.loads(capsys.readouterr().out)["page"])
    text = page.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="pdata">(.*?)</script>', text, re.S).group(1))
    assert data["linked_layers"] == run.profiled_layers
    assert data["tokens"] == model.token_strings(model.encode(prompt)[0])
    last = data["positions"][-1]
    res = kvmem.query(model, prompt, top=20)
    assert [(r["layer"], r["neuron"]) for r in last["top"]] == list(zip(res.neurons.layer, res.neurons.neuron))
    # per-layer ranking vs brute force: |m| * ||v|| at the last position
    cap = kvmem.run_capture(model, model.encode(prompt), layers=None, stop=False)
    for entry in last["layers"]:
        layer = entry["layer"]
        score = cap.coef[layer][0, -1].abs() * model.value_norms(layer)
        assert [r["neuron"] for r in entry["neurons"]] == score.topk(len(entry["neurons"])).indices.tolist()
