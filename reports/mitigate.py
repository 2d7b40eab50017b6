"""The terminal table of `spectra mitigate`: one row per scaled direction, grouped by matrix
(position, max |cos|, singular value before and after, lambda, intruders left at epsilon).
Renders from a `Mitigation` only, so every number shown is in its mitigation.json."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table

from spectra.jobs.mitigate import Mitigation
from spectra.reports.terminal import safe

MAX_ROWS = 40


def mitigation_table(result: Mitigation, *, max_rows: int = MAX_ROWS) -> Table:
    """One row per scaled direction, grouped by matrix (its name, in full, on the first row):
    position among the top-k, max |cos| against the base, singular value before and after,
    lambda, the intruders left among the result's top-k, and the adapter rank."""
    opts = result.options
    table = Table(
        title=f"intruder directions scaled by λ = {opts.lam:g} (top-{opts.k}, epsilon "
        f"{opts.epsilon:g})",
        caption=f"left: intruders among the result's top-{opts.k} (a scaled direction that "
        f"stays in the top-{opts.k} is still one)",
        caption_justify="left",
        title_justify="left",
        show_edge=False,
    )
    table.add_column("matrix", overflow="fold")
    for name in ("#", "max|cos|", "s", "λ·s", "λ", "left"):
        table.add_column(name, justify="right", no_wrap=True)
    if result.mode == "lora":
        table.add_column("rank", justify="right", no_wrap=True)
    shown = 0
    for m in result.changed:
        for i, d in enumerate(m.directions):
            if shown == max_rows:
                table.caption = f"{table.caption}; more rows in mitigation.json"
                return table
            cells = [
                safe(m.key) if i == 0 else "",
                str(d.index),
                f"{d.max_cos:.3f}",
                f"{d.singular_value:.4g}",
                f"{d.new_singular_value:.4g}",
                f"{opts.lam:g}",
                str(m.intruders_after) if i == 0 else "",
            ]
            if m.rank is not None:
                cells.append(f"{m.rank[0]}->{m.rank[1]}" if i == 0 else "")
            table.add_row(*cells)
            shown += 1
    return table


def summary_renderable(result: Mitigation) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_row("matrices compared", str(len(result.matrices)))
    head.add_row("matrices changed", str(len(result.changed)))
    head.add_row("directions scaled", str(result.directions))
    head.add_row(
        "intruders left in the top-k",
        str(sum(m.intruders_after for m in result.changed)),
    )
    return Group(head, mitigation_table(result))


def print_summary(result: Mitigation, console: Console | None = None) -> None:
    (console or Console()).print(summary_renderable(result))
