"""Self-contained HTML pages: shared CSS, escaped text, PNGs embedded as data URIs.

A small builder shared by every spectra page (report.html, compare.html). Everything is a
function returning `Markup` (a str subclass marking HTML that is already safe). Any plain `str`
handed to a builder is escaped with `html.escape`, so strings from a checkpoint (tensor names,
metadata) can never become markup. Only `Markup` passes through unescaped: build it with these
helpers, never by wrapping untrusted text.

Pages load nothing from the network: no scripts, fonts or external images, and a
Content-Security-Policy that forbids scripts and remote content outright.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# C0 but tab/newline/CR, DEL, C1, and the bidi controls (U+061C, U+200E/F, U+202A-U+202E,
# U+2066-U+2069): a right-to-left override in a tensor name would reorder the text around it
_CONTROL = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)

# Forbid scripts, frames, remote images, fonts and styles; allow only inline CSS and data: PNGs.
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'"
)

CSS = """
:root { --fg: #1d2430; --muted: #5b6475; --line: #d9dee7; --bg: #ffffff; --alt: #f5f7fa;
  --warn: #b54708; --warn-bg: #fff4e5; --bad: #b42318; --bad-bg: #fdecea; --ok: #067647;
  --ok-bg: #e8f6ee; --accent: #2452b5; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
header.page { border-bottom: 1px solid var(--line); margin-bottom: 12px; }
h1 { font-size: 24px; margin: 8px 0 2px; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 6px; overflow-wrap: anywhere; }
p.sub, .muted { color: var(--muted); }
nav.toc a { margin-right: 14px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12.5px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left;
  vertical-align: top; }
th { background: var(--alt); font-weight: 600; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { overflow-wrap: anywhere; max-width: 520px; }
tr:nth-child(even) td { background: #fbfcfd; }
.scroll { overflow-x: auto; }
.badge { display: inline-block; padding: 0 7px; margin: 1px 2px; border-radius: 9px;
  font-size: 11.5px; font-weight: 600; white-space: nowrap; }
.badge.warn { color: var(--warn); background: var(--warn-bg); }
.badge.bad { color: var(--bad); background: var(--bad-bg); }
.badge.ok { color: var(--ok); background: var(--ok-bg); }
.badge.info { color: var(--muted); background: var(--alt); }
.facts { display: flex; flex-wrap: wrap; gap: 12px; margin: 10px 0 6px; }
.fact { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 150px; }
.fact .v { font-size: 20px; font-weight: 650; } .fact .k { color: var(--muted); font-size: 12px; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 4px; max-width: 900px; }
.grid { display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: flex-start; }
section.item { border-top: 1px dashed var(--line); padding-top: 4px; }
details > summary { cursor: pointer; color: var(--accent); }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line);
  padding-top: 8px; }
"""


class Markup(str):
    """HTML that is safe to insert as it is (built by this module from escaped parts)."""

    __slots__ = ()


def printable(value: object) -> str:
    """str(value) without control characters (C0 except tab/newline/CR, DEL, C1, bidi)."""
    return _CONTROL.sub("", str(value))


def esc(value: object) -> Markup:
    """Escape anything for HTML text or attribute context; Markup passes through unchanged."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(printable(value), quote=True))


def join(parts: Iterable[object], sep: str = "\n") -> Markup:
    """Concatenate parts, escaping every one that is not already Markup."""
    return Markup(sep.join(esc(p) for p in parts))


def fmt(value: Any, digits: int = 4) -> str:
    """A number for humans: None/NaN -> '–', ints as they are, floats to `digits` significant."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}g}"
    return str(value)


def tag(name: str, content: object = "", **attrs: object) -> Markup:
    """<name attrs>content</name>; attribute values and non-Markup content are escaped.

    `class_` and `for_` map to `class` and `for`; None or False attributes are left out.
    """
    rendered = []
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        attr = key.rstrip("_").replace("_", "-")
        rendered.append(attr if value is True else f'{attr}="{esc(value)}"')
    opening = " ".join([name, *rendered])
    return Markup(f"<{opening}>{esc(content)}</{name}>")


def badge(text: str, kind: str = "info") -> Markup:
    """A small coloured label; kind is one of ok, warn, bad, info."""
    return tag("span", text, class_=f"badge {kind}")


def link(text: object, href: str) -> Markup:
    return tag("a", text, href=href)


def paragraph(text: object, *, class_: str | None = None) -> Markup:
    return tag("p", text, class_=class_)


def facts(pairs: Sequence[tuple[str, object]]) -> Markup:
    """A row of headline numbers: [(label, value)]."""
    cards = (
        tag(
            "div",
            join([tag("div", value, class_="v"), tag("div", label, class_="k")], ""),
            class_="fact",
        )
        for label, value in pairs
    )
    return tag("div", join(cards, ""), class_="facts")


@dataclass(frozen=True)
class Column:
    """A table column: header text, and whether its cells are numbers (right-aligned)."""

    title: str
    numeric: bool = False
    name: bool = False  # long names wrap anywhere


def table(
    columns: Sequence[Column | str], rows: Iterable[Sequence[object]], *, caption: str | None = None
) -> Markup:
    """A table; numbers in numeric columns go through `fmt`, every cell is escaped unless Markup."""
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    head = join((tag("th", c.title, class_="num" if c.numeric else None) for c in cols), "")
    body = []
    for row in rows:
        cells = []
        for col, cell in zip(cols, row, strict=True):
            text = cell if isinstance(cell, Markup) else (fmt(cell) if col.numeric else cell)
            klass = "num" if col.numeric else ("name" if col.name else None)
            cells.append(tag("td", "" if text is None else text, class_=klass))
        body.append(tag("tr", join(cells, "")))
    parts = [tag("caption", caption)] if caption else []
    parts += [tag("thead", tag("tr", head)), tag("tbody", join(body))]
    return tag("div", tag("table", join(parts)), class_="scroll")


def png_data_uri(png: bytes) -> str:
    """data:image/png;base64,... for embedding."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, alt: str, caption: object | None = None) -> Markup:
    """An embedded PNG with alt text and an optional caption."""
    img = Markup(f'<img src="{png_data_uri(png)}" alt="{esc(alt)}" loading="lazy">')
    parts = [img] + ([tag("figcaption", caption)] if caption else [])
    return tag("figure", join(parts))


def section(
    title: object,
    *children: object,
    id: str | None = None,
    level: int = 2,
    class_: str | None = None,
) -> Markup:  # noqa: A002
    """<section id><hN>title</hN> children...</section>; children are escaped unless Markup."""
    heading = tag(f"h{level}", title)
    return tag("section", join([heading, *children]), id=id, class_=class_)


def details(summary: object, *children: object) -> Markup:
    """A collapsible block (native <details>, no script)."""
    return tag("details", join([tag("summary", summary), *children]))


def nav(links: Sequence[tuple[str, str]]) -> Markup:
    """A table of contents: [(text, '#anchor')]."""
    return tag("nav", join((link(text, href) for text, href in links), " "), class_="toc")


def page(
    title: str,
    body: Iterable[object] | Markup,
    *,
    subtitle: object | None = None,
    footer: object | None = None,
) -> str:
    """A complete HTML5 document with the shared CSS and CSP; `title` and `subtitle` are escaped."""
    content = body if isinstance(body, Markup) else join(body)
    header = tag(
        "header",
        join([tag("h1", title)] + ([paragraph(subtitle, class_="sub")] if subtitle else [])),
        class_="page",
    )
    foot = tag("footer", footer) if footer is not None else Markup("")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<main>\n{header}\n{content}\n{foot}\n</main>\n</body>\n</html>\n"
    )
