"""The `spectra report` output folder: report.html, report.md, metrics.json, metrics.csv, plots/.

Everything is rendered from an `Analysis` only (every number drawn or printed is also in
metrics.json). Read top-down: what a report shows whatever the format (the model-level plots
`SUMMARY_PLOTS`, the per-layer fields `DETAIL_FIELDS` and, when computed,
`OPTIONAL_DETAIL_FIELDS`, the overview columns `OVERVIEW_COLUMNS`,
the headline, the by-role/by-depth rows, the warned layers), which plots are drawn and which
matrices get a per-layer section, then report.html, then its Markdown twin report.md (images
linked from plots/), and last `write_report`. HTML and Markdown draw from the same content, so
the two pages say the same thing; every checkpoint string is escaped by the page builders
(spectra.reports.html, spectra.reports.markdown). The folder is written by
`write_output_files`: into a temp sibling first, renamed into place when complete, so a crash
never leaves half a report, and an existing non-empty folder is replaced only with `force`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import numpy as np

from spectra.analysis.results import WARNING_CODES, Analysis, LayerMetrics
from spectra.blobcache import BlobCache, blob_key, code_digest
from spectra.errors import ValidationError
from spectra.outdir import Protect, check_output_dir, write_output_files
from spectra.reports import html as H
from spectra.reports import markdown as M
from spectra.reports.moe import moe_html, moe_markdown
from spectra.reports.roles import ordered_roles

FORMATS = ("html", "md", "json", "csv")
DEFAULT_MAX_ESD_PLOTS = 64
MAX_DETAIL_SECTIONS = 256


def _plots() -> ModuleType:
    """spectra.reports.plots, imported on the first plot actually drawn: matplotlib is the
    largest import of a report, and a rerun whose plots are all cached never needs it."""
    from spectra.reports import plots

    return plots


# (file stem, title, caption, renderer) of the model-level plots.
_SummaryPlot = tuple[str, str, str, Callable[[Analysis], bytes | None]]
SUMMARY_PLOTS: tuple[_SummaryPlot, ...] = (
    (
        "alpha_by_depth",
        "α by depth",
        "Power-law exponent α of each matrix's ESD tail, one line per role. Shaded: α < 2 "
        "(over-trained) and α > 6 (under-trained); well-trained layers sit roughly in 2-6.",
        lambda a: _plots().alpha_by_depth(a.layers),
    ),
    (
        "norms_by_depth",
        "Stable rank and spectral norm by depth",
        "Stable rank Σλ/λmax (how many directions carry the energy) and log10 λmax, per role.",
        lambda a: _plots().norms_by_depth(a.layers),
    ),
    (
        "sv_decay",
        "Singular-value decay per role",
        "S_i/S_1 against i/min(m, n); one curve per matrix, coloured by depth (dashed: no layer "
        "index).",
        lambda a: _plots().sv_decay(a.layers, a.esds),
    ),
    (
        "outlier_heatmap",
        "Outlier ratio",
        "Share of weights whose magnitude exceeds a multiple of the matrix's mean magnitude "
        "(OWL, arXiv 2405.18380), per layer and role.",
        lambda a: _plots().outlier_heatmap(a.layers),
    ),
)

# Per-layer detail: (label, LayerMetrics attribute) in reading order.
DETAIL_FIELDS = (
    ("role", "role"),
    ("layer", "layer"),
    ("shape (out, in)", "shape"),
    ("dtype", "dtype"),
    ("eigenvalues", "num_evals"),
    ("spectrum method", "spectrum_method"),
    ("fit status", "fit_status"),
    ("fit message", "fit_message"),
    ("α", "alpha"),
    ("α weighted (α·log10 λmax)", "alpha_weighted"),
    ("xmin", "xmin"),
    ("xmax", "xmax"),
    ("KS distance D", "D"),
    ("σ (std. error of α)", "sigma"),
    ("tail size (power-law spikes)", "num_pl_spikes"),
    ("log10 Frobenius norm² (log_norm)", "log_norm"),
    ("log10 λmax (log_spectral_norm)", "log_spectral_norm"),
    ("stable rank", "stable_rank"),
    ("log10 Σλ^α (log_alpha_norm)", "log_alpha_norm"),
    ("spectral entropy", "entropy"),
    ("numerical rank", "numerical_rank"),
    ("MP bulk edge", "mp_bulk_max"),
    ("MP spikes", "mp_num_spikes"),
    ("randomized-control distance", "rand_distance"),
    ("outlier ratio", "outlier_ratio"),
)

# Per-layer detail rows shown only when set: the WeightWatcher columns and the fit options'
# results (methods.md sections 2e-2g), None when the option that computes them was not given.
OPTIONAL_DETAIL_FIELDS = (
    ("largest singular value (sv_max)", "sv_max"),
    ("smallest singular value (sv_min)", "sv_min"),
    ("rank loss", "rank_loss"),
    ("weak rank loss", "weak_rank_loss"),
    ("truncated power law cutoff Λ", "Lambda"),
    ("best-fitting distribution (likelihood ratio)", "best_fit"),
    ("fit entropy", "fit_entropy"),
    ("fingers removed", "num_fingers"),
    ("α before removing fingers", "raw_alpha"),
    ("MP σ (WeightWatcher fit)", "sigma_mp"),
    ("MP soft rank", "mp_softrank"),
    ("WeightWatcher soft rank", "ww_softrank"),
    ("spikes of the randomized ESD", "rand_num_spikes"),
    ("detX: eigenvalues above λ at det = 1", "detX_num"),
    ("detX λ", "detX_val"),
    ("correlation traps", "num_traps"),
)

# The one-row-per-matrix overview: (header, attribute, numeric).
OVERVIEW_COLUMNS = (
    ("matrix", "key", False),
    ("role", "role", False),
    ("layer", "layer", True),
    ("shape", "shape", False),
    ("α", "alpha", True),
    ("D", "D", True),
    ("xmin", "xmin", True),
    ("stable rank", "stable_rank", True),
    ("log λmax", "log_spectral_norm", True),
    ("log norm", "log_norm", True),
    ("outliers", "outlier_ratio", True),
)

GROUP_HEADERS = ("count", "mean α", "median α", "warned")
STANDOUT_FIELDS = ("key", "metric", "value", "reason")


@dataclass(frozen=True)
class ReportPlots:
    """Rendered PNGs. summary: stem -> png; esd: matrix key -> (stem, png)."""

    summary: dict[str, bytes] = field(default_factory=dict)
    esd: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def files(self) -> dict[str, bytes]:
        """{'plots/<stem>.png': png} for everything rendered."""
        out = {f"plots/{stem}.png": png for stem, png in self.summary.items()}
        out.update({f"plots/{stem}.png": png for stem, png in self.esd.values()})
        return out


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


# --- what both pages show ---


def warned_layers(analysis: Analysis) -> list[tuple[int, LayerMetrics]]:
    """(index, metrics) of every matrix carrying at least one warning, in analysis order."""
    return [(i, lm) for i, lm in enumerate(analysis.layers) if lm.warnings]


def _value(lm: LayerMetrics, attr: str) -> object:
    value = getattr(lm, attr)
    if attr == "shape":
        return f"{value[0]} x {value[1]}"
    return value


def headline(analysis: Analysis) -> list[tuple[str, object]]:
    s = analysis.summary
    share = "–" if s.warned_share is None else f"{100 * s.warned_share:.1f}%"
    facts: list[tuple[str, object]] = [
        ("matrices analysed", s.num_matrices),
        ("with a warning", f"{s.num_warned} ({share})"),
        ("mean α", H.fmt(s.mean_alpha, 3)),
    ]
    quantized = quantization_summary(analysis)
    if quantized:
        facts.append(("quantization", quantized))
    if analysis.skipped:  # the size filters' casualties, each with its reason (all in JSON)
        shown = "; ".join(f"{sk.key}: {sk.reason}" for sk in analysis.skipped[:20])
        more = len(analysis.skipped) - 20
        facts.append(
            ("skipped by size filters", shown + (f"; and {more} more" if more > 0 else ""))
        )
    return facts


def quantization_summary(analysis: Analysis) -> str:
    """'gptq 4-bit group 128 (7 matrices), analysed dequantized to float32', or '' when no
    analysed matrix is quantized (its dtype column holds a storage label, "scheme N-bit block",
    which has spaces; a dtype never does; no torch import here: a cached rerun needs none)."""
    counts: dict[str, int] = {}
    for lm in analysis.layers:
        if " " in (lm.dtype or ""):
            counts[lm.dtype] = counts.get(lm.dtype, 0) + 1
    if not counts:
        return ""
    shown = ", ".join(
        f"{label} ({n} matri{'x' if n == 1 else 'ces'})" for label, n in counts.items()
    )
    return f"{shown}; analysed dequantized to float32"


def _group_rows(groups: dict) -> list[list[object]]:
    return [[k, g.count, g.mean_alpha, g.median_alpha, g.warned] for k, g in groups.items()]


def _role_rows(analysis: Analysis) -> list[list[object]]:
    groups = analysis.summary.by_role
    return _group_rows({role: groups[role] for role in ordered_roles(set(groups))})


def display_name(source: str) -> str:
    """A short name for titles: the last two parts of a local path, a Hub id as it is."""
    path = Path(source)
    if path.exists() and len(path.parts) >= 2:
        return "/".join(path.parts[-2:])
    return source


# --- selection: which matrices get an ESD plot and a per-layer section ---


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


#: Everything a plot's pixels depend on besides its data: the modules that draw it and the
#: versions of the libraries that rasterize and bin it. Part of every plot cache key.
PLOT_CODE = ("spectra.reports.plots", "spectra.reports.roles", "spectra.reports.html")


def plot_code_version() -> str:
    """The code part of a plot's cache key (module sources, spectra, matplotlib, numpy)."""
    return blob_key(code_digest(*PLOT_CODE), version("matplotlib"), np.__version__)


def _layer_fields(lm: LayerMetrics) -> dict[str, object]:
    return asdict(lm)  # exact floats (NaN and inf kept apart), not the JSON-safe to_dict()


def _esd_digest(analysis: Analysis) -> bytes:
    h = hashlib.sha256()
    for key in sorted(analysis.esds):
        lam = np.ascontiguousarray(analysis.esds[key], dtype=np.float64)
        h.update(f"{key}\0{lam.size}\0".encode())
        h.update(lam.tobytes())
    return h.digest()


def _cached_png(
    cache: BlobCache | None, key: str, draw: Callable[[], bytes | None]
) -> bytes | None:
    """The PNG from `cache` under `key` when there, else `draw()`, stored there."""
    if cache is not None:
        png = cache.get(key)
        if png is not None:
            return png or None  # an empty blob records "nothing to draw"
    png = draw()
    if cache is not None:
        cache.put(key, png or b"")
    return png


def render_plots(
    analysis: Analysis,
    *,
    max_esd_plots: int = DEFAULT_MAX_ESD_PLOTS,
    cache: BlobCache | None = None,
) -> ReportPlots:
    """Render the model-level plots and the ESD plots of `select_esd_keys(...)`.

    cache: PNGs derived from the spectra are kept there, keyed by everything they are drawn
    from (a matrix's eigenvalues and metrics, or every matrix's for a model-level plot) and by
    `plot_code_version()`, so a rerun on cached spectra redraws only what changed (and imports
    no matplotlib when nothing did). The bytes are those a fresh draw gives.
    """
    code = plot_code_version()
    layer_rows = [_layer_fields(lm) for lm in analysis.layers]
    esd_digest = _esd_digest(analysis)
    summary = {}
    for stem, _title, _caption, render in SUMMARY_PLOTS:
        key = blob_key("summary", stem, code, layer_rows, esd_digest)
        png = _cached_png(cache, key, lambda render=render: render(analysis))
        if png is not None:
            summary[stem] = png
    esd = {}
    selected = set(select_esd_keys(analysis, max_esd_plots))
    canvases: list[object] = []  # one figure redrawn per matrix, made on the first miss

    def draw(lam: np.ndarray, lm: LayerMetrics) -> bytes | None:
        P = _plots()
        if not canvases:
            canvases.append(P.EsdCanvas())
        return P.esd_plot(lam, lm, canvases[0])

    for index, (lm, row) in enumerate(zip(analysis.layers, layer_rows, strict=True)):
        if lm.key in selected:
            lam = np.ascontiguousarray(analysis.esds[lm.key], dtype=np.float64)
            key = blob_key("esd", code, row, lam.tobytes())
            png = _cached_png(cache, key, lambda lam=lam, lm=lm: draw(lam, lm))
            if png is not None:
                esd[lm.key] = (esd_stem(index, lm.key), png)
    return ReportPlots(summary, esd)


def detailed_indices(analysis: Analysis, plots: ReportPlots) -> set[int]:
    """Which matrices get a per-layer section: all up to MAX_DETAIL_SECTIONS, beyond that the
    warned ones and those with an ESD plot (keeps a report on a huge model readable)."""
    if len(analysis.layers) <= MAX_DETAIL_SECTIONS:
        return set(range(len(analysis.layers)))
    return {i for i, lm in enumerate(analysis.layers) if lm.warnings or lm.key in plots.esd}


# --- report.html ---

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


def detail_rows(lm: LayerMetrics, ci_level: float = 0.95) -> list[tuple[str, object]]:
    """(label, value) of a per-layer section: every `DETAIL_FIELDS` row, then the alpha
    interval (at `ci_level`) and the `OPTIONAL_DETAIL_FIELDS` that were computed."""
    rows: list[tuple[str, object]] = [(label, _value(lm, attr)) for label, attr in DETAIL_FIELDS]
    if lm.alpha_ci_low is not None and lm.alpha_ci_high is not None:
        interval = f"[{H.fmt(lm.alpha_ci_low, 4)}, {H.fmt(lm.alpha_ci_high, 4)}]"
        rows.append((f"α {100 * ci_level:g}% bootstrap interval", interval))
    rows += [
        (label, getattr(lm, attr))
        for label, attr in OPTIONAL_DETAIL_FIELDS
        if getattr(lm, attr) is not None
    ]
    return rows


def _html_layer(index: int, lm: LayerMetrics, plots: ReportPlots, ci_level: float) -> H.Markup:
    rows = [[label, H.fmt(value, 6)] for label, value in detail_rows(lm, ci_level)]
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
    ci_level = float(analysis.options.get("ci_level", 0.95))
    sections = [_html_layer(i, lm, plots, ci_level) for i, lm in shown]
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
    moe = moe_html(analysis)  # None without routed experts
    toc = H.nav(
        [
            ("Summary", "#summary"),
            *([("Mixture of experts", "#moe")] if moe is not None else []),
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
        *([moe] if moe is not None else []),
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


# --- report.md ---


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
    parts += _md_summary(analysis, plots) + moe_markdown(analysis)
    parts += _md_warned(analysis) + _md_layers(analysis, plots)
    return "\n".join(parts)


def write_report(
    analysis: Analysis,
    out_dir: str | os.PathLike[str],
    *,
    formats: str | Sequence[str] | None = FORMATS,
    force: bool = False,
    max_esd_plots: int = DEFAULT_MAX_ESD_PLOTS,
    protect: Protect = (),
    plot_cache: BlobCache | None = None,
) -> list[Path]:
    """Write the report folder atomically and return the final paths of the files written.

    formats: any of html, md, json, csv (a comma-separated string or a sequence; None = all).
    Plots (plots/*.png) are written with html or md. Raises OutputError if `out_dir` exists,
    is not empty and `force` is False; ValidationError for an unknown format. The analysed source
    and `protect` (e.g. the cache folder) are never replaced, even with `force`. `plot_cache`:
    where PNGs are reused from and kept (see `render_plots`).
    """
    wanted = parse_formats(formats)
    final = Path(out_dir).expanduser().absolute()
    protect = (analysis.source, *protect)
    check_output_dir(final, force=force, protect=protect)  # fail before rendering, not after
    files: dict[str, bytes | str] = {}
    if "html" in wanted or "md" in wanted:
        plots = render_plots(analysis, max_esd_plots=max_esd_plots, cache=plot_cache)
        files.update(plots.files())
        if "html" in wanted:
            files["report.html"] = render_html(analysis, plots)
        if "md" in wanted:
            files["report.md"] = render_markdown(analysis, plots)
    if "json" in wanted:
        files["metrics.json"] = analysis.to_json()
    if "csv" in wanted:
        files["metrics.csv"] = analysis.to_csv()
    return write_output_files(final, files, force=force, protect=protect)
