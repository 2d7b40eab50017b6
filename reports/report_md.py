"""report.md of `spectra report`: the Markdown twin of report.html, images linked from plots/.

Model summary (headline, standouts, by role/depth, the model-level plots with captions), warned
layers, the overview of all matrices and the ESD plots. Text is escaped by
spectra.reports.markdown.
"""

from __future__ import annotations

from spectra.analysis.results import Analysis
from spectra.reports import html as H
from spectra.reports import markdown as M
from spectra.reports.report_layout import (
    GROUP_HEADERS,
    OVERVIEW_COLUMNS,
    STANDOUT_FIELDS,
    SUMMARY_PLOTS,
    ReportPlots,
    _group_rows,
    _role_rows,
    _value,
    headline,
    warned_layers,
)


def _md_summary(analysis: Analysis, plots: ReportPlots) -> list[str]:
    s = analysis.summary
    out = [
        M.heading("Model summary"),
        M.bullet_list(f"{k}: {H.fmt(v)}" for k, v in headline(analysis)),
    ]
    if s.standouts:
        rows = [[d.get(f) for f in STANDOUT_FIELDS] for d in s.standouts]
        out += [
            M.heading("Layers that stand out", 3),
            M.md_table(
                ["matrix", "metric", "value", "why"], rows, numeric=[False, False, True, False]
            ),
        ]
    if s.by_role:
        out += [
            M.heading("By role", 3),
            M.md_table(
                ["role", *GROUP_HEADERS],
                _role_rows(analysis),
                numeric=[False, True, True, True, True],
            ),
        ]
    if s.by_depth:
        rows = _group_rows(dict(sorted(s.by_depth.items())))
        out += [
            M.heading("By depth", 3),
            M.md_table(["layer", *GROUP_HEADERS], rows, numeric=[True] * 5),
        ]
    for stem, title, caption, _ in SUMMARY_PLOTS:
        if stem in plots.summary:
            out += [
                M.heading(title, 3),
                M.image(title, f"plots/{stem}.png"),
                M.md_escape(caption) + "\n",
            ]
    return out


def _md_warned(analysis: Analysis) -> list[str]:
    warned = warned_layers(analysis)
    out = [M.heading("Warned layers")]
    if not warned:
        return out + ["No matrix carries a warning.\n"]
    rows = [[lm.key, lm.role, lm.layer, lm.alpha, ", ".join(lm.warnings)] for _, lm in warned]
    return out + [
        M.md_table(
            ["matrix", "role", "layer", "α", "warnings"],
            rows,
            numeric=[False, False, True, True, False],
        )
    ]


def _md_layers(analysis: Analysis, plots: ReportPlots) -> list[str]:
    headers = [h for h, _, _ in OVERVIEW_COLUMNS] + ["warnings"]
    numeric = [num for _, _, num in OVERVIEW_COLUMNS] + [False]
    rows = [
        [_value(lm, a) for _, a, _ in OVERVIEW_COLUMNS] + [", ".join(lm.warnings)]
        for lm in analysis.layers
    ]
    out = [M.heading("All matrices"), M.md_table(headers, rows, numeric=numeric)]
    if plots.esd:
        out.append(M.heading("ESD plots"))
        for lm in analysis.layers:
            if lm.key in plots.esd:
                stem, _ = plots.esd[lm.key]
                out.append(M.image(f"ESD of {lm.key}", f"plots/{stem}.png"))
    return out


def render_markdown(analysis: Analysis, plots: ReportPlots) -> str:
    """The whole report.md; images link to plots/*.png next to it."""
    parts = [M.heading(f"spectra report: {analysis.source}", 1)]
    parts += _md_summary(analysis, plots) + _md_warned(analysis) + _md_layers(analysis, plots)
    return "\n".join(parts)
