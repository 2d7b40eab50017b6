"""The `spectra report` output folder: report.html, report.md, metrics.json, metrics.csv, plots/.

Everything is rendered from an `Analysis` only (every number drawn or printed is also in
metrics.json). This module picks and renders the plots and writes the folder; the pages are
rendered by report_html and report_md from the shared content of report_layout (whose names are
re-exported here). The folder is written by `write_output_files`: into a temp sibling first,
renamed into place when complete, so a crash never leaves half a report, and an existing
non-empty folder is replaced only with `force`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from spectra.analysis.results import Analysis
from spectra.errors import ValidationError
from spectra.outdir import check_output_dir, write_output_files
from spectra.reports import plots as P
from spectra.reports.report_html import (
    _BAD_WARNINGS,
    _html_layer,
    _html_layers,
    _html_overview,
    _html_run_info,
    _html_summary,
    _html_warned,
    _warning_badges,
    render_html,
)
from spectra.reports.report_layout import (
    DETAIL_FIELDS,
    GROUP_HEADERS,
    MAX_DETAIL_SECTIONS,
    OVERVIEW_COLUMNS,
    STANDOUT_FIELDS,
    SUMMARY_PLOTS,
    ReportPlots,
    _group_rows,
    _role_rows,
    _SummaryPlot,
    _value,
    detailed_indices,
    display_name,
    headline,
    warned_layers,
)
from spectra.reports.report_md import _md_layers, _md_summary, _md_warned, render_markdown

__all__ = [
    "DEFAULT_MAX_ESD_PLOTS",
    "DETAIL_FIELDS",
    "FORMATS",
    "GROUP_HEADERS",
    "MAX_DETAIL_SECTIONS",
    "OVERVIEW_COLUMNS",
    "STANDOUT_FIELDS",
    "SUMMARY_PLOTS",
    "_BAD_WARNINGS",
    "ReportPlots",
    "_SummaryPlot",
    "_group_rows",
    "_html_layer",
    "_html_layers",
    "_html_overview",
    "_html_run_info",
    "_html_summary",
    "_html_warned",
    "_md_layers",
    "_md_summary",
    "_md_warned",
    "_role_rows",
    "_value",
    "_warning_badges",
    "detailed_indices",
    "display_name",
    "esd_stem",
    "headline",
    "parse_formats",
    "render_html",
    "render_markdown",
    "render_plots",
    "select_esd_keys",
    "warned_layers",
    "write_report",
]

FORMATS = ("html", "md", "json", "csv")
DEFAULT_MAX_ESD_PLOTS = 64


def parse_formats(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """'html,md' or ['html', 'md'] -> ('html', 'md') in canonical order; None/'all' -> all."""
    if value is None:
        return FORMATS
    parts = value.split(",") if isinstance(value, str) else list(value)
    wanted = {p.strip().lower() for p in parts if p.strip()}
    if wanted in (set(), {"all"}):
        return FORMATS
    unknown = sorted(wanted - set(FORMATS))
    if unknown:
        raise ValidationError(
            f"unknown report format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}"
        )
    return tuple(f for f in FORMATS if f in wanted)


def select_esd_keys(analysis: Analysis, limit: int = DEFAULT_MAX_ESD_PLOTS) -> list[str]:
    """Which matrices get an ESD plot: all of them up to `limit`; beyond it the warned ones
    first, then one matrix per role (its middle one in analysis order), then each role's first
    and last, then the rest, until `limit`. Only matrices whose eigenvalues are in
    `analysis.esds` qualify. Returned in the analysis' order."""
    if limit < 0:
        raise ValidationError(f"max ESD plots must be >= 0, got {limit}")
    keys = [lm.key for lm in analysis.layers if lm.key in analysis.esds]
    if len(keys) <= limit:
        return keys
    by_key = {lm.key: lm for lm in analysis.layers}
    chosen: dict[str, None] = {}
    for key in keys:
        if by_key[key].warnings:
            chosen[key] = None
    by_role: dict[str, list[str]] = {}
    for key in keys:
        by_role.setdefault(by_key[key].role, []).append(key)
    for pick in (lambda n: n // 2, lambda n: 0, lambda n: n - 1):  # middle, first, last
        for role_keys in by_role.values():
            chosen[role_keys[pick(len(role_keys))]] = None
    for key in keys:
        chosen[key] = None
    picked = set(list(chosen)[:limit])
    return [k for k in keys if k in picked]


def esd_stem(index: int, key: str) -> str:
    """File stem of a matrix's ESD plot: 'esd-007-encoder.layer.0.query.weight' (safe chars)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "matrix"
    return f"esd-{index:03d}-{slug}"


def render_plots(analysis: Analysis, *, max_esd_plots: int = DEFAULT_MAX_ESD_PLOTS) -> ReportPlots:
    """Render the model-level plots and the ESD plots of `select_esd_keys(...)`."""
    summary = {}
    for stem, _title, _caption, render in SUMMARY_PLOTS:
        png = render(analysis)
        if png is not None:
            summary[stem] = png
    esd = {}
    selected = set(select_esd_keys(analysis, max_esd_plots))
    for index, lm in enumerate(analysis.layers):
        if lm.key in selected:
            png = P.esd_plot(analysis.esds[lm.key], lm)
            if png is not None:
                esd[lm.key] = (esd_stem(index, lm.key), png)
    return ReportPlots(summary, esd)


def write_report(
    analysis: Analysis,
    out_dir: str | os.PathLike[str],
    *,
    formats: str | Sequence[str] | None = FORMATS,
    force: bool = False,
    max_esd_plots: int = DEFAULT_MAX_ESD_PLOTS,
) -> list[Path]:
    """Write the report folder atomically and return the final paths of the files written.

    formats: any of html, md, json, csv (a comma-separated string or a sequence; None = all).
    Plots (plots/*.png) are written with html or md. Raises OutputError if `out_dir` exists,
    is not empty and `force` is False; ValidationError for an unknown format.
    """
    wanted = parse_formats(formats)
    final = Path(out_dir).expanduser().absolute()
    check_output_dir(final, force=force)  # fail before rendering, not after
    files: dict[str, bytes | str] = {}
    if "html" in wanted or "md" in wanted:
        plots = render_plots(analysis, max_esd_plots=max_esd_plots)
        files.update(plots.files())
        if "html" in wanted:
            files["report.html"] = render_html(analysis, plots)
        if "md" in wanted:
            files["report.md"] = render_markdown(analysis, plots)
    if "json" in wanted:
        files["metrics.json"] = analysis.to_json()
    if "csv" in wanted:
        files["metrics.csv"] = analysis.to_csv()
    return write_output_files(final, files, force=force)
