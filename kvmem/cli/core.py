"""Core commands: ``kvmem models``, ``kvmem info``, ``kvmem query``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from kvmem.cli import app
from kvmem.cli.common import (DeviceOpt, DtypeOpt, JsonOpt, ModelArg, console, handle_errors, load_model,
                              print_json, show_tokens)


@app.command()
@handle_errors
def models(json_out: JsonOpt = False) -> None:
    """Supported model families (activation, gating, norm placement, MoE layout), and the bundled model."""
    from kvmem.models.load import BUNDLED, bundled_path
    from kvmem.models.registry import REFUSED, adapters

    fams = adapters()
    rows = [{"model_type": mt, "family": cls.family, "activation": list(cls.activations()),
             "gating": ("gated (fused gate_up)" if cls.fused_gate_up else "gated") if cls.gated else "none",
             "norm_placement": cls.placement, "moe": cls.moe}
            for mt, cls in fams.items()]
    bundled = {alias: {"installed": bundled_path(alias) is not None, "install": info[2]}
               for alias, info in BUNDLED.items()}
    if json_out:
        return print_json({"model_types": {mt: cls.family for mt, cls in fams.items()}, "families": rows,
                           "refused": REFUSED, "bundled": bundled})
    table = Table("config.model_type", "adapter family", "activation", "gating", "norm placement", "MoE",
                  title="Supported architectures")
    for r in rows:
        table.add_row(Text(r["model_type"]), Text(r["family"]), Text(", ".join(r["activation"])), Text(r["gating"]),
                      Text(r["norm_placement"]), Text(r["moe"]))
    console.print(table)
    by_reason: dict[str, list[str]] = {}
    for mt, why in REFUSED.items():
        by_reason.setdefault(why, []).append(mt)
    console.print("Refused (not representable exactly yet):")
    for why, mts in by_reason.items():
        console.print(f"  {', '.join(mts)}: {why}", markup=False, highlight=False)
    for alias, b in bundled.items():
        state = "installed" if b["installed"] else f"not installed ({b['install']})"
        console.print(f"bundled model [bold]{alias}[/]: {state}")


@app.command()
@handle_errors
def info(model: ModelArg, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", json_out: JsonOpt = False) -> None:
    """Layers, widths, activation and the FFNs' share of the parameters."""
    facts = load_model(model, device, dtype).info()
    if json_out:
        return print_json(facts)
    table = Table("", "", show_header=False, title=f"kvmem info {model}")
    for key, value in facts.items():
        table.add_row(key, Text(f"{value:.1%}" if key == "ffn_param_share" else str(value)))
    console.print(table)


@app.command()
@handle_errors
def query(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    position: Annotated[int, typer.Option(help="Token position to inspect (negative counts from the end).")] = -1,
    top: Annotated[int, typer.Option(help="How many neurons to list.")] = 20,
    by: Annotated[str, typer.Option(help="Rank by 'contribution' (|m|·‖v‖) or 'activation' (|m|).")] = "contribution",
    layers: Annotated[str, typer.Option(help="Layers to search, e.g. '0-5,20' (default all).")] = "",
    through_norm: Annotated[bool, typer.Option("--through-norm", help="Apply the final norm to value vectors before W_U.")] = False,
    n_tokens: Annotated[int, typer.Option(help="Top tokens shown per neuron and for the next-token prediction.")] = 5,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """The neurons that fire most at one position of a prompt, and what their values write."""
    from kvmem.neurons import parse_layers
    from kvmem.query import query as run_query

    kv = load_model(model, device, dtype)
    res = run_query(kv, prompt, position=position, top=top, by=by, n_tokens=n_tokens,
                    through_norm=through_norm, layers=parse_layers(layers, kv.n_layers))
    if json_out:
        return print_json(res.to_dict())
    console.print(f"tokens: {show_tokens(res.tokens)}", markup=False)
    console.print(f"position {res.position}: {res.tokens[res.position]!r}", markup=False)
    nxt = ", ".join(f"{t!r} {p:.1%}" for t, p in zip(res.next_tokens.token, res.next_tokens.prob))
    console.print(f"next token: {nxt}", markup=False)
    table = Table("neuron", "activation m", "|m|·‖v‖", "sign(m)·v promotes",
                  title=f"top {len(res.neurons)} neurons by {res.by}")
    for row in res.neurons.itertuples():
        table.add_row(row.id, f"{row.activation:+.3f}", f"{row.contribution:.3f}",
                      Text(show_tokens(row.top_tokens)))
    console.print(table)
