"""`spectra remove-traps SOURCE --out DIR`: WeightWatcher's remove_traps, as a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from spectra.cli._common import (
    DiskBudgetOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    OfflineOpt,
    ProgressLog,
    RevisionOpt,
    RolesOpt,
    ThreadsOpt,
    cli_threads,
    console,
    err_console,
    handle_errors,
    hub_options,
    is_interactive,
    one_line,
    split_csv,
)

HELP = (
    "Write a copy of SOURCE with its correlation traps removed (WeightWatcher 0.8's "
    "remove_traps).\n\n"
    "A trap is a mode of the matrix with its entries shuffled (seeded) whose eigenvalue stands "
    "past the Marchenko-Pastur bulk: a large weight, or a few, that no shuffle can hide (what "
    "`spectra report --traps` lists). Each trap mode, mapped back to the matrix's positions "
    "(T), is replaced by Gaussian noise with T's mean and standard deviation: W' = W - T + R. "
    "All traps by default; --trap N (repeatable, 1 = the largest) picks some.\n\n"
    "The checkpoint is written shard by shard: same files, tensor order and dtypes, index and "
    "config/tokenizer files; matrices without a trap and every other tensor byte for byte. A "
    "quantized or GGUF SOURCE is written dequantized (with a note). traps.json lists each "
    "matrix's traps and where the removed ones sat."
)


@handle_errors
def remove_traps_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint: file, folder or Hub repo id.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    trap: Annotated[
        list[int] | None,
        typer.Option(
            "--trap",
            help="Remove only this trap of each matrix (1 = the largest; repeatable). "
            "Default: all.",
            show_default=False,
        ),
    ] = None,
    mp_method: Annotated[
        str,
        typer.Option(
            "--mp-method",
            help="MP fit of the shuffled ESD: quantile (spectra's) or ww (WeightWatcher's KDE).",
        ),
    ] = "quantile",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the shuffle (and, + 1, of the noise).")
    ] = 0,
    min_evals: Annotated[
        int,
        typer.Option(
            "--min-evals", help="Leave matrices with min(m, n) below this as they are (WW: 8)."
        ),
    ] = 8,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    roles: RolesOpt = None,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    revision: RevisionOpt = None,
    disk_budget: DiskBudgetOpt = None,
    offline: OfflineOpt = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from spectra.jobs.remove_traps import RemoveTrapsOptions, remove_traps

    options = RemoveTrapsOptions(
        traps=tuple(trap or ()),
        mp_method=mp_method,
        seed=seed,
        min_evals=min_evals,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        roles=tuple(split_csv(roles)),
        hub=hub_options(revision, disk_budget, offline),
    )
    n_threads = cli_threads(threads)
    log = ProgressLog("remove-traps", enabled=not is_interactive())
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err_console, disable=not is_interactive()) as bar:
        task = bar.add_task("removing traps", total=None)

        def tick(done: int, total: int, key: str) -> None:
            bar.update(task, completed=done, total=total)
            log.update("matrices", done, total)

        result = remove_traps(source, out, options, force=force, progress=tick, threads=n_threads)
    if result.removed:
        what = f"removed {result.removed} traps from {len(result.changed)} of"
    else:
        what = "no trap removed (the copy is unchanged) in"
    console.print(
        one_line(
            f"{what} {len(result.matrices)} matrices ({len(result.skipped)} skipped, listed in "
            f"traps.json); wrote {result.out}"
        ),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add `remove-traps` to the root app."""
    app.command("remove-traps", help=HELP)(remove_traps_cmd)
