"""CSV text that a spreadsheet opens as inert data (tensor names come from strangers).

Two defences, applied to every string cell (numbers are written as numbers, untouched):
- terminal escape sequences (CSI `ESC [ ... final`, OSC/DCS/APC/PM/SOS strings up to BEL or ST,
  any other `ESC x`, and their 8-bit C1 forms) are removed with their parameters, then every
  remaining C0/C1 control character and DEL is dropped, so `cat metrics.csv` cannot recolour,
  retitle or rewrite a terminal;
- a cell whose first non-blank character is `=`, `+`, `-` or `@` (what spreadsheets evaluate as
  a formula: "CSV injection", OWASP) is prefixed with `'`, which spreadsheets show as text; and so
  is every such part after a `;`: Excel in the many locales whose decimal mark is a comma (de, fr,
  es, it, ...) splits a CSV line on `;`, its list separator, and LibreOffice offers `;` on import,
  so `x;=1+2` (left unquoted by the csv module, which only quotes on `,`) became a formula cell.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_ESCAPE_SEQ = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b[\]PX^_].*?(?:\x07|\x1b\\|$)"  # OSC, DCS, SOS, PM, APC strings with their payload
    r"|\x1b[ -~]?"  # any other two-byte escape (or a lone ESC)
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
    r"|[\x90\x98\x9d-\x9f].*?(?:\x07|\x9c|\x1b\\|$)",  # 8-bit string introducers
    re.DOTALL,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
FORMULA_STARTS = ("=", "+", "-", "@")
# a `;` (a list separator in comma-decimal locales), blanks, then a formula start
_AFTER_SEMICOLON = re.compile(r"(;[ ]*)(?=[=+\-@])")


def inert_text(value: object) -> str:
    """`str(value)` without escape sequences and control characters, and with a leading `'`
    when a spreadsheet would otherwise read it as a formula.

    >>> inert_text('=HYPERLINK("http://x")')
    '\\'=HYPERLINK("http://x")'
    >>> inert_text("q_proj\\x1b[31m.weight\\x07")
    'q_proj.weight'
    >>> inert_text("x;=1+2")
    "x;'=1+2"
    """
    text = _CONTROL.sub("", _ESCAPE_SEQ.sub("", str(value)))
    text = _AFTER_SEMICOLON.sub(r"\1'", text)
    if text.lstrip(" ").startswith(FORMULA_STARTS):
        return "'" + text
    return text


def inert_cell(value: Any) -> Any:
    """A CSV cell: "" for None, numbers (int, float, bool) unchanged, strings via inert_text."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)):
        return value
    return inert_text(value)


def write_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header of `columns` (made inert too) and one line per row; every cell
    goes through `inert_cell`.

    >>> write_csv([{"name": "-x", "v": -1.5}], ["name", "v"])
    "name,v\\n'-x,-1.5\\n"
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([inert_text(c) for c in columns])
    for row in rows:
        writer.writerow([inert_cell(row.get(c)) for c in columns])
    return buf.getvalue()
