"""`spectra init SOURCE --method pissa --rank 16 --targets q,k,v,o,up,gate,down --out DIR`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from spectra.cli._common import DeviceOpt, ForceOpt, console, handle_errors, is_interactive


class _Bar:
    """Progress over matrices on stderr; silent when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.bar = (
            Progress(
                TextColumn("init"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                transient=True,
            )
            if enabled
            else None
        )
        self.task = None

    def __enter__(self) -> _Bar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, done: int, total: int, key: str) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.task = self.bar.add_task("", total=total)
        self.bar.update(self.task, completed=done, description=key)


@handle_errors
def init(
    source: Annotated[str, typer.Argument(help="Checkpoint: .safetensors file, folder, Hub id.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    method: Annotated[
        str, typer.Option("--method", help="Initializer: pissa, milora, olora, ...")
    ] = "pissa",
    rank: Annotated[
        int, typer.Option("--rank", "-r", help="Rank per module (mean rank with --allocate).")
    ] = 16,
    targets: Annotated[
        str,
        typer.Option(
            "--targets",
            help="Comma list of roles (q,k,v,o,up,gate,down,...), module paths or suffixes, "
            "globs, or re:<regex>.",
        ),
    ] = "q,k,v,o,up,gate,down",
    allocate: Annotated[
        str | None,
        typer.Option(
            "--allocate", help="Rank allocator: uniform, energy, alpha-power, alpha-linear."
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
    force: ForceOpt = False,
) -> None:
    """Write SVD-initialized LoRA adapters PEFT loads as they are, with the residual base."""
    from spectra.adapt.init import init_adapter

    with _Bar(is_interactive()) as bar:
        res = init_adapter(
            source,
            method=method,
            rank=rank,
            targets=targets,
            out=out,
            allocator=allocate,
            budget=budget,
            budget_unit=budget_unit,
            min_rank=min_rank,
            max_rank=max_rank,
            alpha=alpha,
            rslora=rslora,
            exact=exact,
            device=device,
            dtype=dtype,
            seed=seed,
            force=force,
            progress=bar,
        )
    ranks = list(res.plan.ranks.values())
    console.print(
        f"{res.plan.method}: {len(ranks)} modules, ranks {min(ranks)}-{max(ranks)} "
        f"(total {sum(ranks)}), max reconstruction error {res.max_error:.2e}, "
        f"{res.seconds:.1f} s",
        highlight=False,
    )
    console.print(f"adapter: {res.adapter_dir}", highlight=False, soft_wrap=True)
    if res.residual_dir is not None:
        console.print(f"residual base: {res.residual_dir}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `init` to the root app."""
    app.command("init")(init)
