"""`spectra report [SOURCE] --out DIR`: HT-SR analysis as an HTML/Markdown/JSON/CSV folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from spectra.cli._common import (
    CacheDirOpt,
    DeviceOpt,
    DiskBudgetOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    NoCacheOpt,
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
from spectra.errors import ValidationError

if TYPE_CHECKING:
    from spectra.analysis.results import Analysis

HELP = (
    "HT-SR report of every weight matrix: power-law alpha of the ESD (WeightWatcher's "
    "definitions), norms, stable rank, entropy, outlier ratio, warnings, model summary.\n\n"
    "Writes report.html (self-contained), report.md, metrics.json, metrics.csv and plots/*.png "
    "into DIR, atomically. Without SOURCE it reports on the bundled all-MiniLM-L6-v2."
)
DEFAULT_OUT = "spectra-report"


class ReportProgress:
    """A rich progress bar on stderr (matrices, MB read, ETA) fed by the engine's callback
    `progress(done, total, bytes_read)` when stderr is a terminal; off a terminal, periodic
    progress lines instead (`ProgressLog`). `enabled=False` (quiet): neither."""

    def __init__(self, *, enabled: bool) -> None:
        interactive = is_interactive()
        self.log = ProgressLog("report", enabled=enabled and not interactive)
        enabled = enabled and interactive
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("matrices, {task.fields[mb]:,.0f} MB read"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            disable=not enabled,
        )
        self.task = self.bar.add_task("spectra", total=None, mb=0.0)

    def __call__(self, done: int, total: int, bytes_read: int) -> None:
        self.log.update("matrices", done, total, f"{bytes_read / 1e6:,.0f} MB read")
        self.bar.update(self.task, completed=done, total=total, mb=bytes_read / 1e6)
        if done == total:
            self.bar.update(self.task, description="metrics")

    def __enter__(self) -> ReportProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def _cache_arg(no_cache: bool, cache_dir: str | None) -> bool | Path:
    """--no-cache / --cache-dir -> analyze()'s `cache` (False, a folder, or True)."""
    if no_cache and cache_dir:
        raise ValidationError("--no-cache and --cache-dir contradict each other: pass one of them")
    if no_cache:
        return False
    return Path(cache_dir).expanduser() if cache_dir else True


def _budget_bytes(max_memory: float | None) -> int | None:
    """--max-memory MiB -> bytes (None: the engine's default)."""
    if max_memory is None:
        return None
    if not max_memory > 0 or max_memory == float("inf"):
        raise ValidationError(f"--max-memory must be a positive number of MiB, got {max_memory}")
    return max(1, int(max_memory * 2**20))


def _xmax_arg(xmax: str | None) -> int | str | None:
    """--xmax: an integer (its sign ignored, as WeightWatcher's -k) or 'force'."""
    if xmax is None or xmax == "force":
        return xmax
    try:
        return abs(int(xmax))
    except ValueError:
        raise ValidationError(f"--xmax must be an integer or 'force', got {xmax[:40]!r}") from None


#: report_cmd parameters that change only what is written or where the cache is, not a number
#: of the analysis; every other parameter (including any added later) is part of the key of
#: a cached analysis, so a new option can never be served a result computed without it.
_NOT_COMPUTED = frozenset(
    {"out", "formats", "force", "max_esd_plots", "quiet", "no_cache", "cache_dir"}
    # a Hub source is never served from the analysis cache (no local files to key it by);
    # for a local one these change no number
    | {"revision", "disk_budget", "offline"}
)


def _cached_analysis(
    source: str | None,
    computed: dict[str, object],
    cache: bool | Path,
    compute: Callable[[], Analysis | None],
) -> Analysis | None:
    """The Analysis from the analysis cache when the source's files and every computing option
    are unchanged (no torch import then), else `compute()`, kept there."""
    from spectra.jobs.report_cache import AnalysisCache, analysis_key, under_torchrun
    from spectra.sources.bundled import bundled_model_path

    if cache is False or under_torchrun():
        return compute()
    stored = AnalysisCache(None if cache is True else cache)
    path = bundled_model_path() if source is None else Path(source).expanduser().absolute()
    key = analysis_key(path, computed)
    found = None if key is None else stored.get(key)
    if found is not None:
        return found
    analysis = compute()
    if analysis is not None and key is not None:
        stored.put(key, analysis)
    return analysis


@handle_errors
def report_cmd(
    source: Annotated[
        str | None,
        typer.Argument(
            help="A .safetensors file, a folder of shards or a Hub repo id "
            "(default: the bundled all-MiniLM-L6-v2).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output folder (created; refused if not empty).")
    ] = DEFAULT_OUT,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    roles: RolesOpt = None,
    device: DeviceOpt = "auto",
    no_cache: NoCacheOpt = False,
    cache_dir: CacheDirOpt = None,
    formats: Annotated[
        str,
        typer.Option("--format", help="Comma-separated subset of html,md,json,csv (default all)."),
    ] = "html,md,json,csv",
    force: ForceOpt = False,
    mp_fit: Annotated[
        bool,
        typer.Option(
            "--mp-fit",
            help="Add the Marchenko-Pastur bulk edge and spike count (cheap: no extra SVD).",
        ),
    ] = False,
    randomize: Annotated[
        bool,
        typer.Option(
            "--randomize",
            help="Add the shuffled-entries control (costs one extra spectrum per matrix, "
            "about doubling the run).",
        ),
    ] = False,
    mp_method: Annotated[
        str,
        typer.Option(
            "--mp-method",
            help="How --mp-fit and --randomize fit the MP bulk: 'quantile' (spectra's quantile "
            "fit of sigma) or 'ww' (WeightWatcher 0.7.7's brute-force KDE fit: its num_spikes, "
            "sigma_mp, mp_softrank, rand_num_spikes).",
        ),
    ] = "quantile",
    weak_rank_tol: Annotated[
        float,
        typer.Option(
            "--weak-rank-tol",
            help="weak_rank_loss counts eigenvalues below this (WeightWatcher's tolerance).",
        ),
    ] = 1e-6,
    min_evals: Annotated[
        int | None,
        typer.Option(
            "--min-evals",
            help="Skip (and list) matrices with min(m, n) below this (WeightWatcher: 8).",
            show_default=False,
        ),
    ] = None,
    max_evals: Annotated[
        int | None,
        typer.Option(
            "--max-evals",
            help="Skip (and list) matrices with min(m, n) above this (WeightWatcher: 15000).",
            show_default=False,
        ),
    ] = None,
    max_n: Annotated[
        int | None,
        typer.Option(
            "--max-n",
            help="Skip (and list) matrices with max(m, n) above this (WeightWatcher: 50000, "
            "silently).",
            show_default=False,
        ),
    ] = None,
    xmax: Annotated[
        str | None,
        typer.Option(
            "--xmax",
            help="An integer k: drop the k largest eigenvalues before the power-law fit "
            "(WeightWatcher's integer xmax; its -k means the same as k). 'force': fit the power "
            "law bounded at the largest eigenvalue (WeightWatcher's xmax='force').",
            show_default=False,
        ),
    ] = None,
    fit: Annotated[
        str,
        typer.Option(
            "--fit",
            help="'PL' (power law), 'TPL' (truncated power law x^-alpha e^-Lambda x: alpha and "
            "Lambda columns; one fit per xmin candidate: ~1 s per 384-eigenvalue matrix, growing "
            "as N^2) or 'E_TPL' "
            "(TPL with xmin searched near the ESD's peak, as --fix-fingers xmin_peak); "
            "WeightWatcher's fit.",
        ),
    ] = "PL",
    best_fit: Annotated[
        bool,
        typer.Option(
            "--best-fit",
            help="Add best_fit: power_law, truncated_power_law, lognormal or exponential, by "
            "likelihood-ratio tests on the fitted tail (Clauset et al. 2009).",
        ),
    ] = False,
    fit_entropy: Annotated[
        bool,
        typer.Option(
            "--fit-entropy",
            help="Add fit_entropy: entropy of the histogram of the KS distance over the xmin "
            "candidates (low: a clear xmin).",
        ),
    ] = False,
    fix_fingers: Annotated[
        str | None,
        typer.Option(
            "--fix-fingers",
            help="'clip_xmax': refit without the top 1..--max-fingers eigenvalues, keep the "
            "first fit whose alpha drops by over --finger-thresh; 'xmin_peak': search xmin "
            "only between 0.95x the ESD's peak and --xmin-max (WeightWatcher's fix_fingers).",
            show_default=False,
        ),
    ] = None,
    xmin_max: Annotated[
        float | None,
        typer.Option(
            "--xmin-max",
            help="Upper bound of xmin for --fix-fingers xmin_peak (default 1.5x the peak).",
            show_default=False,
        ),
    ] = None,
    max_fingers: Annotated[
        int,
        typer.Option("--max-fingers", help="Most eigenvalues --fix-fingers clip_xmax removes."),
    ] = 10,
    finger_thresh: Annotated[
        float,
        typer.Option(
            "--finger-thresh",
            help="How much alpha must drop for --fix-fingers clip_xmax to accept a clip.",
        ),
    ] = 1.0,
    ww_quirks: Annotated[
        bool,
        typer.Option(
            "--ww-quirks",
            help="Reproduce WeightWatcher 0.7.7's quirks of --fix-fingers (xmin_peak's log10 "
            "lower bound, clip_xmax's counting; docs/methods.md 2b), only to match its numbers.",
        ),
    ] = False,
    detx: Annotated[
        bool,
        typer.Option(
            "--detx", help="Add WeightWatcher's detX columns (detX_num, detX_val: det X = 1 tail)."
        ),
    ] = False,
    vectors: Annotated[
        bool,
        typer.Option(
            "--vectors",
            help="Add WeightWatcher's vector localization columns (entropy, localization and "
            "participation ratios of the singular vectors, bulk vs tail; one extra "
            "eigendecomposition per matrix).",
        ),
    ] = False,
    alpha_ci: Annotated[
        int,
        typer.Option(
            "--alpha-ci",
            help="Resamples of a seeded bootstrap confidence interval for alpha over the tail "
            "(0: off; e.g. 1000).",
        ),
    ] = 0,
    ci_level: Annotated[
        float, typer.Option("--ci-level", help="Confidence level of --alpha-ci.")
    ] = 0.95,
    traps: Annotated[
        bool,
        typer.Option(
            "--traps",
            help="Find correlation traps: large weights that survive a shuffle as spikes past "
            "the MP bulk; num_traps and where each sits (row, col). One full SVD per matrix.",
        ),
    ] = False,
    expert_overlap: Annotated[
        int,
        typer.Option(
            "--expert-sim",
            help="Mixture-of-experts models: k of the expert similarity (overlap of the experts' "
            "top-k singular subspaces per layer and role; one more read of every routed "
            "expert). 0: off.",
        ),
    ] = 16,
    max_esd_plots: Annotated[
        int,
        typer.Option(
            "--max-esd-plots",
            help="ESD plots drawn at most (beyond it: warned layers, then a set per role).",
        ),
    ] = 64,
    max_memory: Annotated[
        float | None,
        typer.Option(
            "--max-memory",
            help="Working-memory budget of one decomposition batch, in MiB (default: 1024 on "
            "the CPU, half the free GPU memory). A matrix over it is computed alone, chunked "
            "or on the CPU, with a warning.",
            show_default=False,
        ),
    ] = None,
    threads: ThreadsOpt = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar and no summary table.")
    ] = False,
    revision: RevisionOpt = None,
    disk_budget: DiskBudgetOpt = None,
    offline: OfflineOpt = False,
) -> None:
    computed = {k: v for k, v in locals().items() if k not in _NOT_COMPUTED}
    from spectra.blobcache import BlobCache
    from spectra.outdir import check_output_dir
    from spectra.reports.report import parse_formats, write_report
    from spectra.reports.terminal import print_summary

    wanted = parse_formats(formats)
    if max_esd_plots < 0:
        raise ValidationError(f"--max-esd-plots must be >= 0, got {max_esd_plots}")
    budget = _budget_bytes(max_memory)
    hub = hub_options(revision, disk_budget, offline)
    final = Path(out).expanduser().absolute()
    protect = (source, cache_dir)  # never replaced, even with --force
    check_output_dir(final, force=force, protect=protect)  # fail before the work, not after it
    cache = _cache_arg(no_cache, cache_dir)
    n_threads = cli_threads(threads)

    def compute() -> Analysis | None:
        from spectra.jobs.report import AnalyzeOptions, analyze

        options = AnalyzeOptions(
            include=tuple(include or ()),
            exclude=tuple(exclude or ()),
            roles=tuple(split_csv(roles)),
            device=device,
            mp_fit=mp_fit,
            randomize=randomize,
            mp_method=mp_method,
            weak_rank_tol=weak_rank_tol,
            min_evals=min_evals,
            max_evals=max_evals,
            max_n=max_n,
            xmax=_xmax_arg(xmax),
            fit=fit,
            best_fit=best_fit,
            fit_entropy=fit_entropy,
            fix_fingers=fix_fingers,
            xmin_max=xmin_max,
            max_fingers=max_fingers,
            finger_thresh=finger_thresh,
            ww_quirks=ww_quirks,
            detx=detx,
            vectors=vectors,
            alpha_ci=alpha_ci,
            ci_level=ci_level,
            traps=traps,
            expert_overlap=expert_overlap,
        )
        with ReportProgress(enabled=not quiet) as progress:
            # Under torchrun each rank analyzes its share; rank 0 gets the whole Analysis.
            return analyze(
                source,
                options,
                cache=cache,
                progress=progress,
                max_memory=budget,
                threads=n_threads,
                hub=hub,
            )

    analysis = _cached_analysis(source, computed, cache, compute)
    if analysis is None:  # a non-writer rank under torchrun
        return
    paths = write_report(
        analysis,
        final,
        formats=wanted,
        force=force,
        max_esd_plots=max_esd_plots,
        protect=protect,
        plot_cache=None if cache is False else BlobCache(cache_dir, "plots"),
    )
    if not quiet:
        print_summary(analysis, console)
        console.print(
            one_line(f"wrote {len(paths)} files to {final}"), highlight=False, markup=False
        )


def register(app: typer.Typer) -> None:
    """Add `spectra report` to the root app."""
    app.command("report", help=HELP)(report_cmd)
