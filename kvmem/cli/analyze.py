"""Analysis commands: ``kvmem analyze RUN`` and ``kvmem compare RUN RUN ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from kvmem.cli import app
from kvmem.cli.common import DeviceOpt, DtypeOpt, JsonOpt, console, err_console, handle_errors, print_json

RunArg = Annotated[Path, typer.Argument(help="A run folder written by kvmem profile.")]

# (analysis table, columns shown, format) per measure, in the order printed
SHOWN = {
    "agreement": ("agreement_layers", ["agree_top1", "base_top1", "agree_topk", "base_topk", "agree_ex1",
                                          "agree_neg_top1", "base_neg_top1"], "{:.1%}"),
    "lexical": ("lexical_layers", ["same_token", "base_same_token", "same_bigram", "base_same_bigram", "kept_1",
                                   "kept_2", "retain_1", "retain_2"], "{:.2f}"),
    "sparsity": ("sparsity_layers", ["active_gt0", "active_gt1pct_max", "active_gt10pct_max", "abs_gt_1x_mean",
                                     "abs_gt_10x_mean", "carry50_mean", "carry90_mean"], "{:.3g}"),
    "composition": ("composition_layers", ["novel_top10", "chance_top10", "novel_all", "top1_agrees", "keep",
                                           "promotion", "elimination"], "{:.1%}"),
    "knockouts": ("knockouts_layers", None, "{:+.4f}"),
}


def _table(name: str, df, cols, fmt: str, title: str) -> Table:
    cols = cols or [c for c in df.columns if c not in ("layer", "baseline_loss", "n_tokens")]
    cols = [c for c in cols if c in df.columns]
    table = Table("layer", *cols, title=Text(title))
    for _, row in df.iterrows():
        table.add_row(str(int(row.layer)), *("—" if row[c] != row[c] else fmt.format(row[c]) for c in cols))
    return table


def _title(measure: str, meta: dict) -> str:
    n = meta.get("n_tokens")
    extra = {"agreement": f"value top-k, k={meta.get('k')}; baseline: derangement ({meta.get('n_perm')} draws)",
             "lexical": "baseline base_*: random positions; kept_L: share keeping >= 50% with L context tokens",
             "sparsity": f"maxima: {meta.get('maxima')}; carry: neurons for 50%/90% of sum |m|·‖v‖",
             "composition": f"top {meta.get('top_sub_updates')} sub-updates; chance_top10 is the baseline",
             "knockouts": f"loss increase (nats/token) over baseline {meta.get('baseline_loss', float('nan')):.4f}; "
                          f"k = {meta.get('ks')}"}.get(measure, "")
    return f"{measure} — {n:,} tokens — {extra}" if n is not None else measure


@app.command()
@handle_errors
def analyze(
    run: RunArg,
    model: Annotated[str | None, typer.Option(help="Model spec (default: the one in the run's manifest).")] = None,
    tokens: Annotated[int, typer.Option(help="Corpus tokens (from the run's token store) for sparsity and co-activation.")] = 20000,
    knockout_tokens: Annotated[int, typer.Option(help="Tokens for the knock-out losses (at most --tokens).")] = 4096,
    composition_tokens: Annotated[int, typer.Option(help="Tokens for the composition measure (at most --tokens).")] = 1024,
    measures: Annotated[str, typer.Option(help="Comma-separated subset of: sparsity, coactivation, composition, knockouts, agreement, lexical.")] = "",
    layers: Annotated[str, typer.Option(help="Analyze only these profiled layers, e.g. '0-5,20' (default: all profiled).")] = "",
    knockout_k: Annotated[str, typer.Option(help="Neurons zeroed per layer in the top-k knock-outs, e.g. '15,153' (default: 1% and 10% of d_mlp).")] = "",
    neurons: Annotated[str, typer.Option(help="Co-activation query neurons, e.g. '3.17,5.2' (default: each layer's highest-max neuron).")] = "",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Key-value memory analyses of a run: agreement, lexical keys, sparsity, composition, knock-outs; writes RUN/analysis/."""
    import kvmem
    from kvmem.analysis.analyze import MEASURES, analyze as run_analyze, steps
    from kvmem.errors import KvmemError

    r = kvmem.open_run(run)
    chosen = [m.strip() for m in measures.split(",") if m.strip()] or list(MEASURES)
    bad = [m for m in chosen if m not in MEASURES]
    if bad:
        raise KvmemError(f"unknown measure {bad[0]!r}; choose from {', '.join(MEASURES)}")
    for name, value in (("--tokens", tokens), ("--knockout-tokens", knockout_tokens),
                        ("--composition-tokens", composition_tokens)):
        if value < 2:
            raise KvmemError(f"{name} must be at least 2")
    spec = model or r.model_spec
    with err_console.status(f"loading {spec} ..."):
        kv = kvmem.load(spec, device=device, dtype=dtype)
    queries = [n.strip() for n in neurons.split(",") if n.strip()] or None
    from kvmem.neurons import parse_layers

    chosen_layers = parse_layers(layers, kv.n_layers) if layers.strip() else None
    try:
        ks = [int(k) for k in knockout_k.split(",") if k.strip()] or None
    except ValueError:
        raise KvmemError(f"--knockout-k must be integers separated by commas, not {knockout_k!r}") from None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task("analyzing", total=steps(chosen, len(chosen_layers or r.profiled_layers)))

        def tick(label: str) -> None:
            bar.update(task, advance=1, description=f"done: {label}")

        out = run_analyze(r, kv, tokens=tokens, knockout_tokens=knockout_tokens,
                          composition_tokens=composition_tokens, measures=chosen, coactivation_neurons=queries,
                          layers=chosen_layers, knockout_ks=ks, progress=tick)
    results = {k: v for k, v in out.items() if k != "findings"}
    if json_out:
        return print_json({"run": str(r.path), "analysis": str(r.analysis_dir),
                           "measures": {k: v.meta for k, v in results.items()},
                           "tables": {f"{k}_{t}": df.to_dict(orient="records") for k, v in results.items()
                                      for t, df in v.tables.items() if t in ("layers", "model", "partners")},
                           "findings": out["findings"]})
    for measure, (_, cols, fmt) in SHOWN.items():
        if measure in results:
            res = results[measure]
            console.print(_table(measure, res["layers"], cols, fmt, _title(measure, res.meta)))
    if "coactivation" in results:
        res = results["coactivation"]
        df = res["partners"]
        table = Table("query", "partner", "jaccard", "P(partner|query)", "lift", "co-fires",
                      title=Text(f"co-activation — {res.meta['n_tokens']:,} tokens — firing: {res.meta['firing']}; "
                                 "lift 1 = independent"))
        for row in df[df["rank"] < 3].itertuples():
            table.add_row(row.query, row.partner, f"{row.jaccard:.2f}", f"{row.p_given:.2f}", f"{row.lift:.1f}",
                          f"{row.co:.0f}")
        console.print(table)
    table = Table("claim", "verdict", "numbers", title="findings (rules in analysis/findings.json)")
    for f in out["findings"]:
        nums = ", ".join(f"{k}={v:.3g}" for k, v in f["numbers"].items() if isinstance(v, (int, float)))
        table.add_row(Text(f["claim"]), Text(f["verdict"], style="bold"), Text(nums))
    console.print(table)
    console.print(f"wrote {r.analysis_dir}", markup=False)


@app.command()
@handle_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more analyzed runs (kvmem analyze), e.g. of different models on one corpus.")],
    json_out: JsonOpt = False,
) -> None:
    """Analyzed runs side by side: sparsity at each threshold, agreement, lexical keys, knock-outs."""
    from kvmem.analysis.compare import compare as run_compare

    res = run_compare(runs)
    models = res["models"]
    if json_out:
        return print_json({"meta": res.meta, "models": models.to_dict(orient="records"),
                           "layers": res["layers"].to_dict(orient="records")})
    if not res.meta["same_corpus"]:
        console.print(f"note: the runs were profiled on different corpora or token counts: {res.meta['corpora']}",
                      markup=False)
    table = Table("", *[Column(header=Text(str(m))) for m in models.model], title="kvmem compare")
    skip = {"model", "verdicts"}
    for col in models.columns:
        if col in skip:
            continue
        cells = []
        for v in models[col]:
            cells.append(Text("—" if v is None or v != v else f"{v:.4g}" if isinstance(v, float) else str(v)))
        table.add_row(col, *cells)
    table.add_row("verdicts", *[Text(v) for v in models.verdicts])
    console.print(table)
