"""The terminal summary of an analysis: headline numbers, roles, and the warned matrices.

Strings from the checkpoint are stripped of control characters (no escape sequences reach the
terminal) and escaped with `rich.markup.escape` (a name like "[bold]x" prints as it is).
"""

from __future__ import annotations

import re

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from spectra.analysis.results import Analysis
from spectra.reports.html import fmt, printable
from spectra.reports.roles import ordered_roles

DEFAULT_MAX_ROWS = 20


def safe(value: object) -> str:
    """Checkpoint text made inert for rich: control characters dropped, markup escaped."""
    return escape(printable(value))


def role_table(analysis: Analysis) -> Table:
    """One row per role: count, mean and median alpha, warned count."""
    table = Table(title="by role", title_justify="left", show_edge=False)
    table.add_column("role")
    for name in ("matrices", "mean α", "median α", "warned"):
        table.add_column(name, justify="right")
    groups = analysis.summary.by_role
    for role in ordered_roles(set(groups)):
        g = groups[role]
        warned = f"[yellow]{g.warned}[/]" if g.warned else "0"
        table.add_row(
            safe(role), str(g.count), fmt(g.mean_alpha, 3), fmt(g.median_alpha, 3), warned
        )
    return table


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key reading digit runs as numbers: 'layers.2.q' < 'layers.10.q'."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name))


def warned_table(analysis: Analysis, *, max_rows: int = DEFAULT_MAX_ROWS) -> Table | None:
    """The warned matrices in natural name order (layer 2 before layer 10; at most `max_rows`,
    then a '... N more' row); None if none."""
    warned = [lm for lm in analysis.layers if lm.warnings]
    warned.sort(key=lambda lm: natural_key(lm.key))
    if not warned:
        return None
    table = Table(title="warned matrices", title_justify="left", show_edge=False)
    table.add_column("matrix", overflow="fold")
    table.add_column("role")
    table.add_column("α", justify="right")
    table.add_column("warnings", style="yellow")
    for lm in warned[:max_rows]:
        table.add_row(safe(lm.key), safe(lm.role), fmt(lm.alpha, 3), safe(", ".join(lm.warnings)))
    if len(warned) > max_rows:
        table.add_row(f"... {len(warned) - max_rows} more (see the report)", "", "", "")
    return table


def headline_text(analysis: Analysis) -> str:
    """'37 matrices, 3 warned (8.1%), mean α 3.96' (rich markup; source escaped)."""
    s = analysis.summary
    share = "" if s.warned_share is None else f" ({100 * s.warned_share:.1f}%)"
    skipped = f", {len(analysis.skipped)} skipped by size filters" if analysis.skipped else ""
    return (
        f"[bold]{safe(analysis.source)}[/]: {s.num_matrices} matrices, "
        f"{s.num_warned} warned{share}, mean α {fmt(s.mean_alpha, 3)}{skipped}"
    )


def summary_renderable(analysis: Analysis, *, max_rows: int = DEFAULT_MAX_ROWS) -> Group:
    parts: list[object] = [headline_text(analysis)]
    if analysis.summary.by_role:
        parts.append(role_table(analysis))
    warned = warned_table(analysis, max_rows=max_rows)
    if warned is not None:
        parts.append(warned)
    return Group(*parts)


def print_summary(
    analysis: Analysis, console: Console | None = None, *, max_rows: int = DEFAULT_MAX_ROWS
) -> None:
    """Print the summary to `console` (default: stdout)."""
    (console or Console()).print(summary_renderable(analysis, max_rows=max_rows))
