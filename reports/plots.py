"""Plots of an HT-SR analysis, rendered to PNG bytes.

Every function takes results (LayerMetrics rows, eigenvalue arrays) and returns PNG bytes, or
None when there is nothing to draw (e.g. no matrix has a layer index). Figures are built as
`matplotlib.figure.Figure` objects drawn by the Agg canvas: no pyplot, no global state, safe in
threads and in processes that use another backend. Every number drawn is also in metrics.json.

Text from the checkpoint (tensor names) is drawn with `parse_math=False`, so a `$` in a name is
shown as it is instead of being parsed as mathtext, and without its control characters
(`printable`): matplotlib warns about glyphs missing from the font by printing the raw character,
so an ESC in a name would otherwise reach the terminal.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch, Rectangle
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

from spectra.analysis.results import LayerMetrics
from spectra.reports.html import printable
from spectra.reports.roles import ordered_roles, role_color

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import RendererAgg

# Thresholds of the HT-SR warnings (methods.md section 2).
ALPHA_LOW = 2.0
ALPHA_HIGH = 6.0
# Eigenvalues at or below this are dropped before fitting (methods.md section 2); plots match.
EVAL_FLOOR = 1e-5

DPI = 100
PNG_COMPRESS_LEVEL = 3
# the ESD plot's colours: histogram, fitted law, xmin marker
_HIST_COLOR = "#4c72b0"
_FIT_COLOR = "#c44e52"
_XMIN_COLOR = "#555555"


def short_label(text: str, limit: int = 60) -> str:
    """`text` cut in the middle with an ellipsis when longer than `limit` characters."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-(limit - 1 - half) :]}"


def png_bytes(fig: Figure) -> bytes:
    """The figure drawn by Agg at its dpi (`DPI`) as PNG bytes (`encode_png`: RGB, no
    metadata, so the same bytes on every run).

    Drawn once (bbox='tight' draws the figure twice) and encoded at zlib level 3: the plots are
    a few flat colours, so this is within a few percent of level 6's size at a third of the
    time; RGB (the figures are opaque) is a quarter less to compress than RGBA.
    """
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.set_dpi(DPI)
    fig.canvas.draw()
    return encode_png(np.asarray(fig.canvas.buffer_rgba()))


def encode_png(rgba: np.ndarray) -> bytes:
    """PNG bytes of an opaque (H, W, 4) uint8 RGBA image (a rendered figure), stored as RGB at
    `DPI` and zlib level `PNG_COMPRESS_LEVEL`, without metadata (same bytes on every run)."""
    from PIL import Image

    buf = io.BytesIO()
    rgb = Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
    rgb.save(buf, format="png", dpi=(DPI, DPI), compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def fixed_margins(
    fig: Figure,
    *,
    left: float = 0.75,
    right: float = 0.2,
    bottom: float = 0.55,
    top: float = 0.4,
    wspace: float = 0.3,
    hspace: float = 0.3,
) -> None:
    """Margins in inches instead of `tight_layout` (which measures every tick label with an
    extra draw and was most of a summary plot's cost). wspace/hspace: fractions of an axes."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wspace,
        hspace=hspace,
    )


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def decade_label(value: float, _pos: int | None = None) -> str:
    """'10⁻³' for a power of ten, else the value in 3 significant digits. Plain text: the
    default log labels are mathtext ('$10^{-3}$'), whose parser was the largest single cost of
    drawing a log axis."""
    if not (value > 0 and math.isfinite(value)):
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) < 1e-9:
        return "10" + str(round(exponent)).translate(_SUPERSCRIPT)
    return f"{value:.3g}"


def _light_log_ticks(ax, *, x: bool = True, y: bool = True) -> None:  # noqa: ANN001 - Axes
    """Plain-text decade labels and no minor ticks on the log axes of `ax`. Mathtext labels
    ('$10^{-3}$', the default) and the minor tick artists (8 per decade, each two lines and a
    label) were most of the cost of drawing a log plot; the decades carry the information."""
    for axis in ([ax.xaxis] if x else []) + ([ax.yaxis] if y else []):
        axis.set_major_formatter(FuncFormatter(decade_label))
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# --------------------------------------------------------------------------------------------
# ESD of one matrix
# --------------------------------------------------------------------------------------------


class EsdCanvas:
    """One Figure for many ESD plots, drawn by blitting: what does not depend on the matrix
    (axes, ticks, tick and axis labels) is rendered once per axis range and kept as a bitmap;
    each plot restores it and draws only its own artists on top (the histogram, the fit, the
    xmin marker, the spines over them, the status or the legend, the title), then encodes the
    pixels. The axis limits are whole decades around the data, so the 40 ESDs of a model share
    one or a few backgrounds; ticks and their labels are laid out and rendered once per range,
    not once per plot (they were most of an ESD plot's cost). Not shared between threads:
    each `render_plots` call makes its own.

    Artists: `hist` (the log-binned density, one step path), `fit` (the power law on
    [xmin, xmax]), `xmin` (dashed vertical line), `status` (shown instead of the fit when the
    fit did not succeed), `legend` (`EsdLegend`: a frame, one handle and one label per shown
    artist, laid out by hand: matplotlib's Legend measured and laid out its boxes on every draw).
    The blitted bytes equal those of a full draw of the same figure (a test).
    """

    #: backgrounds kept (each a 520 x 340 RGBA bitmap, 0.7 MB; MiniLM's 40 ESDs need 15)
    BACKGROUNDS = 16

    def __init__(self) -> None:
        self.fig = Figure(figsize=(5.2, 3.4), dpi=DPI)
        self.canvas = FigureCanvasAgg(self.fig)
        ax = self.fig.add_subplot()
        self.ax = ax
        self.hist = ax.stairs([1.0], [1.0, 2.0], fill=True, alpha=0.45, color=_HIST_COLOR)
        (self.fit,) = ax.plot([1.0], [1.0], color=_FIT_COLOR, lw=2)
        self.xmin = ax.axvline(1.0, color=_XMIN_COLOR, ls="--", lw=1)
        # under the legend's frame (placed by `EsdLegend.show`)
        self.status = ax.text(
            0, 0, "", transform=self.fig.dpi_scale_trans, ha="right", va="top", fontsize=8
        )
        self.status.set_parse_math(False)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _light_log_ticks(ax)
        ax.set_xlabel("eigenvalue λ of WᵀW")
        ax.set_ylabel("density")
        # Fixed margins: tight_layout measures every tick label and costs more than the drawing.
        self.fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.91)
        self.legend = EsdLegend(self.fig, ax)
        self.backgrounds: dict[tuple[float, ...], object] = {}

    def draw(self, lam: np.ndarray, layer: LayerMetrics) -> Figure:
        """Set every artist from `lam` (eigenvalues above EVAL_FLOOR, non-empty) and `layer`
        (nothing is drawn yet: `png` draws)."""
        ax = self.ax
        lo, hi = float(lam.min()), float(lam.max())
        if hi <= lo:
            hi = lo * 1.01
        bins = np.geomspace(lo, hi, num=min(60, max(10, lam.size // 8)) + 1)
        density, edges = np.histogram(lam, bins=bins, density=True)
        self.hist.set_data(density, edges)
        self.hist.set_label("ESD")
        fit = _fit_curve(lam, layer)
        shown: list[Artist] = [self.hist]
        xs_all, ys_all = [edges[0], edges[-1]], list(density[density > 0])
        if fit is None:
            self.status.set_text(f"power-law fit: {printable(layer.fit_status)}")
        else:
            xs, ys, label, xmin = fit
            self.fit.set_data(xs, ys)
            self.fit.set_label(label)
            self.xmin.set_xdata([xmin, xmin])
            self.xmin.set_label(f"xmin = {xmin:.3g}")
            shown += [self.fit, self.xmin]
            xs_all += [float(xs[0]), float(xs[-1])]
            ys_all += [float(ys.min()), float(ys.max())]
        self.fit.set_visible(fit is not None)
        self.xmin.set_visible(fit is not None)
        self.status.set_visible(fit is None)
        ax.set_xlim(*_decades(min(xs_all), max(xs_all)))
        ax.set_ylim(*_decades(min(ys_all), max(ys_all)))
        # y given: matplotlib then skips measuring the tick labels to place the title (there
        # are none on top), which was a seventh of an ESD plot's cost; same position.
        ax.set_title(short_label(printable(layer.key)), fontsize=9, parse_math=False, y=1.0)
        right, bottom = self.legend.show(shown, self.canvas.get_renderer())
        self.status.set_position((right, bottom - 0.4 * EsdLegend.FONT / 72))
        return self.fig

    def _matrix_artists(self) -> list[Artist]:
        """What `png` draws over the background, in the order a full draw draws it."""
        ax = self.ax
        return [
            self.hist,
            self.fit,
            self.xmin,
            *ax.spines.values(),
            self.status,
            ax.title,
            *self.legend.artists(),
        ]

    def _background(self) -> object:
        """The pixels of everything but `_matrix_artists` at the current limits (cached)."""
        key = (*self.ax.get_xlim(), *self.ax.get_ylim())
        if key in self.backgrounds:  # most recently used last
            self.backgrounds[key] = self.backgrounds.pop(key)
        else:
            hidden = [(a, a.get_visible()) for a in self._matrix_artists()]
            for artist, _ in hidden:
                artist.set_visible(False)
            self.canvas.draw()
            for artist, visible in hidden:
                artist.set_visible(visible)
            if len(self.backgrounds) >= self.BACKGROUNDS:
                self.backgrounds.pop(next(iter(self.backgrounds)))
            self.backgrounds[key] = self.canvas.copy_from_bbox(self.fig.bbox)
        return self.backgrounds[key]

    def png(self) -> bytes:
        """The PNG of what `draw` set: the cached background, then the matrix's artists."""
        self.canvas.restore_region(self._background())
        renderer = self.canvas.get_renderer()
        for artist in self._matrix_artists():
            if artist.get_visible():
                artist.draw(renderer)
        return encode_png(np.asarray(self.canvas.buffer_rgba()))


def _decades(lo: float, hi: float) -> tuple[float, float]:
    """The whole decades around [lo, hi] (lo > 0), with a margin of 2% of a decade so no data
    sits on the frame: 0.02..40 -> (0.01, 100)."""
    a = math.floor(math.log10(lo) - 0.02)
    b = math.ceil(math.log10(hi) + 0.02)
    return 10.0**a, 10.0 ** max(b, a + 1)


class EsdLegend:
    """The ESD plot's legend at the upper right of the axes, built from plain artists: a frame,
    a handle per entry (the histogram's patch, the fit's line, the xmin marker's dashed line)
    and its label, laid out in points like matplotlib's default legend (font 8 pt, border pad
    0.4, handle length 2, handle-text pad 0.8, label spacing 0.5, all in font sizes; 0.5 from
    the axes corner). The labels are measured once each (their text changes per matrix)."""

    FONT = 8.0

    def __init__(self, fig: Figure, ax: Axes) -> None:
        self.fig, self.ax = fig, ax
        inch = fig.dpi_scale_trans
        self.frame = FancyBboxPatch(
            (0, 0),
            1,
            1,
            boxstyle=f"round,pad=0,rounding_size={0.2 * self.FONT / 72}",
            transform=inch,
            facecolor="white",
            edgecolor="0.8",
            alpha=0.8,
            lw=1.0,
            snap=True,
        )
        patch = Rectangle((0, 0), 1, 1, transform=inch, color=_HIST_COLOR, alpha=0.45, lw=0)
        fit = Line2D([0, 1], [0, 0], transform=inch, color=_FIT_COLOR, lw=2)
        xmin = Line2D([0, 1], [0, 0], transform=inch, color=_XMIN_COLOR, ls="--", lw=1)
        self.handles: list[Artist] = [patch, fit, xmin]
        self.labels = [
            Text(0, 0, "", transform=inch, fontsize=self.FONT, va="baseline", parse_math=False)
            for _ in self.handles
        ]
        for artist in [self.frame, *self.handles, *self.labels]:
            artist.set_visible(False)
            fig.add_artist(artist)

    def artists(self) -> list[Artist]:
        return [self.frame, *self.handles, *self.labels]

    def show(self, entries: Sequence[Artist], renderer: RendererAgg) -> tuple[float, float]:
        """Lay out one row per artist of `entries` (its label), top to bottom; rows of the
        handles not given are hidden. entries[i] is drawn with handles[i]'s kind: the
        histogram, the fit, the xmin marker. Returns the frame's (right, bottom) in inches."""
        em = self.FONT / 72  # inches
        prop = self.labels[0].get_fontproperties()
        texts = [e.get_label() for e in entries]
        sizes = [renderer.get_text_width_height_descent(t, prop, ismath=False) for t in texts]
        dpi = self.fig.dpi
        _, height, descent = renderer.get_text_width_height_descent("Xgα", prop, ismath=False)
        row, below = height / dpi, descent / dpi
        width = max(w for w, _h, _d in sizes) / dpi
        box_w = 2 * 0.4 * em + 2.0 * em + 0.8 * em + width
        box_h = 2 * 0.4 * em + len(texts) * row + (len(texts) - 1) * 0.5 * em
        x1, y1 = self.ax.get_position().x1, self.ax.get_position().y1
        fig_w, fig_h = self.fig.get_size_inches()
        right, top = x1 * fig_w - 0.5 * em, y1 * fig_h - 0.5 * em
        left, bottom = right - box_w, top - box_h
        self.frame.set_bounds(left, bottom, box_w, box_h)
        self.frame.set_visible(True)
        for i, (handle, label) in enumerate(zip(self.handles, self.labels, strict=True)):
            visible = i < len(texts)
            handle.set_visible(visible)
            label.set_visible(visible)
            if not visible:
                continue
            base = top - 0.4 * em - (i + 1) * row - i * 0.5 * em + below  # text baseline
            middle = base - below + row / 2
            hx = left + 0.4 * em
            if isinstance(handle, Rectangle):
                handle.set_bounds(hx, middle - 0.35 * em, 2.0 * em, 0.7 * em)
            else:
                handle.set_data([hx, hx + 2.0 * em], [middle, middle])
            label.set_position((hx + 2.0 * em + 0.8 * em, base))
            label.set_text(texts[i])
        return right, bottom


def _clean_evals(evals: np.ndarray) -> np.ndarray:
    lam = np.asarray(evals, dtype=np.float64)
    return lam[np.isfinite(lam) & (lam > EVAL_FLOOR)]


def esd_figure(
    evals: np.ndarray, layer: LayerMetrics, canvas: EsdCanvas | None = None
) -> Figure | None:
    """The ESD plot of one matrix as a Figure (drawn into `canvas` when given, reusing it),
    None without eigenvalues above EVAL_FLOOR. See `esd_plot` for what it shows."""
    lam = _clean_evals(evals)
    if lam.size == 0:
        return None
    return (canvas or EsdCanvas()).draw(lam, layer)


def esd_plot(
    evals: np.ndarray, layer: LayerMetrics, canvas: EsdCanvas | None = None
) -> bytes | None:
    """Histogram of the ESD (eigenvalues of W^T W) on log-log axes, fitted power law, xmin.

    evals: (M,) eigenvalues lambda = S^2, any order. The histogram is a density on log-spaced
    bins over the eigenvalues above EVAL_FLOOR, drawn as one step path. The fitted law is drawn
    on [xmin, xmax] as (n_tail / N) * (alpha - 1) / xmin * (lambda / xmin)^-alpha, i.e. the
    tail's share of the density, so it sits on the histogram where the fit is good; a dashed
    line marks xmin. Without a successful fit the fit status is written instead. Returns None
    without eigenvalues. `canvas`: an EsdCanvas to reuse across plots (much cheaper).
    """
    canvas = canvas or EsdCanvas()
    return None if esd_figure(evals, layer, canvas) is None else canvas.png()


def _fit_curve(
    lam: np.ndarray, layer: LayerMetrics
) -> tuple[np.ndarray, np.ndarray, str, float] | None:
    """(xs, ys, legend label, xmin) of the fitted law's curve, None when the fit did not
    succeed. A truncated power law (Lambda set) and a power law with alpha <= 1 (only when
    bounded at xmax, xmax="force") are drawn with their own normalization."""
    ok = layer.fit_status == "ok" and _finite(layer.alpha) and _finite(layer.xmin)
    if not ok:
        return None
    alpha, xmin = float(layer.alpha), float(layer.xmin)  # type: ignore[arg-type]
    xmax = float(layer.xmax) if _finite(layer.xmax) else float(lam.max())
    share = float(np.count_nonzero(lam >= xmin)) / lam.size
    xs = np.geomspace(xmin, max(xmax, xmin * 1.0001), 50)
    if layer.Lambda is not None or not alpha > 1.0:
        # imported here: scipy.optimize is no cost of the default (power-law) plots
        from spectra.analysis.tpl import bounded_pl_pdf, tpl_pdf
    if layer.Lambda is not None:
        ys = share * tpl_pdf(xs, alpha, float(layer.Lambda), xmin)
        return xs, ys, f"truncated power law α = {alpha:.3g}, Λ = {layer.Lambda:.3g}", xmin
    if not alpha > 1.0:
        ys = share * bounded_pl_pdf(xs, alpha, xmin, max(xmax, xmin * 1.0001))
    else:
        ys = share * (alpha - 1.0) / xmin * (xs / xmin) ** (-alpha)
    return xs, ys, f"power law α = {alpha:.3g}", xmin


# --------------------------------------------------------------------------------------------
# Metrics by depth
# --------------------------------------------------------------------------------------------


def _by_role_depth(
    layers: Sequence[LayerMetrics], metric: str
) -> dict[str, list[tuple[int, float]]]:
    """{role: [(layer, mean of metric over matrices of that role and layer)]}, sorted by layer.

    Matrices without a layer index, and missing/non-finite values, are left out.
    """
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for lm in layers:
        value = getattr(lm, metric)
        if lm.layer is None or not _finite(value):
            continue
        acc[lm.role][lm.layer].append(float(value))
    return {
        role: sorted((depth, float(np.mean(vals))) for depth, vals in acc[role].items())
        for role in ordered_roles(set(acc))
    }


def _depth_lines(ax, series: dict[str, list[tuple[int, float]]]) -> None:  # noqa: ANN001
    for role, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=role_color(role), label=printable(role))
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def alpha_by_depth(layers: Sequence[LayerMetrics]) -> bytes | None:
    """alpha per layer, one line per role, with the over-trained (< 2) and under-trained (> 6)
    bands shaded. Several matrices of one role in one layer (experts) are averaged."""
    series = _by_role_depth(layers, "alpha")
    if not series:
        return None
    values = [y for pts in series.values() for _, y in pts]
    fig = Figure(figsize=(7.0, 3.6))
    ax = fig.add_subplot()
    top = max(ALPHA_HIGH + 1.0, max(values) + 0.5)
    bottom = min(ALPHA_LOW - 1.0, min(values) - 0.5)
    ax.axhspan(bottom, ALPHA_LOW, color="#d62728", alpha=0.08, lw=0)
    ax.axhspan(ALPHA_HIGH, top, color="#ff7f0e", alpha=0.08, lw=0)
    for level in (ALPHA_LOW, ALPHA_HIGH):
        ax.axhline(level, color="#777777", lw=0.8, ls=":")
    ax.text(
        0.01,
        ALPHA_LOW,
        " α < 2: over-trained",
        va="top",
        fontsize=7,
        transform=ax.get_yaxis_transform(),
    )
    ax.text(
        0.01,
        ALPHA_HIGH,
        " α > 6: under-trained",
        va="bottom",
        fontsize=7,
        transform=ax.get_yaxis_transform(),
    )
    _depth_lines(ax, series)
    ax.set_ylim(bottom, top)
    ax.set_ylabel("α (power-law exponent)")
    ax.set_title("α by depth", fontsize=10, y=1.0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="role")
    fixed_margins(fig, left=0.65, right=1.25, top=0.35)
    return png_bytes(fig)


def norms_by_depth(layers: Sequence[LayerMetrics]) -> bytes | None:
    """Stable rank (left) and log10 spectral norm (right) per layer, one line per role."""
    ranks = _by_role_depth(layers, "stable_rank")
    norms = _by_role_depth(layers, "log_spectral_norm")
    if not ranks and not norms:
        return None
    fig = Figure(figsize=(9.0, 3.4))
    ax_r, ax_n = fig.subplots(1, 2)
    _depth_lines(ax_r, ranks)
    ax_r.set_ylabel("stable rank  Σλ / λmax")
    ax_r.set_title("stable rank by depth", fontsize=10, y=1.0)
    _depth_lines(ax_n, norms)
    ax_n.set_ylabel("log10 λmax")
    ax_n.set_title("log spectral norm by depth", fontsize=10, y=1.0)
    ax_n.legend(fontsize=7, ncol=2)
    fixed_margins(fig, left=0.7, right=0.15, top=0.35, wspace=0.3)
    return png_bytes(fig)


# --------------------------------------------------------------------------------------------
# Singular-value decay per role
# --------------------------------------------------------------------------------------------


def sv_decay(layers: Sequence[LayerMetrics], esds: Mapping[str, np.ndarray]) -> bytes | None:
    """One panel per role: S_i / S_1 against i / M (log y), one curve per matrix coloured by depth.

    S_i = sqrt(lambda_i). Normalizing both axes lets matrices of different shapes share a panel.
    Matrices without a layer index are drawn dashed in black. None when no ESD is available.
    """
    curves: dict[str, list[tuple[int | None, np.ndarray]]] = defaultdict(list)
    for lm in layers:
        lam = esds.get(lm.key)
        if lam is None:
            continue
        s = np.sqrt(np.clip(np.sort(np.asarray(lam, dtype=np.float64))[::-1], 0.0, None))
        if s.size == 0 or not np.isfinite(s).all() or s[0] <= 0:
            continue
        curves[lm.role].append((lm.layer, s / s[0]))
    if not curves:
        return None
    roles = ordered_roles(set(curves))
    ncols = min(3, len(roles))
    nrows = math.ceil(len(roles) / ncols)
    fig = Figure(figsize=(3.3 * ncols, 2.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    depths = [d for items in curves.values() for d, _ in items if d is not None]
    deepest = max(depths) if depths else 0
    cmap = _viridis()
    for ax, role in zip(axes, roles, strict=False):
        for depth, s in curves[role]:
            x = np.arange(1, s.size + 1) / s.size
            if depth is None:
                ax.plot(x, s, color="black", lw=0.9, ls="--")
            else:
                ax.plot(x, s, color=cmap(depth / max(deepest, 1)), lw=0.9)
        ax.set_yscale("log")
        _light_log_ticks(ax, x=False)
        ax.set_title(printable(role), fontsize=9, parse_math=False, y=1.0)
        ax.set_xlabel("i / min(m, n)", fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(roles) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("S_i / S_1", fontsize=8)
    fig.suptitle(f"singular-value decay per role (colour: layer 0 to {deepest})", fontsize=10)
    fixed_margins(fig, left=0.65, right=0.15, bottom=0.45, top=0.55, wspace=0.28, hspace=0.5)
    return png_bytes(fig)


def _viridis():  # noqa: ANN202 - a matplotlib Colormap
    from matplotlib import colormaps

    return colormaps["viridis"]


# --------------------------------------------------------------------------------------------
# Outlier ratio heatmap
# --------------------------------------------------------------------------------------------


def outlier_grid(layers: Sequence[LayerMetrics]) -> tuple[list[int], list[str], np.ndarray]:
    """(depths, roles, grid) with grid[i, j] the mean outlier ratio of role j in layer i (NaN
    where there is no such matrix or no ratio). Matrices without a layer index are left out."""
    cells: dict[tuple[int, str], list[float]] = defaultdict(list)
    for lm in layers:
        if lm.layer is not None and _finite(lm.outlier_ratio):
            cells[(lm.layer, lm.role)].append(float(lm.outlier_ratio))  # type: ignore[arg-type]
    depths = sorted({d for d, _ in cells})
    roles = ordered_roles({r for _, r in cells})
    grid = np.full((len(depths), len(roles)), np.nan)
    for (depth, role), vals in cells.items():
        grid[depths.index(depth), roles.index(role)] = float(np.mean(vals))
    return depths, roles, grid


def outlier_heatmap(layers: Sequence[LayerMetrics]) -> bytes | None:
    """Heatmap of the weight-magnitude outlier ratio, layer (rows) x role (columns)."""
    depths, roles, grid = outlier_grid(layers)
    if grid.size == 0:
        return None
    fig = Figure(figsize=(1.0 + 0.75 * len(roles) + 1.2, 1.2 + 0.28 * len(depths)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(roles)), labels=[printable(r) for r in roles], fontsize=8)
    ax.set_yticks(range(len(depths)), labels=[str(d) for d in depths], fontsize=7)
    ax.set_xlabel("role")
    ax.set_ylabel("layer")
    if grid.size <= 400:
        finite = grid[np.isfinite(grid)]
        middle = float(np.nanmax(finite)) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(grid):
            if math.isfinite(value):
                colour = "white" if value > middle else "black"
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6, color=colour)
    fig.colorbar(image, ax=ax, label="outlier ratio")
    ax.set_title("weight-magnitude outlier ratio", fontsize=10, y=1.0)
    fixed_margins(fig, left=0.6, right=0.1, bottom=0.6, top=0.35)
    return png_bytes(fig)
