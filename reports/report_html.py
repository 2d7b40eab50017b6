"""report.html of `spectra report`: one self-contained page rendered from an `Analysis`.

Sections: model summary (headline, standouts, by role/depth, plots), warned layers, the overview
of all matrices, per-layer detail (metrics table and ESD plot) and the run (options, versions,
warning codes). Every checkpoint string is escaped by the page builder (spectra.reports.html).
"""

from __future__ import annotations

from collections.abc import Sequence

from spectra.analysis.results import WARNING_CODES, Analysis, LayerMetrics
from spectra.reports import html as H
from spectra.reports.report_layout import (
    DETAIL_FIELDS,
    GROUP_HEADERS,
    OVERVIEW_COLUMNS,
    STANDOUT_FIELDS,
    SUMMARY_PLOTS,
    ReportPlots,
    _group_rows,
    _role_rows,
    _value,
    detailed_indices,
    display_name,
    headline,
    warned_layers,
)

_BAD_WARNINGS = {"fit-failed", "non-finite"}


def _warning_badges(warnings: Sequence[str]) -> H.Markup:
    return H.join(
        (
            H.tag(
                "span",
                w,
                class_=f"badge {'bad' if w in _BAD_WARNINGS else 'warn'}",
                title=WARNING_CODES.get(w, w),
            )
            for w in warnings
        ),
        "",
    )


def _html_summary(analysis: Analysis, plots: ReportPlots) -> H.Markup:
    s = analysis.summary
    parts: list[object] = [H.facts(headline(analysis))]
    if s.standouts:
        rows = [[d.get(f) for f in STANDOUT_FIELDS] for d in s.standouts]
        cols = [H.Column("matrix", name=True), "metric", H.Column("value", numeric=True), "why"]
        parts += [H.tag("h3", "Layers that stand out"), H.table(cols, rows)]
    num = [H.Column(h, numeric=True) for h in GROUP_HEADERS]
    if s.by_role:
        parts += [H.tag("h3", "By role"), H.table(["role", *num], _role_rows(analysis))]
    if s.by_depth:
        depth_rows = _group_rows(dict(sorted(s.by_depth.items())))
        parts += [
            H.tag("h3", "By depth"),
            H.details(
                "show the per-layer table",
                H.table([H.Column("layer", numeric=True), *num], depth_rows),
            ),
        ]
    figures = [
        H.figure(plots.summary[stem], title, caption)
        for stem, title, caption, _ in SUMMARY_PLOTS
        if stem in plots.summary
    ]
    if figures:
        parts += [H.tag("h3", "Plots"), H.tag("div", H.join(figures), class_="grid")]
    return H.section("Model summary", *parts, id="summary")


def _html_warned(analysis: Analysis) -> H.Markup:
    warned = warned_layers(analysis)
    if not warned:
        return H.section("Warned layers", H.paragraph("No matrix carries a warning."), id="warned")
    cols = [
        H.Column("matrix", name=True),
        "role",
        H.Column("layer", numeric=True),
        H.Column("α", numeric=True),
        "warnings",
        "fit",
    ]
    rows = [
        [
            H.link(lm.key, f"#layer-{i}"),
            lm.role,
            lm.layer,
            lm.alpha,
            _warning_badges(lm.warnings),
            lm.fit_message or lm.fit_status,
        ]
        for i, lm in warned
    ]
    return H.section(
        "Warned layers",
        H.paragraph(f"{len(warned)} of {len(analysis.layers)} matrices."),
        H.table(cols, rows),
        id="warned",
    )


def _html_overview(analysis: Analysis, detailed: set[int]) -> H.Markup:
    cols = [H.Column(h, numeric=num, name=(attr == "key")) for h, attr, num in OVERVIEW_COLUMNS]
    cols.append(H.Column("warnings"))
    rows = []
    for i, lm in enumerate(analysis.layers):
        row: list[object] = [_value(lm, attr) for _, attr, _ in OVERVIEW_COLUMNS]
        if i in detailed:
            row[0] = H.link(lm.key, f"#layer-{i}")
        rows.append([*row, _warning_badges(lm.warnings)])
    return H.section("All matrices", H.table(cols, rows), id="matrices")


def _html_layer(index: int, lm: LayerMetrics, plots: ReportPlots) -> H.Markup:
    rows = [[label, H.fmt(_value(lm, attr), 6)] for label, attr in DETAIL_FIELDS]
    parts: list[object] = []
    if lm.warnings:
        parts.append(H.paragraph(_warning_badges(lm.warnings)))
    if lm.name != lm.key:
        parts.append(H.paragraph(f"tensor: {lm.name}", class_="muted"))
    body: list[object] = [H.table(["metric", H.Column("value", numeric=True)], rows)]
    if lm.key in plots.esd:
        stem, png = plots.esd[lm.key]
        body.append(H.figure(png, f"ESD of {lm.key}", f"plots/{stem}.png"))
    parts.append(H.tag("div", H.join(body), class_="grid"))
    return H.section(lm.key, *parts, id=f"layer-{index}", level=3, class_="item")


def _html_layers(analysis: Analysis, plots: ReportPlots, detailed: set[int]) -> H.Markup:
    shown = [(i, lm) for i, lm in enumerate(analysis.layers) if i in detailed]
    note = (
        "ESD: histogram of the eigenvalues of WᵀW on log-log axes; red: the fitted power law on "
        "[xmin, xmax]; dashed: xmin. "
    )
    if len(plots.esd) < len(analysis.layers):
        note += (
            f"ESD plots are drawn for {len(plots.esd)} of {len(analysis.layers)} matrices (the "
            "warned ones first, then a representative set per role)."
        )
    if len(shown) < len(analysis.layers):
        note += f" Sections below: {len(shown)} of {len(analysis.layers)} matrices."
    sections = [_html_layer(i, lm, plots) for i, lm in shown]
    return H.section("Per-layer detail", H.paragraph(note, class_="muted"), *sections, id="layers")


def _html_run_info(analysis: Analysis) -> H.Markup:
    opts = [[k, str(v)] for k, v in sorted(analysis.options.items())]
    vers = [[k, v] for k, v in sorted(analysis.versions.items())]
    parts: list[object] = []
    if opts:
        parts.append(H.details("analysis options", H.table(["option", "value"], opts)))
    if vers:
        parts.append(H.details("versions", H.table(["package", "version"], vers)))
    definitions = [[code, text] for code, text in WARNING_CODES.items()]
    parts.append(H.details("warning codes", H.table(["code", "meaning"], definitions)))
    return H.section("Run", *parts, id="run")


def render_html(analysis: Analysis, plots: ReportPlots) -> str:
    """The whole report.html (self-contained; every checkpoint string escaped)."""
    toc = H.nav(
        [
            ("Summary", "#summary"),
            ("Warned layers", "#warned"),
            ("All matrices", "#matrices"),
            ("Per-layer detail", "#layers"),
            ("Run", "#run"),
        ]
    )
    detailed = detailed_indices(analysis, plots)
    body = [
        toc,
        _html_summary(analysis, plots),
        _html_warned(analysis),
        _html_overview(analysis, detailed),
        _html_layers(analysis, plots, detailed),
        _html_run_info(analysis),
    ]
    return H.page(
        f"spectra report: {display_name(analysis.source)}",
        body,
        subtitle=f"source: {analysis.source}",
        footer="Generated by spectra. Definitions: HT-SR metrics as in WeightWatcher 0.7.x "
        "(Martin & Mahoney); power-law fit by Clauset, Shalizi & Newman (2009).",
    )
