"""The `spectra` command: one typer sub-command per file, registered here."""

from __future__ import annotations

import os
import warnings
from typing import Annotated

import typer

from spectra import __version__
from spectra.cli._common import STATE, show_warning

app = typer.Typer(
    name="spectra",
    help=(
        "Read the weights of a neural network and say what their spectra say.\n\n"
        "SOURCE is a .safetensors file, a folder of shards, a Hub repo id (org/name) or a PEFT "
        "LoRA adapter folder. Nothing is unpickled, nothing is loaded whole."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spectra {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    STATE.debug = debug


def _register() -> None:
    # Each command module defines `register(app)`. Imports are local so `spectra --help`
    # stays fast and one broken optional extra cannot take the whole CLI down.
    from spectra.cli import compare_cmd

    compare_cmd.register(app)

    from spectra.cli import inspect_cmd

    inspect_cmd.register(app)

    from spectra.cli import report_cmd

    report_cmd.register(app)

    from spectra.cli import init_cmd

    init_cmd.register(app)

    from spectra.cli import convert_cmd

    convert_cmd.register(app)

    from spectra.cli import plan_cmd

    plan_cmd.register(app)

    from spectra.cli import mitigate_cmd

    mitigate_cmd.register(app)

    from spectra.cli import smooth_cmd

    smooth_cmd.register(app)

    from spectra.cli import remove_traps_cmd

    remove_traps_cmd.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = show_warning  # one clipped line per warning, no escape sequences
    # OpenMP threads that wait for work sleep instead of spinning (unless the user chose a
    # policy): with --threads N on a busy machine, spinning threads took the cores the working
    # ones needed (MiniLM's Gram eigenvalues at 2 threads, load 13 on 2 cores: 88 s wall spinning,
    # 1.6 s passive, 4.4 s at one thread; bench_threads.py). Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
