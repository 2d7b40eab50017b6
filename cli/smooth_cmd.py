"""`spectra smooth SOURCE --out DIR`: WeightWatcher's SVDSmoothing / SVDSharpness, written as a
checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from spectra.cli._common import (
    DeviceOpt,
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
    "Write a copy of SOURCE whose matrices keep only their top singular components "
    "(WeightWatcher's SVDSmoothing) or lose them (--sharpen: SVDSharpness).\n\n"
    "Smoothing keeps the top k components of each matrix, W_k = U_k S_k V_k^T, with k chosen by "
    "--method: detx (WeightWatcher's default: the detX tail of the ESD), lambda_min (the "
    "power-law tail, num_pl_spikes), rmt (eigenvalues past the Marchenko-Pastur bulk) or svd "
    "(a share: int(--percent * min(m, n))). Sharpening drops as many top components as the "
    "matrix with its entries shuffled has spikes past the MP bulk (correlation traps). k = 0 "
    "leaves a matrix as it is.\n\n"
    "Exact float64 SVDs (WeightWatcher uses a randomized one). The checkpoint is written shard "
    "by shard: same files, tensor order and dtypes, index and config/tokenizer files; every "
    "other tensor byte for byte. A quantized or GGUF SOURCE is written dequantized (with a "
    "note). smoothing.json lists what was done to each matrix."
)


@handle_errors
def smooth_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint: file, folder or Hub repo id.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    sharpen: Annotated[
        bool,
        typer.Option(
            "--sharpen",
            help="Drop the top components instead (SVDSharpness): as many as the shuffled "
            "matrix's ESD has spikes past the MP bulk.",
        ),
    ] = False,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="How many components smoothing keeps: detx | lambda_min | rmt | svd "
            "(WeightWatcher's names and default).",
        ),
    ] = "detx",
    percent: Annotated[
        float,
        typer.Option("--percent", help="--method svd: the share of components kept, in (0, 1]."),
    ] = 0.8,
    mp_method: Annotated[
        str,
        typer.Option(
            "--mp-method",
            help="MP fit of --method rmt and --sharpen: quantile (spectra's) or ww "
            "(WeightWatcher's KDE fit: its spike counts).",
        ),
    ] = "quantile",
    seed: Annotated[
        int,
        typer.Option("--seed", help="--sharpen: seed of the shuffle (WeightWatcher's is random)."),
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
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    revision: RevisionOpt = None,
    disk_budget: DiskBudgetOpt = None,
    offline: OfflineOpt = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from spectra.jobs.smooth import SmoothOptions, smooth

    options = SmoothOptions(
        mode="sharpen" if sharpen else "smooth",
        method=method,
        percent=percent,
        mp_method=mp_method,
        seed=seed,
        min_evals=min_evals,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        roles=tuple(split_csv(roles)),
        device=device,
        hub=hub_options(revision, disk_budget, offline),
    )
    n_threads = cli_threads(threads)
    log = ProgressLog("smooth", enabled=not is_interactive())
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err_console, disable=not is_interactive()) as bar:
        task = bar.add_task("sharpening" if sharpen else "smoothing", total=None)

        def tick(done: int, total: int, key: str) -> None:
            bar.update(task, completed=done, total=total)
            log.update("matrices", done, total)

        result = smooth(source, out, options, force=force, progress=tick, threads=n_threads)
    verb = "sharpened" if sharpen else "smoothed"
    console.print(
        one_line(
            f"{verb} {len(result.changed)} of {len(result.matrices)} matrices "
            f"({len(result.skipped)} skipped, listed in smoothing.json); wrote {result.out}"
        ),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add `smooth` to the root app."""
    app.command("smooth", help=HELP)(smooth_cmd)
