"""Corpus commands: ``kvmem profile``, ``kvmem merge``, ``kvmem top``, ``kvmem rank``."""

from __future__ import annotations

import time
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from kvmem.cli import app
from kvmem.cli.common import DeviceOpt, DtypeOpt, JsonOpt, console, err_console, handle_errors, print_json
from kvmem.errors import KvmemError
from kvmem.models.load import DEFAULT_MODEL

STAGES = ("load", "tokenize", "profile", "value_projection", "writing")  # the order they run in
# kvmem rank --by: the neuron table's column each choice sorts by
RANK_BY = {"active": "active_10pct_maxabs", "pos": "pos_10pct_maxabs", "neg": "neg_10pct_maxabs", "maxabs": "max_abs",
           "max": "max", "mean": "mean", "rate": "firing_rate"}
RunArg = Annotated[Path, typer.Argument(help="A run folder written by kvmem profile.")]


def _config(config: Path | None, **given):
    """ProfileConfig from a TOML file in configs/ (optional) overridden by the options given."""
    from kvmem.profile.runner import ProfileConfig

    values = {}
    if config is not None:
        try:
            values = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise KvmemError(f"config {config}: {e}") from None
        known = {f.name for f in fields(ProfileConfig)}
        unknown = set(values) - known
        if unknown:
            raise KvmemError(f"config {config}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    values.update({k: v for k, v in given.items() if v is not None})
    if isinstance(values.get("layers"), list):
        values["layers"] = tuple(values["layers"])
    return ProfileConfig(**values)


class TokensPerSecond(ProgressColumn):
    """Tokens per second over this session (rich's own speed column averages a short window)."""

    def render(self, task) -> Text:
        done = task.completed - task.fields.get("resumed_from", 0)
        return Text(f"{done / task.elapsed:,.0f} tok/s" if task.elapsed and done else "… tok/s")


def _progress_bar(progress: Progress):
    def factory(total: int, done: int):
        task = progress.add_task("profiling", total=total, completed=done, resumed_from=done)

        def advance(n: int) -> None:
            progress.advance(task, n)
            if progress.tasks[task].finished:  # freeze its clock and rate: later stages are not the pass
                progress.stop_task(task)

        return advance

    return factory


@app.command()
@handle_errors
def profile(
    model: Annotated[str | None, typer.Argument(help=f"Model spec (default {DEFAULT_MODEL}).")] = None,
    corpus: Annotated[str | None, typer.Option(help="pydoc (default), FILE.txt, FOLDER, FILE.jsonl, FILE.parquet, hf:NAME[:CONFIG[:SPLIT]]")] = None,
    tokens: Annotated[int | None, typer.Option(help="Stop after this many tokens (default: the whole corpus).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = Path("runs/default"),
    seq_len: Annotated[int | None, typer.Option(help="Tokens per model input row, the BOS included (default 512).")] = None,
    rows: Annotated[str | None, typer.Option(help="doc (default): every row inside one document, the tokenizer's BOS first; stream: the legacy cut of the token stream across documents, no BOS.")] = None,
    bos: Annotated[str | None, typer.Option(help="Token opening every document row: auto (default: the tokenizer's BOS, none if it has none), none, or a token such as '<|endoftext|>'.")] = None,
    keep_first: Annotated[bool, typer.Option("--keep-first", help="Keep row position 0 (the attention sink) in the statistics where it is a corpus token: rows without a BOS (--bos none, tokenizers without one, --rows stream). The BOS itself is never counted.")] = False,
    batch_size: Annotated[int | None, typer.Option(help="Rows per forward pass (default: auto).")] = None,
    layers: Annotated[str | None, typer.Option(help="Layers to profile, e.g. 0-5,20 (default all).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Examples kept per neuron per store (default 20).")] = None,
    text_field: Annotated[str | None, typer.Option(help="Text field of .jsonl/.parquet/hf corpora.")] = None,
    checkpoint_every: Annotated[float | None, typer.Option(help="Seconds between checkpoints (default 300).")] = None,
    shard: Annotated[str | None, typer.Option(help="I/N: profile only the I-th of N blocks of rows; kvmem merge joins them.")] = None,
    config: Annotated[Path | None, typer.Option(help="A TOML run config, e.g. configs/smollm2-pydoc.toml.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace whatever --out holds.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: Annotated[str | None, typer.Option(help="auto: spread a model too large for one GPU over the visible GPUs (accelerate), each layer's statistics on its GPU; with torchrun give each rank its GPUs by CUDA_VISIBLE_DEVICES.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the statistics update (GPU runs; the first batches pay the compilation).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Profile every FFN neuron over a corpus in one streaming pass: top examples, firing rates, histograms."""
    from kvmem.neurons import parse_layers
    from kvmem.profile.job import profile as run_profile
    from kvmem.profile.job import load_model

    cfg = _config(config, model=model, corpus=corpus, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                  top_k=top_k, text_field=text_field, checkpoint_every=checkpoint_every, shard=shard, device=device,
                  dtype=dtype, rows=rows, bos=bos, skip_first=False if keep_first else None, device_map=device_map,
                  compile=compile or None)
    cfg.validate()
    stages, notes = {}, []
    t = time.perf_counter()
    with err_console.status(f"loading {cfg.model} ..."):
        kv = load_model(cfg)
    stages["load"] = time.perf_counter() - t
    if layers is not None:
        from dataclasses import replace

        cfg = replace(cfg, layers=tuple(parse_layers(layers, kv.n_layers)))
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"),
               TokensPerSecond(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        run = run_profile(cfg, out, resume=resume, force=force, model=kv, progress_factory=_progress_bar(bar),
                          stages=stages, notes=notes)
    for note in notes:
        err_console.print(note, markup=False, highlight=False)
    if run is None:  # a torchrun rank other than 0: rank 0 reports
        return
    summary = run_summary(run)
    if json_out:
        return print_json(summary)
    print_summary(run, summary)


def run_summary(run) -> dict:
    m = run.manifest
    layers = run.layers
    return {
        "out": str(run.path),
        "model": m["model"]["model"],
        "tokens": m["corpus"]["n_tokens"],
        "layout": m.get("layout"),
        "docs": m["corpus"]["n_docs"],
        "seconds": m["time"]["seconds"],
        "tokens_per_second": m["time"]["tokens_per_second"],
        "ran_out": m["corpus"]["ran_out"],
        "invalid_utf8_docs": m["corpus"]["invalid_utf8_docs"],
        "stages": m["time"].get("stages", {}),
        "layers": layers.to_dict(orient="records"),
    } | ({"routing": [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
                      for r in run.routing.to_dict(orient="records")]} if run.moe else {})


def print_summary(run, s: dict) -> None:
    if s["ran_out"]:
        console.print(f"the corpus ended after {s['tokens']:,} tokens (fewer than --tokens asked for)")
    if s["invalid_utf8_docs"]:
        console.print(f"{s['invalid_utf8_docs']} documents held invalid UTF-8 (decoded with replacement characters)")
    console.print(f"profiled {s['tokens']:,} tokens in {s['docs']:,} documents in {s['seconds']:.1f} s "
                  f"({s['tokens_per_second']:,.0f} tokens/s) -> {s['out']}", markup=False, highlight=False)
    lay = s.get("layout")
    if lay:
        first = f"BOS (id {lay['bos_id']}) + {lay['seq_len'] - 1}" if lay.get("bos_id") is not None else str(lay["seq_len"])
        kind = "tokens of one document (padded, masked)" if lay.get("doc_rows") else "tokens of the stream"
        skip = "; row position 0 not counted" if lay.get("skip_first") else ""
        console.print(f"rows: {first} {kind}{skip}", markup=False, highlight=False)
    if s["stages"]:
        order = sorted(s["stages"], key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
        console.print("stages: " + ", ".join(f"{k.replace('_', ' ')} {s['stages'][k]:.1f} s" for k in order),
                      markup=False, highlight=False)
    for table in layer_tables(run, console):
        console.print(table)
    for line in routing_lines(run):
        console.print(line, markup=False, highlight=False)


def routing_lines(run) -> list[str]:
    """One line per MoE layer: the router entropy and the busiest and idlest experts' load with intervals."""
    if not run.moe:
        return []
    out, layers = [], run.layers.set_index("layer")
    for layer in run.moe_layers:
        t = run.routing[run.routing["layer"] == layer]
        if not len(t):
            continue
        hi, lo, row = t.loc[t["share"].idxmax()], t.loc[t["share"].idxmin()], layers.loc[layer]
        out.append(f"layer {layer} routing over {int(t['n'].iloc[0]):,} tokens: router entropy "
                   f"{row['router_entropy_mean']:.3f} of max {row['router_entropy_max']:.3f} nats; busiest expert "
                   f"e{int(hi['expert'])} {hi['share']:.1%} [{hi['share_lo']:.1%}, {hi['share_hi']:.1%}], idlest "
                   f"e{int(lo['expert'])} {lo['share']:.1%} [{lo['share_lo']:.1%}, {lo['share_hi']:.1%}] of tokens "
                   f"(even: {t['uniform'].iloc[0]:.1%}; 95% Wilson intervals)")
    return out


def _share(x: float) -> str:
    return "–" if x != x else f"{x:.1%}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def layer_tables(run, console: Console) -> list[Table]:
    """The closing summary, one row per layer. Every family gets the magnitude figures (τ = 10% of each
    neuron's max |m|, mass-L0); ReLU/GELU models also the m > 0 figures, beside them when the console is
    wide enough for both, else in a second table below. Gated FFNs get no m > 0 columns: their coefficients
    are sign-symmetric, m > 0 holds for about half of all tokens, and the title says so (the figures stay in
    layers.parquet). Every header states its threshold; numbers never wrap (narrow terminals fold headers)."""
    gated = bool(run.manifest["model"]["gated"])
    layers = run.layers
    d_mlp = int(layers["d_mlp"].max()) if len(layers) else 0
    has_mass = bool(layers["mass50_mean"].notna().any())
    magnitude = ["active\n|m|>10%\nmax|m|\n±bound", "m>+10%\nmax|m|", "m<−10%\nmax|m|", "dense/\nrare\n|m|>10%\n>50/<1%"]
    if has_mass:
        magnitude += ["mass-L0\n50%\nmean", "mass-L0\n90%\nmean"]
    magnitude += ["max\n|m|", "neuron"]
    sign = [] if gated else ["firing\nm>0", "dead\nnever\nm>0", "mean\nL0\nm>0"]
    n = int(layers["n_tokens"].max()) if len(layers) else 0
    title = (f"per layer, over {n:,} tokens: active = |m| > τ, τ = 10% of each neuron's max |m| (shares from the "
             f"histogram, ± their bound, in points); dense/rare: neurons active on > 50% / < 1% of tokens; mass-L0 = "
             f"neurons (of {d_mlp:,}) carrying 50% / 90% of Σ|m_i|·‖v_i‖ at a token")
    if gated and len(layers):
        title += (f"; gated FFN, sign-symmetric: m > 0 holds on {layers['firing_rate'].min():.1%}–"
                  f"{layers['firing_rate'].max():.1%} of tokens in every layer (the m > 0 figures are in layers.parquet)")
    else:
        title += f"; firing = m > 0 (exact), dead = never m > 0, L0 = neurons with m > 0 at a token (of {d_mlp:,})"
    rows = []
    for row in layers.itertuples():
        cells = [str(row.layer), f"{100 * row.active_10pct_maxabs:.1f}±{100 * row.active_10pct_maxabs_err:.1f}%",
                 _share(row.pos_10pct_maxabs), _share(row.neg_10pct_maxabs), f"{row.dense_10pct}/{row.rare_10pct}"]
        if has_mass:
            cells += [_mass(row.mass50_mean), _mass(row.mass90_mean)]
        cells += [_num(row.max_abs_activation), row.max_abs_neuron]
        if not gated:
            cells += [_share(row.firing_rate), str(row.dead), f"{row.l0_mean:,.0f}"]
        rows.append(cells)

    def table(text: str, picked: list[int]) -> Table:
        t = Table(title=text, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        headers = ["layer"] + magnitude + sign
        for j in picked:
            t.add_column(headers[j], justify="left" if j == 0 else "right", no_wrap=False,
                         min_width=max([len(r[j]) for r in rows] + [5 if j == 0 else 4]))
        for cells in rows:
            t.add_row(*[cells[j] for j in picked])
        return t

    every = list(range(1 + len(magnitude) + len(sign)))
    whole = table(title, every)
    if gated or Measurement.get(console, console.options.update_width(10_000), whole).maximum <= console.width:
        return [whole]
    first = list(range(1 + len(magnitude)))
    return [table(title, first), table("m > 0, for comparison", [0] + every[len(first):])]


def _mass(mean: float) -> str:
    return "–" if mean != mean else f"{mean:,.0f}"


@app.command()
@handle_errors
def merge(
    runs: Annotated[list[Path], typer.Argument(help="Runs over disjoint token streams, in order.")],
    out: Annotated[Path, typer.Option(help="Folder for the merged run.")],
    force: Annotated[bool, typer.Option("--force", help="Replace whatever --out holds.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge runs (e.g. shards of one corpus) into the run one pass over all of them would give."""
    from kvmem.profile.job import merge as run_merge

    run = run_merge(runs, out, force=force)
    summary = run_summary(run)
    if json_out:
        return print_json(summary)
    print_summary(run, summary)


@app.command()
@handle_errors
def top(
    run: RunArg,
    neuron: Annotated[str, typer.Argument(help="The neuron, LAYER.NEURON (e.g. 17.1234; MoE layers: 12.e3.45, 12.s0.45).")],
    kind: Annotated[str, typer.Option(help="top (per token), top_docs (one per document), bottom (most negative m), sample.")] = "top",
    before: Annotated[int, typer.Option(help="Context tokens shown before the activating token.")] = 12,
    after: Annotated[int, typer.Option(help="Context tokens shown after it.")] = 4,
    json_out: JsonOpt = False,
) -> None:
    """A neuron's top examples with their context, the activating token marked."""
    from kvmem.profile.run import open_run

    r = open_run(run)
    layer, n = r.neuron(neuron)
    label = r.neuron_label(layer, n)  # L.N, or L.eE.N for an expert neuron of an MoE layer
    df = r.examples(layer, n, kind, before=before, after=after)
    if json_out:
        return print_json({"neuron": label, "kind": kind, "examples": df.to_dict(orient="records")})
    table = Table("#", "m", "doc", "context (activating token in brackets)", title=f"{label}: {kind} examples")
    for row in df.itertuples():
        text = Text()
        for j, tok in enumerate(row.context):
            shown = tok.replace("\n", "⏎")
            text.append(f"[{shown}]" if j == row.at else shown, style="bold reverse" if j == row.at else None)
        table.add_row(str(row.rank), f"{row.value:+.3f}", str(row.doc), text)
    console.print(table)


@app.command()
@handle_errors
def rank(
    run: RunArg,
    by: Annotated[str, typer.Option(help="active (share of tokens with |m| > 10% of the neuron's max |m|), pos (m > +10%), "
                                         "neg (m < -10%), maxabs (max |m|), max (top m), mean, rate (m > 0), or "
                                         "score (of kvmem explain's descriptions: see --scorer).")] = "max",
    top_n: Annotated[int, typer.Option("--top", help="How many neurons.")] = 20,
    layers: Annotated[str | None, typer.Option(help="Only these layers, e.g. 0-5.")] = None,
    scorer: Annotated[str, typer.Option(help="With --by score: detection, fuzzing, simulation or value.")] = "detection",
    explainer: Annotated[str | None, typer.Option(help="With --by score: whose descriptions (default: the LLM "
                                                       "explainer with the most rows, else baseline).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """The neurons of a run ranked by a magnitude share, max |m|, max or mean activation, firing rate, or the
    score of their descriptions (kvmem explain / kvmem score)."""
    from kvmem.neurons import parse_layers
    from kvmem.profile.run import open_run

    column = RANK_BY.get(by)
    if column is None and by != "score":
        raise KvmemError(f"--by must be one of {', '.join(RANK_BY)}, score, not {by!r}")
    r = open_run(run)
    chosen = parse_layers(layers, r.manifest["model"]["n_layers"])
    if by == "score":
        from kvmem.cli.explain import rank_by_score

        return rank_by_score(r, top_n, chosen, scorer, explainer, json_out)
    df = r.neurons
    if chosen is not None:
        df = df[df.layer.isin(chosen)]
    df = df.sort_values([column, "layer", "neuron"], ascending=[False, True, True]).head(top_n)
    cols = ["id", "layer", "neuron", "max_abs", "active_10pct_maxabs", "active_10pct_maxabs_err", "pos_10pct_maxabs",
            "neg_10pct_maxabs", "max", "mean", "firing_rate", "top_token", "top_context"]
    if json_out:
        return print_json({"by": by, "column": column, "neurons": df[cols].to_dict(orient="records")})
    table = Table("neuron", "max |m|", "active\n|m|>10% max|m|", "m>+10%\nmax|m|", "m<−10%\nmax|m|", "max m", "mean m",
                  "firing\nm>0", "top example", title=f"top {len(df)} neurons by {by} ({column})")
    for row in df.itertuples():
        table.add_row(row.id, _num(row.max_abs), f"{row.active_10pct_maxabs:.2%} ±{row.active_10pct_maxabs_err:.2%}",
                      f"{row.pos_10pct_maxabs:.2%}", f"{row.neg_10pct_maxabs:.2%}", f"{row.max:.3g}", f"{row.mean:.3g}",
                      f"{row.firing_rate:.2%}", Text(row.top_context.replace("\n", "⏎")))
    console.print(table)
