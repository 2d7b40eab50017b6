"""Markdown building blocks: escaped text, tables, images, headings.

Markdown renderers pass raw HTML through, so text from a checkpoint is escaped twice over: `<`,
`>` and `&` become entities (a tensor name can never open a tag), and Markdown's own syntax
characters get a backslash (a name can never start a link, emphasis or table cell). Control
characters are dropped and newlines become spaces, so one value stays on one table row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from spectra.reports.html import fmt, printable

_MD_SPECIAL = re.compile(r"([\\`*_\[\]#!|~])")


def md_escape(value: object) -> str:
    """Plain text safe inside Markdown paragraphs and table cells."""
    text = printable(value).replace("\r", " ").replace("\n", " ").replace("\t", " ")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def heading(text: object, level: int = 2) -> str:
    return f"{'#' * level} {md_escape(text)}\n"


def md_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    numeric: Sequence[bool] | None = None,
) -> str:
    """A GitHub-flavoured table. Cells go through `fmt` (numbers) and `md_escape` (text);
    numeric columns are right-aligned."""
    numeric = list(numeric) if numeric is not None else [False] * len(headers)
    if len(numeric) != len(headers):
        raise ValueError(f"numeric has {len(numeric)} flags for {len(headers)} headers")
    lines = [
        "| " + " | ".join(md_escape(h) for h in headers) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    for row in rows:
        cells = [_cell(cell) for cell in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    """Numbers as `fmt` writes them (digits, sign, point, exponent: nothing to escape)."""
    if value is None or isinstance(value, (int, float)):
        return fmt(value)
    return md_escape(value)


def image(alt: object, relative_path: str) -> str:
    """![alt](path); the path is one this package wrote (safe characters only)."""
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", relative_path):
        raise ValueError(f"image path {relative_path!r} has characters a Markdown link cannot hold")
    return f"![{md_escape(alt)}]({relative_path})\n"


def bullet_list(items: Iterable[object]) -> str:
    return "".join(f"- {md_escape(item)}\n" for item in items)
