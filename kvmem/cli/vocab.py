"""Value-vector commands: ``kvmem vocab``, ``kvmem search``, ``kvmem trace``, ``kvmem intervene``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from kvmem.cli import app
from kvmem.cli.common import (DeviceOpt, DtypeOpt, JsonOpt, ModelArg, console, err_console, handle_errors,
                              load_model, print_json, show_tokens)
from kvmem.errors import KvmemError

PromptArg = Annotated[str, typer.Argument(help="The prompt text.")]
ThroughNormOpt = Annotated[bool, typer.Option("--through-norm",
                                              help="Apply the final norm to value vectors before W_U.")]
PositionOpt = Annotated[int, typer.Option(help="Token position to predict from (negative counts from the end).")]
ChunkOpt = Annotated[float, typer.Option("--chunk-mb", help="Bound (MiB) on the float32 [neurons, d_vocab] slice "
                                                             "of the whole-model projection held at once.")]


def _fmt(tokens) -> Text:
    return Text(show_tokens(tokens))


def _split(values: list[str]) -> list[str]:
    """Repeated options may also hold comma-separated lists."""
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


@app.command()
@handle_errors(flags={"k": "--top"})
def vocab(
    model: ModelArg,
    neurons: Annotated[list[str] | None, typer.Argument(help="Neurons as LAYER.NEURON, e.g. 17.1234.")] = None,
    top: Annotated[int, typer.Option(help="Tokens shown at each end.")] = 10,
    through_norm: ThroughNormOpt = False,
    all_neurons: Annotated[bool, typer.Option("--all", help="Compute (or load) the whole-model projection, cached on "
                                                           "disk, and say where it is.")] = False,
    chunk_mb: ChunkOpt = 256,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """What neurons write: the top and bottom tokens of their value vectors projected through W_U."""
    from kvmem.vocab import neuron_vocab, project_values

    if not neurons and not all_neurons:
        raise KvmemError("give one or more neurons as LAYER.NEURON (e.g. 17.1234), or --all")
    kv = load_model(model, device, dtype)
    out = {}
    if all_neurons:
        with err_console.status("projecting every value vector ..."):
            proj = project_values(kv, k=top, through_norm=through_norm, chunk_mb=chunk_mb)
        out["projection"] = proj.manifest()
    if neurons:
        res = neuron_vocab(kv, neurons, k=top, through_norm=through_norm)
        out.update(res.to_dict())
    if json_out:
        return print_json(out)
    if all_neurons:
        m = out["projection"]
        how = "loaded from the cache" if m["cached"] else f"computed in {m['seconds']:.1f} s"
        shape = (f"{m['n_layers']} layers x {m['d_mlp']} neurons" if not m.get("widths") else
                 f"{m['n_layers']} layers, {sum(m['widths'])} neurons, widths {', '.join(map(str, m['widths']))}")
        console.print(f"whole-model projection ({shape}, top/bottom {m['k']}): "
                      f"{how}; folder: {m['path']}", markup=False, soft_wrap=True)
    if not neurons:
        return
    for row in res.neurons.itertuples():
        title = (f"neuron {row.id}: ‖v‖ {row.norm:.3f}, row mean {row.mean:+.3f}, std {row.std:.3f}"
                 + (" (through the final norm)" if through_norm else ""))
        table = Table("#", "promotes", "logit", "suppresses", "logit", title=title)
        ends = zip(row.top_tokens, row.top_logits, row.bottom_tokens, row.bottom_logits)
        for i, (a, la, b, lb) in enumerate(ends, 1):
            table.add_row(str(i), Text(repr(a)), f"{la:+.3f}", Text(repr(b)), f"{lb:+.3f}")
        console.print(table)
    if res.note:
        console.print(f"note: {res.note}", markup=False, soft_wrap=True)


@app.command()
@handle_errors
def search(
    model: ModelArg,
    token: Annotated[str, typer.Argument(help="The token, with its leading space if it has one (e.g. ' Paris').")],
    top: Annotated[int, typer.Option(help="How many neurons to list.")] = 20,
    layers: Annotated[str, typer.Option(help="Layers to search, e.g. '0-5,20' (default all).")] = "",
    suppress: Annotated[bool, typer.Option("--suppress", help="The neurons that push the token down instead.")] = False,
    signs: Annotated[str, typer.Option(
        help="Value signs: auto (both for gated FFNs, + otherwise), both, positive.")] = "auto",
    through_norm: ThroughNormOpt = False,
    k: Annotated[int, typer.Option("--k", help="Top/bottom tokens kept per neuron by the cached projection.")] = 10,
    chunk_mb: ChunkOpt = 256,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """The neurons whose value vectors promote a token most, over all layers (ranked within each neuron's row)."""
    from kvmem.neurons import parse_layers
    from kvmem.search import search as run_search

    kv = load_model(model, device, dtype)
    with err_console.status("searching (the first search projects every value vector, then caches it) ..."):
        res = run_search(kv, token, layers=parse_layers(layers, kv.n_layers), top=top, suppress=suppress,
                         signs=signs, through_norm=through_norm, k=k, chunk_mb=chunk_mb)
    if json_out:
        return print_json(res.to_dict())
    if res.note:
        console.print(f"note: {res.note}", markup=False, soft_wrap=True)
    where = "bottom" if suppress else "top"
    console.print(f"token {res.token!r} (id {res.token_id}): {res.n_in_top_k} (neuron, sign) pairs have it among their "
                  f"{where} {res.k} tokens", markup=False, soft_wrap=True)
    verb = "suppress" if suppress else "promote"
    table = Table("#", "neuron", "writes", f"rank ({where})", "z", "logit", "‖v‖", f"sign·v {verb}s",
                  title=f"neurons that {verb} {res.token!r}, ranked by where it stands in each neuron's own row")
    col = "bottom_tokens" if suppress else "top_tokens"
    for i, row in enumerate(res.neurons.itertuples(), 1):
        table.add_row(str(i), row.id, "+v" if row.sign > 0 else "-v", str(row.rank), f"{row.z:+.2f}",
                      f"{row.logit:+.3f}", f"{row.norm:.2f}", _fmt(getattr(row, col)[:6]))
    console.print(table)
    if len(res.signs) == 2:
        console.print("-v: the neuron writes this when its coefficient is negative (gated FFN)",
                      markup=False, soft_wrap=True)


@app.command()
@handle_errors(flags={"top_n": "--top", "n_neurons": "--neurons", "n_tokens": "--tokens"})
def trace(
    model: ModelArg,
    prompt: PromptArg,
    position: PositionOpt = -1,
    target: Annotated[str | None, typer.Option(help="Token to trace (default: the model's top prediction).")] = None,
    top: Annotated[int, typer.Option(help="Lens tokens shown, and 'top' for where the target enters.")] = 5,
    per_layer: Annotated[int, typer.Option(help="Neurons listed per layer.")] = 3,
    neurons: Annotated[int, typer.Option(help="Neurons listed over all layers.")] = 10,
    tokens: Annotated[int, typer.Option(help="Tokens shown per FFN update and per neuron.")] = 5,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Layer by layer: what each FFN's update promotes, the logit lens around it, and the neurons adding most to
    the prediction."""
    from kvmem.trace import trace as run_trace

    kv = load_model(model, device, dtype)
    res = run_trace(kv, prompt, position=position, target=target, top_n=top, per_layer=per_layer, n_neurons=neurons,
                    n_tokens=tokens)
    if json_out:
        return print_json(res.to_dict())
    console.print(f"tokens: {show_tokens(res.tokens)}", markup=False, soft_wrap=True)
    nxt = ", ".join(f"{t!r} {p:.1%}" for t, p in zip(res.prediction.token, res.prediction.prob))
    console.print(f"position {res.position} {res.tokens[res.position]!r}, next token: {nxt}",
                  markup=False, soft_wrap=True)
    console.print(f"target {res.target!r}: {_where(res.first_top, True, res.top_n)}; "
                  f"{_where(res.stays_top, False, res.top_n)}", markup=False, soft_wrap=True)
    table = Table("layer", "rank before→after", "p after", "FFN DLA", "lens after FFN", "FFN update promotes",
                  "top neurons (DLA)",
                  title=f"trace of {res.target!r} (DLA: direct logit attribution, final norm frozen)")
    for row in res.layers.itertuples():
        table.add_row(str(row.layer), f"{row.target_rank_before}→{row.target_rank_after}",
                      f"{row.target_prob_after:.2%}",
                      f"{row.ffn_dla:+.2f}", _fmt(row.after_tokens), _fmt(row.ffn_tokens),
                      Text(" ".join(f"{n}:{d:+.2f}" for n, d in zip(row.neurons, row.neuron_dla))))
    console.print(table)
    table = Table("neuron", "m", "DLA", "sign(m)·v promotes", title=f"neurons adding most to {res.target!r}'s logit")
    for row in res.neurons.itertuples():
        table.add_row(row.id, f"{row.coef:+.3f}", f"{row.dla:+.3f}", _fmt(row.tokens))
    console.print(table)


def _where(point: dict | None, first: bool, n: int) -> str:
    if point is None:
        return f"never in the lens' top {n}" if first else f"not in the top {n} at the end"
    where = f"layer {point['layer']}'s {point['after']}"
    return f"first enters the top {n} after {where}" if first else f"in the top {n} from after {where} on"


@app.command()
@handle_errors
def intervene(
    model: ModelArg,
    prompt: PromptArg,
    ablate: Annotated[list[str] | None, typer.Option(help="Neuron to silence (m_i = 0), LAYER.NEURON; repeat or "
                                                          "comma-separate.")] = None,
    scale: Annotated[list[str] | None, typer.Option(help="LAYER.NEURON=FACTOR: multiply m_i; repeatable.")] = None,
    set_coef: Annotated[list[str] | None, typer.Option("--set", help="LAYER.NEURON=VALUE: set m_i to a constant "
                                                                     "(as LM-Debugger does); repeatable.")] = None,
    linearize: Annotated[str, typer.Option(help="Layers whose activation is replaced by the identity, e.g. '17' "
                                                "or '0-3'.")] = "",
    position: PositionOpt = -1,
    only_position: Annotated[bool, typer.Option("--only-position", help="Change coefficients at that position only "
                                                                       "(default: at every position).")] = False,
    target: Annotated[str | None, typer.Option(help="Token to track (default: the original top prediction).")] = None,
    tokens: Annotated[int, typer.Option(help="Next tokens shown.")] = 10,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Run a prompt with neurons silenced, scaled or set, or layers linearised: the next tokens before and after."""
    from kvmem.intervene import intervene as run_intervene
    from kvmem.neurons import parse_layers

    ablate, scale, set_coef = _split(ablate or []), _split(scale or []), _split(set_coef or [])
    kv = load_model(model, device, dtype)
    lin = parse_layers(linearize, kv.n_layers) or []
    if not (ablate or scale or set_coef or lin):
        console.print("note: no --ablate, --scale, --set or --linearize given: the 'after' column is the plain model",
                      markup=False, soft_wrap=True)
    try:
        res = run_intervene(kv, prompt, ablate=ablate, scale=scale, set_coef=set_coef, linearize=lin,
                            position=position, only_position=only_position, target=target, n_tokens=tokens)
    except KvmemError as e:  # the library names its parameter; the user typed the flag
        raise KvmemError(str(e).replace("(set_coef)", "(--set)")) from None
    if json_out:
        return print_json(res.to_dict())
    console.print(f"tokens: {show_tokens(res.tokens)}; position {res.position} {res.tokens[res.position]!r}",
                  markup=False, soft_wrap=True)
    changed = [f"ablate {', '.join(res.ablated)}" if res.ablated else "",
               f"scale {', '.join(f'{k}×{v:g}' for k, v in res.scaled.items())}" if res.scaled else "",
               f"set {', '.join(f'{k}={v:g}' for k, v in res.set_coef.items())}" if res.set_coef else "",
               f"linearize layers {', '.join(map(str, res.linearized))}" if res.linearized else ""]
    where = "at every position" if res.positions is None else f"at position {res.position} only"
    console.print(f"intervention: {'; '.join(c for c in changed if c) or 'none'} ({where})",
                  markup=False, soft_wrap=True)
    table = Table("#", "before", "p", "after", "p", title="next token")
    for i, (b, a) in enumerate(zip(res.before.itertuples(), res.after.itertuples()), 1):
        table.add_row(str(i), Text(repr(b.token)), f"{b.prob:.2%}", Text(repr(a.token)), f"{a.prob:.2%}")
    console.print(table)
    console.print(f"{res.target!r}: p {res.prob_before:.2%} → {res.prob_after:.2%}, "
                  f"logit {res.logit_before:+.3f} → {res.logit_after:+.3f}, rank after {res.rank_after}; "
                  f"KL(before‖after) {res.kl:.4f} nats",
                  markup=False, soft_wrap=True)
