"""`spectra convert --init INIT_DIR --trained TRAINED_DIR --out DIR`."""

from __future__ import annotations

from typing import Annotated

import typer

from spectra.cli._common import ForceOpt, ThreadsOpt, cli_threads, console, handle_errors, one_line


@handle_errors
def convert(
    init_dir: Annotated[
        str, typer.Option("--init", help="The `spectra init` output folder (or its adapter/).")
    ],
    trained: Annotated[
        str, typer.Option("--trained", help="The adapter folder saved after training.")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output adapter folder.")],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="The original base model (default: the source in the init's spectra.json).",
        ),
    ] = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Turn a trained PiSSA/MiLoRA/OLoRA adapter into a plain rank-2r LoRA on the original base."""
    from spectra.distributed.runtime import apply_threads
    from spectra.jobs.convert import convert_to_lora

    apply_threads(cli_threads(threads))
    path = convert_to_lora(init_dir, trained, out, base=base, force=force)
    console.print(
        one_line(f"plain LoRA for the original base: {path}"),
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    """Add `convert` to the root app."""
    app.command("convert")(convert)
