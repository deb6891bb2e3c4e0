"""``build_report(run, out)``: the offline HTML report of a profile run.

reports/NAME/
  index.html            overview: model card, per-layer figures (magnitude first: |m| against 10% of each
                        neuron's max |m|, mass-L0, max |m|; then m > 0 for comparison; figures.py,
                        overview.py), the neuron table with search
  neuron.html           one page for every neuron: neuron.html#17.1234 renders 17.1234 on demand
  static/plotly.min.js  plotly.js, once, from the installed plotly package (no CDN)
  static/report.js, static/report.css
  data/vocab.js         the token strings (KV.vocab = [...])
  data/neurons.js       the overview table, columnar
  data/meta.js          run facts the neuron page needs (KV.meta = {...})
  data/layer-L.js       everything the neuron page shows for the neurons of layer L, loaded with a
                        <script> tag when a neuron of L is opened (with the run's descriptions and
                        their scores, kvmem.report.explained, where kvmem explain wrote some)
  report.json           written last: the run, kvmem version, files, notes, seconds per stage
neurons.js and layer-L.js hold gzip-compressed JSON as base64 (KV.addPacked(name, "...")), inflated
by the browser's DecompressionStream: 4-6x smaller than the JSON.
Data files are scripts, not JSON, because a page opened from file:// may not fetch() files. All
corpus and vocabulary text is JSON-escaped for <script> (see data.safe_json) and inserted by the
page's JS with textContent only; the HTML itself comes from jinja2 templates with autoescape.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import plotly.io as pio

import kvmem
from kvmem.atomic import MARKER, check_target, staged, write_file, write_json, write_text
from kvmem.report import data as rdata
from kvmem.report import explained, figures, overview, routing

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

STATIC = ("report.js", "report.css")
REPORT_FILE, REPORT_FORMAT = "report.json", "kvmem-report/1"
LEGACY_FILES = ("index.html", "static/report.js", "data/meta.js")
MAGNITUDE_TITLE = "Magnitude: |m| against τ = 10% of each neuron's max |m|, and mass-L0"
SIGN_TITLE = "For comparison: m > 0 (firing = coefficient > 0)"


@dataclass
class Report:
    path: Path
    pages: list[str]
    bytes: int
    files: int
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0
    stages: dict = field(default_factory=dict)  # seconds per stage: value_projection, shading, writing, total

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


def env() -> jinja2.Environment:
    e = jinja2.Environment(loader=jinja2.PackageLoader("kvmem.report", "templates"),
                           autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                           undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    e.filters["safe_json"] = lambda obj: jinja2.utils.markupsafe.Markup(rdata.safe_json(obj))
    return e


def figure_json(fig) -> dict:
    return json.loads(pio.to_json(fig, validate=False))


def write_static(out: Path) -> None:
    """plotly.min.js (from the installed plotly), report.js and report.css into out/static."""
    from plotly.offline import get_plotlyjs

    static = out / "static"
    static.mkdir(parents=True, exist_ok=True)
    target = static / "plotly.min.js"
    js = get_plotlyjs()
    if not target.is_file() or target.stat().st_size != len(js.encode()):
        write_text(target, js)  # atomic: prompt pages add their static files to a finished report
    src = resources.files("kvmem.report") / "static"
    for name in STATIC:
        data = (src / name).read_bytes()
        write_file(static / name, lambda p, data=data: p.write_bytes(data))


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def values_note(family: str, model: KVModel | None = None) -> str:
    """What the value side projects, for the run's model (its layers, where given) or its family (the adapters'
    declared norm placement)."""
    from kvmem.models.registry import adapters

    post = (any(lay.post_norm is not None for lay in model.layers) if model is not None
            else any(cls.family == family and cls.placement == "post-ffn" for cls in adapters().values()))
    if post:
        return ("(γ ⊙ v_i) · W_U, no final norm: what neuron i writes per unit of m_i, γ ⊙ v_i behind a post-FFN "
                "norm (v_i centred first under a LayerNorm; the token's 1/σ scale left out: it is positive)")
    if family == "granite":
        return "(residual multiplier · v_i) · W_U, no final norm: what neuron i writes per unit of m_i"
    return "v_i · W_U, no final norm"


def load_projection(run: Run, model: KVModel | None = None, k: int = 10):
    """The value projection for the run's model: computed with ``model`` if given (and cached), else
    read from the vocab cache; None (and the reason) if neither is possible."""
    from kvmem import vocab

    if model is not None:
        run.check_model(model, "the model given to the report")
        note = values_note(run.manifest["model"].get("family", ""), model)
        return vocab.project_values(model, k=k), f"computed from the model's weights ({note})"
    import torch

    m = run.manifest["model"]
    dtype = getattr(torch, str(m.get("dtype", "float32")).removeprefix("torch."), torch.float32)
    proj = vocab.cached_projection(m["model"], m["fingerprint"], dtype, False, k)
    if proj is None:
        return None, ("not available: this report was built without the model and no cached value "
                      "projection was found (run `kvmem vocab` or pass --model to `kvmem report`)")
    return proj, f"read from the cached value projection ({values_note(m.get('family', ''))})"


def build_report(run: Run | str | Path, out, *, model: KVModel | None = None,
                 options: rdata.ReportOptions | None = None, force: bool = False,
                 progress=None) -> Report:
    """Write the report of ``run`` (a Run or a run folder) into ``out``; return what was written.
    With ``model`` (the run's model) the value side is computed from its weights.

    The report is built in ``OUT.partial`` and swapped onto ``out`` when complete (kvmem.atomic): a
    kill or an error leaves ``out`` as it was, and a re-run replaces its own unfinished folder. An
    ``out`` that holds a finished kvmem report is replaced (its prompt pages are carried over); one
    that holds anything else is refused unless ``force``. ``report.json`` (written last) records
    what was built and the seconds of each stage."""
    t0 = time.perf_counter()
    from kvmem.profile.run import Run

    if not isinstance(run, Run):
        run = kvmem.open_run(run)
    opts = options or rdata.ReportOptions()
    target = Path(out)
    check_target(target, is_report, force=force)
    stages: dict[str, float] = {}
    with staged(target, "report") as tmp:
        if is_report(target):  # prompt pages joined to the old report stay with the new one
            for page in target.glob("prompt-*.html"):
                shutil.copy2(page, tmp / page.name)
        rep = _write_report(run, tmp, model, opts, progress, stages)
        stages["total"] = time.perf_counter() - t0
        rep.seconds, rep.stages = stages["total"], {k: round(v, 3) for k, v in stages.items()}
        write_json(tmp / REPORT_FILE, {"format": REPORT_FORMAT, "run": str(run.path), "kvmem_version": kvmem.__version__,
                                       "model": run.manifest["model"]["model"], "with_model": model is not None,
                                       "files": rep.files, "bytes": rep.bytes, "notes": rep.notes,
                                       "stages": rep.stages})
    rep.path = target
    return rep


def is_report(path: Path) -> bool:
    """Whether ``path`` holds a finished kvmem report (``report.json``; before kvmem 0.2: index.html
    beside static/report.js and data/meta.js)."""
    path = Path(path)
    return (path / REPORT_FILE).is_file() or all((path / p).is_file() for p in LEGACY_FILES)


def _write_report(run, out: Path, model, opts, progress, stages: dict) -> Report:
    t0 = time.perf_counter()
    write_static(out)
    m, corpus, settings = run.manifest["model"], run.manifest["corpus"], run.manifest["settings"]
    projection, value_note = load_projection(run, model, k=max(opts.n_vocab, 3))
    stages["value_projection"] = time.perf_counter() - t0
    vocab = list(run.vocab)
    if projection is not None and projection.strings is not None and len(projection.strings) > len(vocab):
        vocab += [str(s) for s in projection.strings[len(vocab):]]
    elif projection is not None:
        hi = int(max(projection["top_ids"].max(), projection["bottom_ids"].max())) + 1
        vocab += [f"<id {i}>" for i in range(len(vocab), hi)]
    _script(out / "data" / "vocab.js", f"KV.vocab = {rdata.safe_json(vocab)};\n")
    table = rdata.neuron_index(run, projection, opts.n_vocab) | overview.neuron_columns(run.neurons)
    if run.moe:  # expert neuron ids (L.eE.N) for the overview table
        table["id"] = run.neurons["id"].astype(str).tolist()
    described = run.explanations  # kvmem explain's descriptions and scores (empty: none)
    entries = explained.by_neuron(described)
    if entries:
        table |= explained.overview_columns(described, table["layer"], table["neuron"])
    _script(out / "data" / "neurons.js", f'KV.addPacked("neurons", "{rdata.packed(table)}");\n')

    stats, store = run.stats, run.tokens
    from kvmem.report.shade import context_shading

    # the context windows the profile kept; the model is re-run only for examples they do not cover
    examples = {layer: rdata.layer_examples(s, store, opts) for layer, s in stats.items()}
    shading, shade_note = context_shading(run, examples, opts.before, opts.after, model, opts.rerun_tokens)
    stages["shading"] = time.perf_counter() - t0 - stages["value_projection"]
    for layer, s in stats.items():
        side = rdata.vocab_side(projection, layer, opts.n_vocab) if projection is not None else None
        payload = rdata.layer_payload(layer, s, store, opts, vocab_side=side,
                                      shading=shading.per_layer.get(layer) if shading else None)
        facts = routing.layer_facts(run, layer)  # MoE layers: each neuron's expert and its tokens
        if facts is not None:
            payload["moe"] = facts
        explained.attach(payload, layer, entries)
        _script(out / "data" / f"layer-{int(layer)}.js", f'KV.addPacked("layer-{int(layer)}", "{rdata.packed(payload)}");\n')
        if progress is not None:
            progress(layer)

    from kvmem.stats.hist import HIST_EDGES

    n_tokens = int(corpus["n_tokens"])
    meta = {
        "model": m["model"], "n_layers": m["n_layers"], "d_mlp": m["d_mlp"], "gated": bool(m["gated"]),
        "layers": [int(x) for x in run.profiled_layers], "n_tokens": n_tokens, "n_docs": int(corpus.get("n_docs", 0)),
        "top_k": int(settings["top_k"]), "edges": [float(x) if abs(float(x)) != float("inf") else None
                                                   for x in HIST_EDGES.tolist()],
        "value_note": value_note, "has_values": projection is not None, "shade_note": shade_note,
        "gated_note": rdata_gated_note() if m["gated"] else "",
        "explain_note": explained.NOTE if entries else "",
    }
    _script(out / "data" / "meta.js", f"KV.meta = {rdata.safe_json(meta)};\n")

    layers_df, neurons_df = run.layers, run.neurons
    figs = figures.layer_figures(layers_df, neurons_df, rdata.l0_hists(run), overview.mass_data(run))
    sections = [(title, [(name, figure_json(figs[name]), name in figures.WIDE) for name in names if name in figs])
                for title, names in ((MAGNITUDE_TITLE, figures.MAGNITUDE), (SIGN_TITLE, figures.SIGN))]
    card = [("model", m["model"]), ("family", f"{m['family']} ({m['model_type']})"), ("layers", m["n_layers"]),
            ("d_model", f"{m['d_model']:,}"), ("d_mlp", f"{m['d_mlp']:,}"),
            ("activation", f"{m['activation']}{' (gated FFN)' if m['gated'] else ''}"),
            ("profiled layers", _ranges(run.profiled_layers)),
            ("corpus", corpus.get("description") or corpus.get("source")),
            ("tokens", f"{n_tokens:,} in {int(corpus.get('n_docs', 0)):,} documents (seq_len {settings['seq_len']})"),
            ("run time", _duration(run.manifest["time"]["seconds"])
             + (f" ({run.manifest['time']['tokens_per_second']:,.0f} tokens/s)"
                if run.manifest["time"].get("tokens_per_second") else "")),
            ("kvmem", run.manifest.get("kvmem_version", "?"))]
    if run.moe:  # mixture of experts: the layout and what its neuron figures are relative to
        moe = run.manifest["moe"]
        card.insert(5, ("experts", f"{moe['n_experts']} routed (top-{moe.get('top_k')}) + {moe.get('n_shared', 0)} shared "
                                   f"in MoE layers {_ranges(run.moe_layers)}; their neuron figures are of the tokens "
                                   "routed to each neuron's expert"))
    t = env()
    common = {"title": m["model"], "version": kvmem.__version__, "n_tokens": n_tokens}
    (out / "index.html").write_text(t.get_template("index.html").render(
        **common, card=card, sections=sections, gated=bool(m["gated"]), value_note=value_note,
        has_findings=(Path(run.path) / "analysis" / "findings.json").is_file(),
        has_values=projection is not None, n_search=opts.n_vocab, d_mlp=m["d_mlp"], n_neurons=len(neurons_df),
        top_k=settings["top_k"], routing_pages=[(int(x), routing.page_name(x)) for x in run.moe_layers],
        has_explanations=bool(entries)), encoding="utf-8")
    (out / "neuron.html").write_text(t.get_template("neuron.html").render(**common), encoding="utf-8")
    from kvmem.report.findings import findings_page

    pages = ["index.html", "neuron.html"] + [p for p in [findings_page(run, out, t, figure_json)] if p]
    pages += routing.routing_pages(run, out, t, figure_json, common)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != MARKER]
    stages["writing"] = time.perf_counter() - t0 - stages["value_projection"] - stages["shading"]
    return Report(out, pages, sum(p.stat().st_size for p in files), len(files) + 1,
                  {"values": value_note, "shading": shade_note}, time.perf_counter() - t0)


def rdata_gated_note() -> str:
    from kvmem.vocab import GATED_NOTE

    return GATED_NOTE


def _ranges(layers) -> str:
    layers = sorted(int(x) for x in layers)
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}–{x}")
            start = None
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
