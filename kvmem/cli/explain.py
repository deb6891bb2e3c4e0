"""``kvmem explain RUN`` and ``kvmem score RUN``: neurons described in words and scored (kvmem.explain)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from kvmem.cli import app
from kvmem.cli.common import DeviceOpt, console, err_console, handle_errors
from kvmem.errors import KvmemError

RunArg = Annotated[Path, typer.Argument(help="A run folder written by kvmem profile.")]
NeuronsOpt = Annotated[Optional[str], typer.Option("--neurons", help="Neurons, comma-separated: 3.45,10.7")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="Layers: 0-3 or 0,2,5 (all their neurons)")]
SampleOpt = Annotated[Optional[int], typer.Option("--sample", help="A seeded sample of N neurons of the selection "
                                                  "(default 20 when neither --neurons nor --layers is given)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sample and of the held-out split")]
KeyEnvOpt = Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the endpoint's API key "
                                        "(not needed for localhost)")]
LocalOpt = Annotated[Optional[str], typer.Option("--local", help="In-process transformers explainer (a kvmem.load "
                                                 "spec, e.g. smollm2-135m)")]
ConcOpt = Annotated[int, typer.Option("--concurrency", help="Parallel HTTP requests")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="The profiled model, if not at the run's spec")]
DEFAULT_SAMPLE = 20


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    out = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise KvmemError(f"--layers {text!r}: write layers as 0-3 or 0,2,5") from None
    return out


def _pairs(run, neurons, layers, sample, seed):
    from kvmem.explain import select

    names = [n for n in (neurons or "").split(",") if n.strip()]
    if not names and not layers and sample is None:
        sample = DEFAULT_SAMPLE
    return select(run, names or None, parse_layers(layers), sample, seed)


def _model(run, spec, device):
    import kvmem

    with err_console.status(f"loading {spec or run.model_spec} ..."):
        model = kvmem.load(spec or run.model_spec, device=device)
    run.check_model(model)
    return model


def _backend(run, model, endpoint, name, local, key_env, concurrency, seed):
    from kvmem.explain.backends import backend_from_options

    reuse = model if local and local == run.model_spec else None
    if local:
        with err_console.status(f"loading {local} ..."):
            b = backend_from_options(local=local, seed=seed, model=reuse)
    else:
        b = backend_from_options(endpoint, name, api_key_env=key_env, concurrency=concurrency, seed=seed)
    if b is not None and b.kind == "http":
        b.check()
    return b


def _progress():
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[used]}"), console=err_console, transient=True)


def _used(u: dict) -> str:
    return (f"{u.get('requests', 0)} requests, {u.get('prompt_tokens', 0):,} prompt + "
            f"{u.get('completion_tokens', 0):,} completion tokens, {u.get('failures', 0)} failed")


def _fmt(v, lo, hi) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if not (math.isnan(lo) or math.isnan(hi)) else f"{v:.2f}"


def show(df) -> None:
    t = Table("neuron", "side", "sign", "explainer", "description", "detection", "fuzzing", "simulation", "value",
              title="descriptions — score [95% interval] (balanced accuracy; simulation: Pearson r)")
    for r in df.to_dict("records"):
        t.add_row(Text(r["neuron"]), r["side"], r["sign"], Text(r["explainer"]), Text(r["description"][:120]),
                  *[Text(_fmt(r[s], r[f"{s}_lo"], r[f"{s}_hi"])) for s in ("detection", "fuzzing", "simulation",
                                                                            "value")])
    console.print(t)
    notes = {r[f"{s}_note"] for r in df.to_dict("records") for s in ("simulation",) if r["explainer"] != "baseline"}
    for n in sorted(x for x in notes if x):
        console.print(Text(f"simulation: {n}"))


@app.command()
@handle_errors
def explain(run_path: RunArg, neurons: NeuronsOpt = None, layers: LayersOpt = None, sample: SampleOpt = None,
            seed: SeedOpt = 0,
            endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="OpenAI-compatible endpoint URL")] = None,
            explainer: Annotated[Optional[str], typer.Option("--explainer", help="The endpoint's model name")] = None,
            api_key_env: KeyEnvOpt = "OPENAI_API_KEY", local: LocalOpt = None, concurrency: ConcOpt = 4,
            score: Annotated[bool, typer.Option("--score/--no-score", help="Also score the LLM's descriptions with "
                                                "the same backend (else: kvmem score)")] = False,
            max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per reply")] = 40,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="Print one prompt and the plan; send nothing")] = False,
            model: ModelOpt = None, device: DeviceOpt = "cpu") -> None:
    """Describe neurons: what makes each fire (per sign of m for gated FFNs) and what it writes. Without a
    backend option only the LLM-free baseline runs. Results: RUN/explanations.parquet."""
    import kvmem
    from kvmem.explain import store
    from kvmem.explain.explainer import ExplainConfig, explain as run_explain, gather_all, key_messages, plan
    from kvmem.explain.explainer import value_messages

    run = kvmem.open_run(run_path)
    pairs = _pairs(run, neurons, layers, sample, seed)
    backend = _backend(run, None, endpoint, explainer, None, api_key_env, concurrency, seed) if endpoint else None
    m = _model(run, model, device)
    if local:
        backend = _backend(run, m, None, None, local, api_key_env, concurrency, seed)
    cfg = ExplainConfig(seed=seed, max_tokens=max_tokens)
    data = gather_all(run, m, pairs[:1] if dry_run else pairs, cfg)
    count = None
    if backend is not None and backend.kind == "local":
        count = lambda text: len(backend.tok.encode(text, add_special_tokens=False))  # noqa: E731
    p = plan(run, data, backend, count)
    if dry_run:
        d = next(iter(data.values()))
        for msgs in (key_messages(d, run.gated), value_messages(d)):
            for x in msgs:
                console.print(Text(f"[{x['role']}]\n{x['content']}\n"))
        console.print(Text(f"dry run: {len(pairs)} neurons would send about "
                           f"{p['requests'] * len(pairs) // max(1, p['neurons'])} requests"))
        return
    console.print(Text(f"{p['neurons']} neurons, {p['descriptions']} descriptions per explainer; "
                       + (f"{p['requests']} explainer requests, ~{p['prompt_tokens']:,} prompt tokens"
                          + (" (plus scoring)" if score else "") if backend else "baseline only (no LLM)")))
    with _progress() as prog:
        task = prog.add_task("explaining", total=len(data), used="")
        df = run_explain(run, m, pairs, backend, cfg, score=score, data=data,
                         progress=lambda n, u: prog.update(task, advance=n, used=_used(u)))
    store.write(run, store.merge(store.read(run), df))
    show(df)
    if backend is not None:
        console.print(Text(f"{backend.name}: {_used(backend.usage)}"))
    console.print(Text(f"written: {run.path / store.FILE}"))


def score_requests(rows, backend, cfg) -> int:
    """Scorer requests for ``rows`` (LLM rows with a description): detection and fuzzing per key row (plus one
    log-prob pass per simulated snippet, or per token of it over HTTP, where the backend gives log-probabilities),
    value per value row."""
    llm = rows[(rows["explainer"] != "baseline") & (rows["description"] != "")]
    keys = int((llm["side"] == "key").sum())
    if backend.kind == "local":
        sim = cfg.sim_snippets  # one forward pass per snippet
    else:  # one /v1/completions request per token of each snippet, where the endpoint has log-probs
        sim = cfg.sim_snippets * (cfg.before + cfg.after + 1) if getattr(backend, "has_logprobs", False) else 0
    return keys * (2 + sim) + int((llm["side"] == "value").sum())


@app.command("score")
@handle_errors
def score_cmd(run_path: RunArg, neurons: NeuronsOpt = None, layers: LayersOpt = None, sample: SampleOpt = None,
              seed: SeedOpt = 0,
              scorer_endpoint: Annotated[Optional[str], typer.Option("--scorer-endpoint", "--endpoint",
                                                                     help="OpenAI-compatible endpoint URL")] = None,
              scorer: Annotated[Optional[str], typer.Option("--scorer", "--explainer",
                                                            help="The endpoint's model name")] = None,
              api_key_env: KeyEnvOpt = "OPENAI_API_KEY", local: LocalOpt = None, concurrency: ConcOpt = 4,
              max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per scorer reply")] = 40,
              model: ModelOpt = None, device: DeviceOpt = "cpu") -> None:
    """Score stored descriptions on held-out examples: detection, fuzzing, simulation (where the backend
    gives log-probabilities), value. Baseline rows are scored by lexical rules, the others by the backend."""
    import kvmem
    from kvmem.explain import store
    from kvmem.explain.explainer import ExplainConfig, score as run_score

    run = kvmem.open_run(run_path)
    table = store.read(run)
    if table.empty:
        raise KvmemError(f"{run.path}: no descriptions yet: run kvmem explain {run.path} first")
    if neurons or layers or sample is not None:
        pairs = _pairs(run, neurons, layers, sample, seed)
    else:
        pairs = sorted({(int(r.layer), int(r.neuron.split(".")[-1])) for r in table.itertuples()})
    backend = _backend(run, None, scorer_endpoint, scorer, None, api_key_env, concurrency, seed) \
        if scorer_endpoint else None
    m = _model(run, model, device)
    if local:
        backend = _backend(run, m, None, None, local, api_key_env, concurrency, seed)
    want = {f"{a}.{b}" for a, b in pairs}
    chosen = table[table["neuron"].isin(want)]
    n = len(chosen)
    cfg = ExplainConfig(seed=seed, max_tokens=max_tokens)
    console.print(Text(f"{n} descriptions of {len(want)} neurons to score"
                       + (f" with {backend.name}: {score_requests(chosen, backend, cfg)} scorer requests"
                          if backend else " (baseline rows only: no scorer backend)")))
    with _progress() as prog:
        task = prog.add_task("scoring", total=n, used="")
        df = run_score(run, m, table, pairs, backend, cfg,
                       progress=lambda k, u: prog.update(task, advance=k, used=_used(u)))
    store.write(run, store.merge(store.read(run), df))
    show(df)
    console.print(Text(f"written: {run.path / store.FILE}"))


def rank_by_score(run, top_n: int, layers: list[int] | None, scorer: str, explainer: str | None,
                  json_out: bool) -> None:
    """``kvmem rank RUN --by score``: neurons by the ``scorer`` score of ``explainer``'s descriptions (the best
    sign for gated FFNs; kvmem.explain.store.neuron_scores), the baseline's score of the same neuron and sign
    beside it; neurons without that score are left out (their count printed)."""
    from kvmem.cli.common import print_json
    from kvmem.explain import store

    table = run.explanations
    if table.empty:
        raise KvmemError(f"--by score: {run.path} has no descriptions yet: run kvmem explain {run.path} first")
    if scorer not in store.SCORERS:
        raise KvmemError(f"--scorer must be one of {', '.join(store.SCORERS)}, not {scorer!r}")
    names = sorted(set(table["explainer"]))
    if explainer is not None and explainer not in names:
        raise KvmemError(f"--explainer {explainer!r}: no descriptions by it (explainers: {', '.join(names)})")
    df = store.neuron_scores(table, scorer, explainer)
    if layers is not None:
        df = df[df["layer"].isin(layers)]
    total = len(df)
    df = df.head(top_n)
    who = explainer or store.default_explainer(table)
    if json_out:
        recs = df.to_dict(orient="records")
        for rec in recs:  # JSON has no NaN
            rec.update({k: None for k, v in rec.items() if isinstance(v, float) and math.isnan(v)})
        return print_json({"by": "score", "scorer": scorer, "explainer": who, "scored": total, "neurons": recs})
    t = Table("neuron", "sign", f"{scorer} [95%] (n)", "baseline [95%] (n)", "description",
              title=f"top {len(df)} of {total} neurons by the {scorer} score of {who}'s descriptions"
                    + (" (balanced accuracy, 0.5 = chance)" if scorer != "simulation" else " (Pearson r)"))
    for r in df.to_dict("records"):
        t.add_row(r["neuron"], r["sign"], Text(f"{_fmt(r['score'], r['score_lo'], r['score_hi'])} ({r['score_n']})"),
                  Text(f"{_fmt(r['baseline'], r['baseline_lo'], r['baseline_hi'])} ({r['baseline_n']})"),
                  Text(r["description"][:120]))
    console.print(t)
