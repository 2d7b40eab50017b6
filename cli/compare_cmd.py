"""`spectra compare BASE FINETUNED --out DIR`: intruder dimensions and update forensics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from spectra.cli._common import (
    BaseRevisionOpt,
    DeviceOpt,
    ExcludeOpt,
    FinetunedRevisionOpt,
    ForceOpt,
    IncludeOpt,
    OfflineOpt,
    PairDiskBudgetOpt,
    ProgressLog,
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
from spectra.errors import ValidationError

HELP = (
    "Compare a fine-tune with its base: intruder dimensions (arXiv 2410.21228), the update "
    "dW (rank, stable/effective rank, relative change), subspace drift, alpha before/after, "
    "and verdicts (which layers moved; LoRA-like low-rank or full-rank).\n\n"
    "FINETUNED may be a checkpoint or a PEFT LoRA adapter folder."
)


def _epsilons(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in split_csv(value))
    except ValueError as exc:
        raise ValidationError(
            f"--epsilon {value!r} is not a comma-separated list of numbers, e.g. 0.5,0.6,0.7"
        ) from exc


@handle_errors
def compare_cmd(
    base: Annotated[str, typer.Argument(help="Base checkpoint: file, folder or Hub repo id.")],
    finetuned: Annotated[
        str, typer.Argument(help="Fine-tuned checkpoint, or a PEFT LoRA adapter folder.")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    k: Annotated[int, typer.Option("--k", help="Top singular vectors tested (paper: 10).")] = 10,
    epsilon: Annotated[
        str, typer.Option("--epsilon", help="Thresholds, comma-separated (paper: 0.5).")
    ] = "0.5",
    map_rules: Annotated[
        list[str] | None,
        typer.Option(
            "--map", help="Rename fine-tuned keys: 'regex=>replacement' (repeatable, in order)."
        ),
    ] = None,
    allow_missing: Annotated[
        bool,
        typer.Option("--allow-missing", help="Compare what pairs; list one-sided tensors."),
    ] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    roles: RolesOpt = None,
    device: DeviceOpt = "auto",
    cache_dir: Annotated[
        str | None,
        typer.Option(
            "--cache-dir",
            help="Keep the base's float64 singular vectors here to reuse them when comparing other "
            "fine-tunes of the same base: 1.8x faster from the second on (off by default: about "
            "2x the base's float32 size on disk, e.g. 6.6 GB for a 1B model).",
        ),
    ] = None,
    force: ForceOpt = False,
    base_revision: BaseRevisionOpt = None,
    revision: FinetunedRevisionOpt = None,
    disk_budget: PairDiskBudgetOpt = None,
    offline: OfflineOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    from spectra.analysis.comparison import CompareOptions
    from spectra.jobs.compare import compare
    from spectra.outdir import check_output_dir
    from spectra.reports.compare import print_summary, write_compare

    protect = (base, finetuned, cache_dir)  # never replaced, even with --force
    check_output_dir(Path(out).expanduser().absolute(), force=force, protect=protect)
    options = CompareOptions(
        k=k,
        epsilons=_epsilons(epsilon),
        map=tuple(map_rules or ()),
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        roles=tuple(split_csv(roles)),
        allow_missing=allow_missing,
        device=device,
    )
    cache = Path(cache_dir).expanduser() if cache_dir else None
    hubs = (
        hub_options(base_revision, disk_budget, offline, parts=2),
        hub_options(revision, disk_budget, offline, parts=2),
    )
    log = ProgressLog("compare", enabled=not is_interactive())
    with _progress() as bar:
        task = bar.add_task("comparing", total=None)

        def tick(done: int, total: int, key: str) -> None:
            log.update("pairs", done, total, _short(key))
            bar.update(task, completed=done, total=total, description=_short(key))

        # Under torchrun each rank compares its share of pairs; rank 0 gets the whole result.
        cmp = compare(
            base,
            finetuned,
            options,
            cache=cache,
            progress=tick,
            hub=hubs,
            threads=cli_threads(threads),
        )
    if cmp is None:  # a non-writer rank under torchrun
        return
    paths = write_compare(cmp, out, force=force, protect=protect)
    print_summary(cmp, console)
    console.print(
        one_line(f"wrote {len(paths)} files to {Path(out).expanduser().absolute()}"),
        highlight=False,
        markup=False,
    )


def _short(key: str, limit: int = 48) -> str:
    from spectra.reports.terminal import safe

    return safe(key if len(key) <= limit else "…" + key[-(limit - 1) :])


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not is_interactive(),
    )


def register(app: typer.Typer) -> None:
    """Add `spectra compare` to the root app."""
    app.command("compare", help=HELP)(compare_cmd)
