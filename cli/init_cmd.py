"""`spectra init SOURCE --method pissa --rank 16 --targets q,k,v,o,up,gate,down --out DIR`."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from spectra.cli._common import (
    DeviceOpt,
    DiskBudgetOpt,
    ForceOpt,
    OfflineOpt,
    ProgressLog,
    RevisionOpt,
    ThreadsOpt,
    cli_threads,
    console,
    err_console,
    handle_errors,
    hub_options,
    is_interactive,
    one_line,
)

if TYPE_CHECKING:
    from spectra.jobs.init import InitResult


class _Bar:
    """Progress on stderr, one bar per phase (calibration batches, then matrices); off a
    terminal, periodic progress lines instead (`ProgressLog`)."""

    def __init__(self, enabled: bool) -> None:
        self.log = ProgressLog("init", enabled=not enabled)
        self.bar = (
            Progress(
                TextColumn("{task.fields[phase]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=err_console,
                transient=True,
            )
            if enabled
            else None
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _update(self, phase: str, done: int, total: int, text: str) -> None:
        self.log.update(phase, done, total, text)
        if self.bar is None:
            return
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task("", total=total, phase=phase)
        self.bar.update(self.tasks[phase], completed=done, total=total, description=text)

    def __call__(self, done: int, total: int, key: str) -> None:
        from spectra.reports.terminal import safe

        self._update("init", done, total, safe(key))

    def calibration(self, done: int, total: int) -> None:
        self._update("calibration", done, total, "forward batches")


METHOD_HELP = (
    "Initializer. SVD of the weights: pissa (top r), milora (bottom r), olora (QR); "
    "lamda++: LaMDA++ (energy reading of arXiv 2406.12832, not the paper's formula): ranks "
    "proportional to weight-spectrum energy beyond a base rank, top-r SVD factors. "
    "From calibration data (--calib): corda-ipm / corda-kpm (largest / smallest components of "
    "W C, C = input covariance; arXiv 2406.05223), eva (A = top principal directions of the "
    "layer inputs, B = 0, ranks redistributed by explained variance; arXiv 2410.07170)."
)
CALIB_PANEL = "Calibration (corda-ipm, corda-kpm, eva)"


@handle_errors
def init(
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    source: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint: .safetensors file, folder, Hub id "
            "(default: the bundled all-MiniLM-L6-v2).",
            show_default=False,
        ),
    ] = None,
    method: Annotated[str, typer.Option("--method", help=METHOD_HELP)] = "pissa",
    rank: Annotated[
        int,
        typer.Option(
            "--rank",
            "-r",
            help="Rank per module (mean rank with --allocate; eva: the mean before "
            "redistribution).",
        ),
    ] = 16,
    targets: Annotated[
        str,
        typer.Option(
            "--targets",
            help="Comma list of roles (q,k,v,o,up,gate,down; expert: MoE experts), module paths "
            "or suffixes, globs, or re:<regex>.",
        ),
    ] = "q,k,v,o,up,gate,down",
    allocate: Annotated[
        str | None,
        typer.Option(
            "--allocate",
            help="Rank allocator: uniform, energy, alpha-power, alpha-linear, lamda++ "
            "(default for --method lamda++).",
        ),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option("--budget", help="Total rank (or parameters with --budget-unit params)."),
    ] = None,
    budget_unit: Annotated[str, typer.Option("--budget-unit", help="rank or params.")] = "rank",
    min_rank: Annotated[int, typer.Option("--min-rank", help="Smallest rank per module.")] = 1,
    max_rank: Annotated[
        int | None, typer.Option("--max-rank", help="Largest rank per module.")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="LoRA alpha for every module (default: r).")
    ] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="Scale alpha / sqrt(r).")] = False,
    exact: Annotated[
        bool, typer.Option("--exact", help="Exact SVD for every matrix (default: auto).")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Adapter storage dtype: float32, bfloat16, float16.")
    ] = "float32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of randomized SVDs.")] = 0,
    residual_dtype: Annotated[
        str,
        typer.Option(
            "--residual-dtype",
            help="Residual base storage: 'source' (the source's dtypes; a bfloat16/float16 "
            "residual is warned about with its reconstruction error) or 'float32' "
            "(half-precision tensors stored as float32: float32-level reconstruction error, "
            "twice their size).",
        ),
    ] = "source",
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib",
            help="Calibration text: a text file (one sample per line) or JSONL (.jsonl/.ndjson). "
            "Omitted: a small built-in English corpus (fine for a demo; use data from your task).",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = None,
    text_field: Annotated[
        str,
        typer.Option(
            "--text-field", help="JSONL field holding the text.", rich_help_panel=CALIB_PANEL
        ),
    ] = "text",
    samples: Annotated[
        int,
        typer.Option("--samples", help="Use the first N samples.", rich_help_panel=CALIB_PANEL),
    ] = 128,
    max_length: Annotated[
        int,
        typer.Option(
            "--max-length",
            help="Tokens per sample (longer ones are cut).",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = 128,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="Samples per forward pass (any size: padding never enters the statistics).",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = 8,
    max_batches: Annotated[
        int | None,
        typer.Option(
            "--max-batches",
            help="Cap on forward batches (eva stops earlier once every layer converged).",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = None,
    tau: Annotated[
        float,
        typer.Option(
            "--tau",
            help="eva: a component has converged when |cos| to its previous estimate >= tau.",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = 0.99,
    rho: Annotated[
        float,
        typer.Option(
            "--rho",
            help="eva: compute rho * r components per layer and keep the globally best; a layer "
            "can end with rank 0 (no adapter). 1 = no redistribution.",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = 2.0,
    adjust_scaling: Annotated[
        bool,
        typer.Option(
            "--adjust-scaling/--no-adjust-scaling",
            help="eva: alpha_l = alpha * r_l / r, so each layer keeps its LoRA scale after "
            "redistribution.",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = True,
    stats_out: Annotated[
        str | None,
        typer.Option(
            "--stats-out",
            help="Save the calibration statistics (safetensors) to reuse with --stats.",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = None,
    stats: Annotated[
        str | None,
        typer.Option(
            "--stats",
            help="Reuse statistics saved with --stats-out (no forward passes; same method family "
            "and targets).",
            rich_help_panel=CALIB_PANEL,
        ),
    ] = None,
    force: ForceOpt = False,
    revision: RevisionOpt = None,
    disk_budget: DiskBudgetOpt = None,
    offline: OfflineOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Write SVD- or data-initialized LoRA adapters PEFT loads as they are, with the residual
    base where the method changes it, and a spectra.json manifest.

    Under torchrun, weight-only methods split the factorizations over the ranks and rank 0
    writes the outputs; calibration methods run on rank 0 alone (the other ranks exit at once).
    """
    from spectra.adapt.registry import get_initializer
    from spectra.export.decoded import DequantizedBaseWarning
    from spectra.export.residual import ResidualPrecisionWarning
    from spectra.jobs.init import CalibrationRequest, InitOptions, run_init
    from spectra.sources.bundled import bundled_model_path

    options = InitOptions(
        out=out,
        method=method,
        rank=rank,
        targets=targets,
        allocator=allocate,
        budget=budget,
        budget_unit=budget_unit,
        min_rank=min_rank,
        max_rank=max_rank,
        alpha=alpha,
        rslora=rslora,
        svd="exact" if exact else "auto",
        device=device,
        dtype=dtype,
        seed=seed,
        force=force,
        residual_dtype=residual_dtype,
        hub=hub_options(revision, disk_budget, offline),
    )
    init_method = get_initializer(method)
    calibration = None
    if init_method.needs_calibration:
        calibration = CalibrationRequest(
            calib=calib,
            text_field=text_field,
            samples=samples,
            max_length=max_length,
            batch_size=batch_size,
            max_batches=max_batches,
            tau=tau,
            rho=rho,
            adjust_scaling=adjust_scaling,
            stats=stats,
            stats_out=stats_out,
        )
    elif calib is not None or stats is not None:
        err_console.print(
            f"note: {init_method.name} reads only the weights; --calib/--stats are ignored",
            highlight=False,
            markup=False,
        )
    with _Bar(is_interactive()) as bar:
        if calibration is not None:
            calibration = replace(calibration, progress=bar.calibration)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResidualPrecisionWarning)
            warnings.simplefilter("always", DequantizedBaseWarning)
            result = run_init(
                str(bundled_model_path()) if source is None else source,
                options,
                calibration=calibration,
                progress=bar,
                threads=cli_threads(threads),
            )
    for w in caught:  # the residual-precision and dequantized-base notes as one line each
        if issubclass(w.category, (ResidualPrecisionWarning, DequantizedBaseWarning)):
            err_console.print(
                f"warning: {w.message}", highlight=False, markup=False, soft_wrap=True
            )
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if result is None:  # a non-zero rank under torchrun: rank 0 writes everything
        return
    _print_result(result)


def _print_result(res: InitResult) -> None:
    ranks = list(res.plan.ranks.values())
    console.print(
        f"{res.plan.method}: {len(ranks)} modules, ranks {min(ranks)}-{max(ranks)} "
        f"(total {sum(ranks)}), max reconstruction error {res.max_error:.2e}, "
        f"{res.seconds:.1f} s",
        highlight=False,
        markup=False,
    )
    calib = res.calibration
    if calib is not None:
        skipped = calib.get("skipped") or {}
        console.print(
            f"calibration: {calib.get('samples')} samples, {calib.get('tokens')} tokens, "
            f"{calib.get('batches')} batches (stopped: {calib.get('stop')}), "
            f"{len(skipped)} target(s) skipped (see spectra.json)",
            highlight=False,
            markup=False,
        )
    console.print(
        one_line(f"adapter: {res.adapter_dir}"), highlight=False, soft_wrap=True, markup=False
    )
    if res.residual_dir is not None:
        console.print(
            one_line(f"residual base: {res.residual_dir}"),
            highlight=False,
            soft_wrap=True,
            markup=False,
        )


def register(app: typer.Typer) -> None:
    """Add `init` to the root app."""
    app.command("init")(init)
