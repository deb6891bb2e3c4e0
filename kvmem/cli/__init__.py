"""The ``kvmem`` command: a thin typer layer over the library.

Each submodule registers its commands on ``app``. ``main`` is the console script: it turns
usage errors into one line on stderr with exit code 2 (never a traceback).
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="kvmem",
    help="FFN layers of decoder LMs as key-value memories: capture, profile, project, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from kvmem.cli import analyze, core, profile, report  # noqa: E402,F401  (registers commands)
from kvmem.cli import vocab  # noqa: E402,F401  (registers vocab, search, trace, intervene)
from kvmem.cli import explain  # noqa: E402,F401  (registers explain, score)


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=argv, prog_name="kvmem", standalone_mode=False)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        return 130
    except Exception as e:  # usage errors (typer vendors click: match by shape, not by class)
        if not hasattr(e, "format_message"):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            return 0
        sys.stderr.write(f"error: {e.format_message()}\n")
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
