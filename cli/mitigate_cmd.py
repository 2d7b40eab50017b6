"""`spectra mitigate BASE FINETUNED --out DIR`: scale a fine-tune's intruder dimensions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spectra.cli._common import (
    BaseRevisionOpt,
    DeviceOpt,
    ExcludeOpt,
    FinetunedRevisionOpt,
    ForceOpt,
    IncludeOpt,
    OfflineOpt,
    PairDiskBudgetOpt,
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
    "Scale the intruder dimensions of a fine-tune (arXiv 2410.21228): every top-k left singular "
    "direction of a fine-tuned matrix whose max |cos| against the base's is below epsilon gets "
    "its singular value multiplied by lambda, W' = W_t + (lambda - 1) u s v^T. The matrices and "
    "directions are those `spectra compare` counts with the same --k/--epsilon.\n\n"
    "FINETUNED may be a checkpoint (a checkpoint is written, shard by shard, same files and "
    "dtypes) or a PEFT LoRA adapter folder (an adapter for the same base is written: rank r plus "
    "one per direction, or PEFT's own reduce_intruder_dimension with --rank-policy peft). "
    "No intruder found: nothing is written, exit 0."
)


@handle_errors
def mitigate_cmd(
    base: Annotated[str, typer.Argument(help="Base checkpoint: file, folder or Hub repo id.")],
    finetuned: Annotated[
        str, typer.Argument(help="Fine-tuned checkpoint, or a PEFT LoRA adapter folder.")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    lam: Annotated[
        float,
        typer.Option(
            "--lambda", help="Factor in (0, 1] for each intruder's singular value (PEFT: 0.75)."
        ),
    ] = 0.75,
    k: Annotated[int, typer.Option("--k", help="Top singular vectors tested (paper: 10).")] = 10,
    epsilon: Annotated[
        float, typer.Option("--epsilon", help="Intruder threshold on max |cos| (paper: 0.5).")
    ] = 0.5,
    rank_policy: Annotated[
        str,
        typer.Option(
            "--rank-policy",
            help="Adapters: 'extend' (rank r + directions, exact W') or 'peft' (rank r, as PEFT's "
            "reduce_intruder_dimension: the best rank-r fit of W' - W).",
        ),
    ] = "extend",
    map_rules: Annotated[
        list[str] | None,
        typer.Option(
            "--map", help="Rename fine-tuned keys: 'regex=>replacement' (repeatable, in order)."
        ),
    ] = None,
    allow_missing: Annotated[
        bool, typer.Option("--allow-missing", help="Mitigate what pairs; skip one-sided tensors.")
    ] = False,
    skip_base_check: Annotated[
        bool,
        typer.Option(
            "--skip-base-check",
            help="Accept an adapter whose base_model_name_or_path names another model than BASE.",
        ),
    ] = False,
    cache_dir: Annotated[
        str | None,
        typer.Option(
            "--cache-dir",
            help="compare's cache of the base's float64 singular vectors: reused when the base "
            "was compared (or mitigated) with the same folder, filled otherwise (off by default).",
        ),
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    roles: RolesOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    base_revision: BaseRevisionOpt = None,
    revision: FinetunedRevisionOpt = None,
    disk_budget: PairDiskBudgetOpt = None,
    offline: OfflineOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from spectra.jobs.mitigate import MitigateOptions, mitigate, nothing_message
    from spectra.reports.mitigate import print_summary

    options = MitigateOptions(
        lam=lam,
        k=k,
        epsilon=epsilon,
        rank_policy=rank_policy,
        map=tuple(map_rules or ()),
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        roles=tuple(split_csv(roles)),
        allow_missing=allow_missing,
        device=device,
        check_base_name=not skip_base_check,
        base_hub=hub_options(base_revision, disk_budget, offline, parts=2),
        hub=hub_options(revision, disk_budget, offline, parts=2),
    )
    n_threads = cli_threads(threads)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err_console, disable=not is_interactive()) as bar:
        task = bar.add_task("mitigating", total=None)

        def tick(done: int, total: int, key: str) -> None:
            bar.update(task, completed=done, total=total)

        cache = Path(cache_dir).expanduser() if cache_dir else None
        result = mitigate(
            base,
            finetuned,
            out,
            options,
            force=force,
            progress=tick,
            cache=cache,
            threads=n_threads,
        )
    if result is None:  # a torchrun rank other than 0: rank 0 writes and reports
        return
    if result.out is None:
        console.print(
            one_line(nothing_message(result)), highlight=False, markup=False, soft_wrap=True
        )
        return
    print_summary(result, console)
    console.print(
        one_line(f"wrote the mitigated {_what(result.mode)} to {result.out}"),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _what(mode: str) -> str:
    return "adapter" if mode == "lora" else "checkpoint"


def register(app: typer.Typer) -> None:
    """Add `mitigate` to the root app."""
    app.command("mitigate", help=HELP)(mitigate_cmd)
