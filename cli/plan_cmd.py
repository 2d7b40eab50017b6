"""`spectra plan [SOURCE] --for KIND --out FILE`: a fine-tuning or pruning recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spectra.cli._common import (
    CacheDirOpt,
    DeviceOpt,
    DiskBudgetOpt,
    ForceOpt,
    NoCacheOpt,
    OfflineOpt,
    RevisionOpt,
    ThreadsOpt,
    cli_threads,
    console,
    handle_errors,
    hub_options,
    is_interactive,
    one_line,
    split_csv,
)
from spectra.errors import ValidationError

HELP = "\n\n".join(
    [
        (
            "Turn the spectra of a checkpoint into the recipe another tool runs. Spectra come "
            "from the spectrum cache that `spectra report` fills (a plan after a report reads "
            "no weights). Every plan records the per-module or per-layer numbers it was made "
            'from and its definition (docs/methods.md, "Plans").'
        ),
        (
            "--for peft: a LoraConfig folder (adapter_config.json, and spectra_plan.json with "
            "the numbers) for LoraConfig.from_pretrained(OUT); ranks exactly as `spectra init` "
            "gives them for the same --targets, --rank, --allocate, --budget, --min-rank, "
            "--max-rank, --alpha, --rslora; --layers adapts only those layer indices."
        ),
        (
            "--for spectrum: cognitivecomputations/spectrum. SNR of every matrix against its "
            "Marchenko-Pastur edge, the top --fraction (default 0.5) per module type, written "
            "as its axolotl `unfrozen_parameters` YAML (OUT.yaml; OUT.json for JSON)."
        ),
        (
            "--for owlore: OwLore layer sampling, p_l = layer l's share of weight outliers "
            "(--outlier-multiplier, default 13), --activated-layers per interval. JSON."
        ),
        ("--for lisa: LISA layer sampling, uniform p_l = 1 / N_L. JSON."),
        (
            "--for alphapruning: AlphaPruning sparsity per matrix around --sparsity (default "
            "0.7) within --epsilon (0.3), from --metric alpha_peak (the paper's) or alpha. "
            "JSON."
        ),
        (
            "--for kappa: PEFT's find_kappa_target_modules, the --fraction (default 0.2) of "
            "linear modules with the lowest condition number S[0] / (S[-1] + 1e-8). JSON."
        ),
    ]
)


def _cache_arg(no_cache: bool, cache_dir: str | None) -> bool | Path:
    if no_cache and cache_dir:
        raise ValidationError("--no-cache and --cache-dir contradict each other: pass one of them")
    if no_cache:
        return False
    return Path(cache_dir).expanduser() if cache_dir else True


def _layers(value: str | None) -> list[int] | None:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    if value is None:
        return None
    out: list[int] = []
    for item in split_csv(value):
        low, _, high = item.partition("-")
        try:
            a, b = int(low), int(high or low)
        except ValueError:
            raise ValidationError(
                f"--layers {value[:40]!r}: give indices and ranges like 0-3,7"
            ) from None
        if a < 0 or b < a:
            raise ValidationError(f"--layers range {item[:40]!r} must be 0 <= first <= last")
        out.extend(range(a, b + 1))
    if not out:
        raise ValidationError("--layers is empty: give indices like 0-3,7")
    return sorted(set(out))


@handle_errors
def plan_cmd(
    kind: Annotated[
        str,
        typer.Option(
            "--for", help="peft, spectrum, owlore, lisa, alphapruning or kappa (see above)."
        ),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output file (a folder for --for peft).")],
    source: Annotated[
        str | None,
        typer.Argument(
            help="A .safetensors file, a folder of shards or a Hub repo id "
            "(default: the bundled all-MiniLM-L6-v2).",
            show_default=False,
        ),
    ] = None,
    force: ForceOpt = False,
    targets: Annotated[
        str, typer.Option("--targets", help="peft: roles, module paths, globs or re:<regex>.")
    ] = "q,k,v,o,up,gate,down",
    layers: Annotated[
        str | None, typer.Option("--layers", help="peft: layer indices, e.g. 0-3,7.")
    ] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="peft: (mean) rank.")] = 16,
    allocate: Annotated[
        str | None,
        typer.Option(
            "--allocate",
            help="peft: rank allocator (uniform, energy, alpha-power, alpha-linear, lamda++).",
        ),
    ] = None,
    budget: Annotated[int | None, typer.Option("--budget", help="peft: total budget.")] = None,
    budget_unit: Annotated[
        str, typer.Option("--budget-unit", help="peft: rank or params.")
    ] = "rank",
    min_rank: Annotated[int, typer.Option("--min-rank", help="peft: smallest rank.")] = 1,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="peft: largest rank.")] = None,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="peft: lora_alpha (default: r per module).")
    ] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="peft: alpha / sqrt(r).")] = False,
    fraction: Annotated[
        float | None,
        typer.Option(
            "--fraction", help="spectrum / kappa: top share in (0, 1] (default 0.5 / 0.2)."
        ),
    ] = None,
    max_dim: Annotated[
        int, typer.Option("--max-dim", help="kappa: skip matrices with a side above it.")
    ] = 16384,
    activated_layers: Annotated[
        int, typer.Option("--activated-layers", help="owlore / lisa: layers per interval.")
    ] = 2,
    outlier_multiplier: Annotated[
        float, typer.Option("--outlier-multiplier", help="owlore: M of |W| > M mean|W|.")
    ] = 13.0,
    sparsity: Annotated[
        float, typer.Option("--sparsity", help="alphapruning: target sparsity in (0, 1).")
    ] = 0.7,
    epsilon: Annotated[
        float, typer.Option("--epsilon", help="alphapruning: ratios in [s - eps, s + eps].")
    ] = 0.3,
    mapping: Annotated[
        str, typer.Option("--mapping", help="alphapruning: block_wise or layer_wise.")
    ] = "block_wise",
    metric: Annotated[
        str, typer.Option("--metric", help="alphapruning: alpha_peak or alpha.")
    ] = "alpha_peak",
    matrices_only: Annotated[
        bool,
        typer.Option(
            "--matrices-only",
            help="spectrum: skip 1-D weights (norms; the tool scores each 1, so it keeps the "
            "first share of them in module order).",
        ),
    ] = False,
    html: Annotated[
        str | None,
        typer.Option("--html", help="Also write an HTML page of the plan (chosen modules/layers)."),
    ] = None,
    device: DeviceOpt = "auto",
    no_cache: NoCacheOpt = False,
    cache_dir: CacheDirOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no summary.")] = False,
    revision: RevisionOpt = None,
    disk_budget: DiskBudgetOpt = None,
    offline: OfflineOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    from spectra.cli.report_cmd import ReportProgress
    from spectra.jobs.plan import PlanOptions, make_plan
    from spectra.outfile import check_output_file, write_output_file
    from spectra.reports.plan import plan_html

    cache = _cache_arg(no_cache, cache_dir)
    n_threads = cli_threads(threads)
    if html is not None:  # refused before any work, like --out
        check_output_file(html, force=force, protect=(source, cache_dir, out))
    hub = hub_options(revision, disk_budget, offline)
    options = PlanOptions(
        kind=kind,
        out=out,
        force=force,
        targets=targets,
        layers=_layers(layers),
        rank=rank,
        allocator=allocate,
        budget=budget,
        budget_unit=budget_unit,
        min_rank=min_rank,
        max_rank=max_rank,
        alpha=alpha,
        rslora=rslora,
        fraction=fraction,
        max_dim=max_dim,
        activated_layers=activated_layers,
        outlier_multiplier=outlier_multiplier,
        sparsity=sparsity,
        epsilon=epsilon,
        mapping=mapping,
        metric=metric,
        with_vectors=not matrices_only,
        device=device,
    )
    with ReportProgress(enabled=not quiet and is_interactive()) as progress:
        result = make_plan(
            source, options, cache=cache, progress=progress, hub=hub, threads=n_threads
        )
    if html is not None:
        write_output_file(html, plan_html(result.plan), force=force, protect=(source, out))
    if not quiet:
        console.print(
            one_line(
                f"{result.kind} plan: {len(result.chosen)} chosen; wrote "
                f"{', '.join(str(p) for p in result.files)} in {result.seconds:.1f} s"
            ),
            highlight=False,
            markup=False,
        )


def register(app: typer.Typer) -> None:
    """Add `spectra plan` to the root app."""
    app.command("plan", help=HELP)(plan_cmd)
