"""`spectra inspect [SOURCE]`: the weight matrices of a checkpoint, from its headers alone."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from spectra.cli._common import (
    CONTROL,
    DiskBudgetOpt,
    ExcludeOpt,
    IncludeOpt,
    OfflineOpt,
    RevisionOpt,
    RolesOpt,
    console,
    handle_errors,
    hub_options,
    split_csv,
)


def safe_text(text: str) -> str:
    """A name fit for a terminal: control characters (escape sequences) shown as `?`, rich
    markup escaped so `[bold]` in a tensor name prints literally."""
    return escape(CONTROL.sub("?", text))


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f}"


@handle_errors
def inspect(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint: .safetensors file, folder, Hub id. Default: bundled MiniLM."
        ),
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    roles: RolesOpt = None,
    revision: RevisionOpt = None,
    disk_budget: DiskBudgetOpt = None,
    offline: OfflineOpt = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")
    ] = False,
) -> None:
    """List weight matrices (name, role, layer, shape, dtype, MB) and totals. Reads headers only.

    Quantized checkpoints add a storage column (scheme, bits, block or group size)."""
    from spectra.sources.bundled import bundled_model_path
    from spectra.sources.checkpoint import Checkpoint
    from spectra.sources.hub import HEADERS_ONLY
    from spectra.sources.inventory import inventory

    target = source if source is not None else str(bundled_model_path())
    hub = hub_options(revision, disk_budget, offline)
    # headers only: a Hub repo is opened in streaming mode, so only its headers are fetched
    # (ranged reads sized to each header), never the whole model
    budget = hub.disk_budget or HEADERS_ONLY
    with Checkpoint.open(
        target, revision=hub.revision, local_only=hub.local_only, disk_budget=budget
    ) as ckpt:
        inv = inventory(ckpt, include=include or (), exclude=exclude or (), roles=split_csv(roles))
    if as_json:
        typer.echo(json.dumps(inv.to_dict(), indent=1))
        return
    table = Table(title=f"{safe_text(inv.source)}: {len(inv.matrices)} matrices")
    table.add_column("name", overflow="fold")
    table.add_column("role")
    for col in ("layer", "shape (out, in)"):
        table.add_column(col, justify="right")
    table.add_column("dtype")
    encoded = any(m.encoded is not None for m in inv.matrices)
    if encoded:  # a quantized checkpoint: how each matrix is stored
        table.add_column("storage")
    table.add_column("MB", justify="right")
    for m in inv.matrices:
        role = m.role if m.expert_role is None else f"{m.role}:{m.expert_role}"
        layer = "" if m.layer is None else str(m.layer)
        shape = f"{m.shape[0]} x {m.shape[1]}" + (" (T)" if m.transpose else "")
        storage = (safe_text(m.storage),) if encoded else ()
        table.add_row(safe_text(m.key), role, layer, shape, m.tensor.dtype, *storage, _mb(m.nbytes))
    console.print(table)
    totals = Table(title="totals")
    for col in ("role", "count", "parameters", "MB"):
        totals.add_column(col, justify="left" if col == "role" else "right")
    for t in inv.by_role:
        totals.add_row(t.role, str(t.count), f"{t.parameters:,}", _mb(t.bytes))
    totals.add_row(
        "all", str(len(inv.matrices)), f"{inv.parameters:,}", _mb(inv.bytes), style="bold"
    )
    console.print(totals)


def register(app: typer.Typer) -> None:
    """Add `inspect` to the root app."""
    app.command("inspect")(inspect)
