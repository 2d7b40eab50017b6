"""The HTML page of a `spectra plan`: what was chosen, from which numbers, by which definition.

Rendered from the plan's JSON data only (the same dictionary `make_plan` writes), so every number
on the page is also in the plan file. Self-contained, escaped, with the reports' CSP
(reports/html.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spectra.reports.html import Column, badge, facts, page, paragraph, section, table

_SKIP = {"shape", "key"}


def _rows(plan: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-module (or, for layer sampling, per-layer) records of the plan."""
    for name in ("modules", "layers"):
        rows = plan.get(name)
        if isinstance(rows, list) and rows and isinstance(rows[0], Mapping):
            return rows
    return []


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in cols and key not in _SKIP and not isinstance(value, (list, dict)):
                cols.append(key)
    return cols


def _cell(key: str, value: Any) -> object:
    if key == "chosen":
        return badge("chosen", "ok") if value else badge("not chosen", "info")
    return value


def plan_html(plan: Mapping[str, Any]) -> str:
    """The page: headline facts, the definition and reference, one row per module or layer
    (chosen ones marked where the kind chooses)."""
    rows = _rows(plan)
    cols = _columns(rows)
    numeric = {
        c for c in cols if all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
    } - {"chosen"}
    chosen = sum(1 for r in rows if r.get("chosen", True))
    body = [
        facts(
            [
                ("kind", plan.get("kind", "")),
                ("rows", len(rows)),
                ("chosen" if "chosen" in cols else "planned", chosen),
            ]
        ),
        section(
            "Definition",
            paragraph(plan.get("definition", "")),
            paragraph(f"Reference: {plan.get('reference', '')}"),
        ),
        section(
            "Per module" if plan.get("modules") else "Per layer",
            table(
                [Column(c, numeric=c in numeric, name=c == "module") for c in cols],
                ([_cell(c, r.get(c)) for c in cols] for r in rows),
            ),
        ),
    ]
    return page(
        f"spectra plan --for {plan.get('kind', '')}",
        body,
        subtitle=str(plan.get("checkpoint", "")),
        footer=f"spectra {plan.get('spectra_version', '')}",
    )
