"""What a `spectra report` shows, whatever the format: the shared tables, plots list and selections.

The model-level plots (`SUMMARY_PLOTS`: stem, title, caption, renderer), the per-layer fields
(`DETAIL_FIELDS`) and overview columns (`OVERVIEW_COLUMNS`), the rendered PNGs (`ReportPlots`),
the headline facts, the by-role/by-depth rows, the warned layers and which matrices get a
per-layer section (`detailed_indices`). The HTML (report_html) and Markdown (report_md)
renderers both draw from here, so the two pages say the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spectra.analysis.results import Analysis, LayerMetrics
from spectra.reports import html as H
from spectra.reports import plots as P

MAX_DETAIL_SECTIONS = 256

# (file stem, title, caption, renderer) of the model-level plots.
_SummaryPlot = tuple[str, str, str, Callable[[Analysis], bytes | None]]
SUMMARY_PLOTS: tuple[_SummaryPlot, ...] = (
    (
        "alpha_by_depth",
        "α by depth",
        "Power-law exponent α of each matrix's ESD tail, one line per role. Shaded: α < 2 "
        "(over-trained) and α > 6 (under-trained); well-trained layers sit roughly in 2-6.",
        lambda a: P.alpha_by_depth(a.layers),
    ),
    (
        "norms_by_depth",
        "Stable rank and spectral norm by depth",
        "Stable rank Σλ/λmax (how many directions carry the energy) and log10 λmax, per role.",
        lambda a: P.norms_by_depth(a.layers),
    ),
    (
        "sv_decay",
        "Singular-value decay per role",
        "S_i/S_1 against i/min(m, n); one curve per matrix, coloured by depth (dashed: no layer "
        "index).",
        lambda a: P.sv_decay(a.layers, a.esds),
    ),
    (
        "outlier_heatmap",
        "Outlier ratio",
        "Share of weights whose magnitude exceeds a multiple of the matrix's mean magnitude "
        "(OWL, arXiv 2405.18380), per layer and role.",
        lambda a: P.outlier_heatmap(a.layers),
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
    return [
        ("matrices analysed", s.num_matrices),
        ("with a warning", f"{s.num_warned} ({share})"),
        ("mean α", H.fmt(s.mean_alpha, 3)),
    ]


def _group_rows(groups: dict) -> list[list[object]]:
    return [[k, g.count, g.mean_alpha, g.median_alpha, g.warned] for k, g in groups.items()]


def _role_rows(analysis: Analysis) -> list[list[object]]:
    groups = analysis.summary.by_role
    return _group_rows({role: groups[role] for role in P.ordered_roles(set(groups))})


def display_name(source: str) -> str:
    """A short name for titles: the last two parts of a local path, a Hub id as it is."""
    path = Path(source)
    if path.exists() and len(path.parts) >= 2:
        return "/".join(path.parts[-2:])
    return source


GROUP_HEADERS = ("count", "mean α", "median α", "warned")
STANDOUT_FIELDS = ("key", "metric", "value", "reason")


def detailed_indices(analysis: Analysis, plots: ReportPlots) -> set[int]:
    """Which matrices get a per-layer section: all up to MAX_DETAIL_SECTIONS, beyond that the
    warned ones and those with an ESD plot (keeps a report on a huge model readable)."""
    if len(analysis.layers) <= MAX_DETAIL_SECTIONS:
        return set(range(len(analysis.layers)))
    return {i for i, lm in enumerate(analysis.layers) if lm.warnings or lm.key in plots.esd}
