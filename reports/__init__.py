"""spectra.reports: plots, HTML, Markdown, JSON/CSV rendering of results.

Modules: `plots` (matplotlib figures to PNG bytes, no pyplot), `html` (self-contained page
builder with escaping), `markdown` (escaped Markdown blocks), `report` (the `spectra report`
folder), `terminal` (rich summary). Importing this package imports none of them (matplotlib is
loaded only when a plot is drawn); `write_report` is re-exported lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_report"]


def __getattr__(name: str) -> Any:
    if name == "write_report":
        from spectra.reports.report import write_report

        return write_report
    raise AttributeError(f"module 'spectra.reports' has no attribute {name!r}")
