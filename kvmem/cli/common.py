"""Shared CLI pieces: the MODEL argument, device/dtype/json options, output and error handling."""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from kvmem.errors import KvmemError
from kvmem.models.load import DEFAULT_MODEL

console = Console()
err_console = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(
    help=f"Model: a HF model directory, a .gguf file, a Hub id (online only) or the bundled alias {DEFAULT_MODEL}.")]
OptionalModelArg = Annotated[str, typer.Argument(
    help=f"Model: a HF model directory, a .gguf file, a Hub id (online only) or the bundled alias. Default: {DEFAULT_MODEL}.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda if present), cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object instead of tables.")]


def fail(message: str) -> typer.Exit:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def handle_errors(fn=None, *, flags: dict[str, str] | None = None):
    """Turn a KvmemError into a one-line message on stderr and exit code 2 (Ctrl-C: one line, 130). A library
    error naming a parameter is shown with the command's flag: ``flags`` maps library parameter -> flag where
    they differ (``@handle_errors(flags={"n_neurons": "--neurons"})``), else --param-with-dashes."""
    if fn is None:
        return functools.partial(handle_errors, flags=flags)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KvmemError as e:
            raise fail(e.for_flag(flags)) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: nothing finished was replaced; run the same command again to continue "
                              "or redo it", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def load_model(spec: str, device: str, dtype: str):
    from kvmem.models import load

    with err_console.status(f"loading {spec} ..."):
        return load(spec, device=device, dtype=dtype)


def show_tokens(tokens) -> str:
    """Tokens for a terminal: repr-style quoting keeps spaces and newlines visible."""
    return " ".join(repr(t)[1:-1] if t.strip() == t and t else repr(t) for t in tokens)
