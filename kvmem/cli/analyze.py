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

# extra per-layer columns shown beside every rate that has a 95% interval (``{c}_lo``/``{c}_hi``)
EXTRA = {"agreement": ["base_ex1", "uniform_ex1", "next_rank_median"], "lexical": ["base_same_token"],
         "knockouts": ["baseline_loss"]}
MAX_COLS = 7


def _fmt(v, pct: bool) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:.2%}" if pct else f"{v:.3g}"


def layer_table(measure: str, df, meta: dict) -> Table:
    """Per layer, each rate as ``value [lo, hi]`` (and the measure's baselines)."""
    rates = [c for c in df.columns if f"{c}_lo" in df.columns and f"{c}_hi" in df.columns][:MAX_COLS]
    extra = [c for c in EXTRA.get(measure, []) if c in df.columns]
    pct = measure not in ("knockouts",)
    n = meta.get("n_tokens")
    title = f"{measure} — {n:,} tokens — value [95% interval]" if n else f"{measure} — value [95% interval]"
    table = Table("layer", *rates, *extra, title=Text(title))
    for _, row in df.sort_values("layer").iterrows():
        cells = [f"{_fmt(row[c], pct and abs(row[c]) <= 1)} [{_fmt(row[f'{c}_lo'], pct and abs(row[c]) <= 1)}, "
                 f"{_fmt(row[f'{c}_hi'], pct and abs(row[c]) <= 1)}]" if row[c] == row[c] else "—" for c in rates]
        cells += [_fmt(row[c], False) for c in extra]
        table.add_row(str(int(row.layer)), *cells)
    return table


def _docs_note(c: dict, min_docs: int) -> str:
    d = c.get("docs")
    return f" (only {int(d)} documents)" if d is not None and d < min_docs else ""


def verdict_table(findings: list[dict], min_docs: int = 5) -> Table:
    table = Table("claim", "verdict", "checks: estimate [95% interval] vs threshold", "source",
                  title="findings (rules: analysis/findings.json)")
    for f in findings:
        if f["verdict"] == "not tested":
            detail = f"not tested: {f.get('reason', '')}"
        else:
            detail = "\n".join(f"{c['state']:>6}  {c['check']}: {_fmt(c['estimate'], False)} "
                               f"[{_fmt(c['lo'], False)}, {_fmt(c['hi'], False)}] vs {_fmt(c['threshold'], False)}"
                               f"{_docs_note(c, min_docs)}"
                               for c in f.get("checks", [])[:6])
            if len(f.get("checks", [])) > 6:
                detail += f"\n… {len(f['checks']) - 6} more (findings.json)"
        table.add_row(Text(f.get("title") or f["claim"]), Text(f["verdict"], style="bold"), Text(detail),
                      Text(f.get("source", "")))
    return table


def paper_table(rows: list[dict]) -> Table:
    table = Table("figure", "quantity", "paper", "measured [95% interval]", "layers (rel. depth)",
                  title="the papers beside this model")
    for r in rows:
        if r.get("measured") is None:
            got = r.get("status", "")
        elif r.get("lo") is None:
            got = f"{r['measured']:.4g} ({r.get('status', '')})"
        else:
            got = f"{r['measured']:.4g} [{r['lo']:.4g}, {r['hi']:.4g}]"
        depth = r["depth"] + (f" ({r['rel_depth']})" if r.get("rel_depth") else "")
        table.add_row(Text(r["figure"]), Text(r["quantity"]), Text(r["paper"]), Text(got), Text(depth))
    return table


def plan_table(steps) -> Table:
    table = Table("measure", "tokens", "documents", "forward passes", "vocab projections", "what it runs",
                  title="planned cost (passes over the sample; a partial pass runs the blocks from one layer on)")
    for s in steps:
        table.add_row(s.measure, f"{s.tokens:,}" if s.tokens else "—", f"{s.docs:,}" if s.docs else "—",
                      f"{s.passes:,}" if s.passes else "—", f"{s.projections:,}" if s.projections else "—",
                      Text(s.note))
    return table


def _ints(text: str, flag: str):
    from kvmem.errors import KvmemError

    try:
        return [int(k) for k in text.split(",") if k.strip()] or None
    except ValueError:
        raise KvmemError(f"{flag} must be integers separated by commas, not {text!r}") from None


@app.command()
@handle_errors
def analyze(
    run: RunArg,
    model: Annotated[str | None, typer.Option(help="Model spec (default: the one in the run's manifest).")] = None,
    tokens: Annotated[int | None, typer.Option(help="Counted tokens of the run's rows (drawn at random across documents) for sparsity and co-activation (default: 32768 on a GPU, 4096 on a CPU).")] = None,
    knockout_tokens: Annotated[int | None, typer.Option(help="Tokens for the knock-out losses (default: 8192 GPU, 512 CPU).")] = None,
    composition_tokens: Annotated[int | None, typer.Option(help="Tokens for composition and the four cases (default: 8192 GPU, 1024 CPU).")] = None,
    measures: Annotated[str, typer.Option(help="Comma-separated subset of: sparsity, coactivation, composition, knockouts, agreement, lexical, mutation, annotate (default: all but annotate; the others' earlier tables and findings are kept).")] = "",
    layers: Annotated[str, typer.Option(help="Analyze only these profiled layers, e.g. '0-5,20' (default: all profiled).")] = "",
    knockout_k: Annotated[str, typer.Option(help="Neurons zeroed per layer in the top-k knock-outs, e.g. '15,153' (default: 1% and 10% of d_mlp on a GPU, 10% on a CPU).")] = "",
    n_random: Annotated[int | None, typer.Option(help="Random-k knock-out draws per layer and k (default: 5 GPU, 3 CPU).")] = None,
    n_perm: Annotated[int | None, typer.Option(help="Derangement draws of the agreement baseline (default 100).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every sample and random draw.")] = 0,
    neurons: Annotated[str, typer.Option(help="Co-activation query neurons, e.g. '3.17,5.2' (default: each layer's highest-max |m| neuron).")] = "",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Key-value memory analyses of a run (Geva et al. 2021, 2022): verdicts with 95% intervals and the papers' figures beside the measured ones; writes RUN/analysis/."""
    import kvmem
    from kvmem.analysis.analyze import DEFAULT_MEASURES, MEASURES, analyze as run_analyze
    from kvmem.errors import KvmemError

    r = kvmem.open_run(run)
    chosen = [m.strip() for m in measures.split(",") if m.strip()] or list(DEFAULT_MEASURES)
    bad = [m for m in chosen if m not in MEASURES]
    if bad:
        raise KvmemError(f"unknown measure {bad[0]!r}; choose from {', '.join(MEASURES)}")
    for name, value in (("--tokens", tokens), ("--knockout-tokens", knockout_tokens),
                        ("--composition-tokens", composition_tokens)):
        if value is not None and value < 2:
            raise KvmemError(f"{name} must be at least 2")
    for name, value in (("--n-random", n_random), ("--n-perm", n_perm)):
        if value is not None and value < 1:
            raise KvmemError(f"{name} must be at least 1")
    spec = model or r.model_spec
    with err_console.status(f"loading {spec} ..."):
        kv = kvmem.load(spec, device=device, dtype=dtype)
    queries = [n.strip() for n in neurons.split(",") if n.strip()] or None
    from kvmem.neurons import parse_layers

    chosen_layers = parse_layers(layers, kv.n_layers) if layers.strip() else None
    ks = _ints(knockout_k, "--knockout-k")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        tasks = {}

        def on_plan(steps):
            err_console.print(plan_table(steps))
            for s in steps:
                tasks[s.measure] = (bar.add_task(f"{s.measure}: waiting", total=s.total, start=False), s.total)

        def tick(measure: str, advance: int, label: str) -> None:
            task, total = tasks[measure]
            if advance == 0:
                bar.start_task(task)
            if advance is None:
                bar.update(task, completed=total)
            else:
                bar.update(task, advance=advance, description=f"{measure}: {label}")
            state = next(t for t in bar.tasks if t.id == task)
            if state.completed >= total:
                bar.update(task, description=f"{measure}: done in {state.elapsed or 0:.1f}s")

        out = run_analyze(r, kv, tokens=tokens, knockout_tokens=knockout_tokens,
                          composition_tokens=composition_tokens, measures=chosen, coactivation_neurons=queries,
                          layers=chosen_layers, knockout_ks=ks, n_random=n_random, n_perm=n_perm, seed=seed,
                          progress=tick, on_plan=on_plan)
    results = {k: v for k, v in out.items() if k not in ("findings", "document")}
    doc = out["document"]
    if json_out:
        return print_json({"run": str(r.path), "analysis": str(r.analysis_dir),
                           "measures": {k: v.meta for k, v in results.items()},
                           "tables": {f"{k}_{t}": df.to_dict(orient="records") for k, v in results.items()
                                      for t, df in v.tables.items() if t in ("layers", "model", "partners")},
                           "findings": out["findings"], "paper": doc["paper"], "rules": doc["rules"],
                           "kvmem_version": doc["kvmem_version"]})
    for measure, res in results.items():
        if "layers" in res.tables and measure not in ("coactivation", "annotate"):
            console.print(layer_table(measure, res["layers"], res.meta))
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
    if "annotate" in results:
        console.print(f"annotation sheet: {r.analysis_dir / 'annotation.csv'} (blinded; its key, to keep from the "
                      f"annotator: {r.analysis_dir / 'annotation_key.csv'})", markup=False)
    console.print(verdict_table(out["findings"], doc["rules"].get("min_docs", 5)))
    console.print(paper_table(doc["paper"]))
    console.print(f"rules {doc['rules']['version']} (sha256 {doc['rules']['sha256'][:12]}…), kvmem "
                  f"{doc['kvmem_version']}; wrote {r.analysis_dir}", markup=False)


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
