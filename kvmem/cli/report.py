"""``kvmem report``: the offline HTML report of a run, or the page of one prompt."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kvmem.cli import app
from kvmem.cli.common import DeviceOpt, DtypeOpt, JsonOpt, console, err_console, handle_errors, load_model, print_json
from kvmem.errors import KvmemError


@app.command()
@handle_errors
def report(
    target: Annotated[str, typer.Argument(help="A run folder (runs/NAME); with --prompt, a model spec.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default reports/NAME of the run, or reports/prompt).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Write the page of this prompt instead (TARGET is then the model).")] = None,
    run: Annotated[Path | None, typer.Option(help="With --prompt: the run whose report the page joins (links to neuron pages).")] = None,
    model: Annotated[str | None, typer.Option(help="The run's model (a spec, or 'run' for the spec in the manifest): adds the value side; re-runs it only to shade examples the run kept no context for.")] = None,
    examples: Annotated[int, typer.Option(help="Top examples shown per neuron.")] = 10,
    context: Annotated[int, typer.Option(help="Context tokens shown before the activating token.")] = 10,
    rerun_tokens: Annotated[int, typer.Option(help="With --model: corpus tokens re-run at most to shade examples the run kept no context for.")] = 100_000,
    per_layer: Annotated[int, typer.Option(help="With --prompt: neurons listed per layer.")] = 5,
    force: Annotated[bool, typer.Option("--force", help="Replace whatever --out holds.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Write an offline HTML report (index.html + neuron pages; plotly.js stored once beside them)."""
    import kvmem
    from kvmem.report import ReportOptions, build_report, prompt_page
    from kvmem.report.html import is_report

    for name, value in (("--examples", examples), ("--context", context), ("--rerun-tokens", rerun_tokens)):
        if value < 0:
            raise KvmemError(f"{name} must be at least 0")
    if per_layer < 1:
        raise KvmemError("--per-layer must be at least 1")
    if prompt is not None:
        kv = load_model(target, device, dtype)
        linked = None
        if run is not None:
            r = kvmem.open_run(run)
            r.check_model(kv, target)
            out = out or Path("reports") / r.path.name
            if not is_report(out):
                with err_console.status(f"writing the report of {run} into {out} ..."):
                    build_report(r, out, model=kv)
            linked = r.profiled_layers
        out = out or Path("reports") / "prompt"
        path = prompt_page(kv, prompt, out, linked_layers=linked, per_layer=per_layer)
        if json_out:
            return print_json({"page": str(path), "out": str(out), "linked": linked is not None})
        console.print(f"wrote {path}" + ("" if linked is not None else " (no --run: neuron ids are not linked)"),
                      markup=False, highlight=False)
        return None
    if run is not None:
        raise KvmemError("--run only goes with --prompt; the run of a report is its TARGET")
    r = kvmem.open_run(target)
    out = out or Path("reports") / Path(target).resolve().name
    kv, load_seconds = None, None
    if model is not None:
        t = time.perf_counter()
        kv = load_model(r.manifest["model"]["model"] if model == "run" else model, device, dtype)
        load_seconds = time.perf_counter() - t
    opts = ReportOptions(n_top=examples, before=context, rerun_tokens=rerun_tokens)
    with err_console.status(f"writing the report of {target} ..."):
        rep = build_report(r, out, model=kv, options=opts, force=force)
    if load_seconds is not None:
        rep.stages = {"load": round(load_seconds, 3)} | rep.stages
    if json_out:
        return print_json(rep.to_dict())
    console.print(f"wrote {rep.path / 'index.html'} ({rep.files} files, {rep.bytes / 2**20:.1f} MiB, "
                  f"{rep.seconds:.1f} s)", markup=False, highlight=False)
    console.print("stages: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in rep.stages.items()),
                  markup=False, highlight=False)
    for key, note in rep.notes.items():
        console.print(f"  {key}: {note}", markup=False, highlight=False)
    return None
