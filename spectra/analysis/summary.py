"""Model summary of per-matrix HT-SR metrics: groups by role and depth, warned share, standouts.

Standouts, in this order (each a dict key, metric, value, reason):
1. failed fits and non-finite matrices;
2. alpha outside [2, 6] (methods.md section 2), farthest from the band first;
3. robust outliers within a role: |z| > 3 with `z = (x - median) / (1.4826 * MAD)` of alpha and
   of log_spectral_norm among matrices of the same role (roles with >= 4 fitted matrices; the
   1.4826 factor makes MAD a consistent estimate of a normal standard deviation);
4. the matrix with the largest weight-magnitude outlier ratio, when any ratio is > 0.

`means` are WeightWatcher 0.7.7's `get_summary()`: the mean of each SUMMARY_METRICS column over
the matrices that have a value (pandas' mean skips NaN the same way; WeightWatcher writes -1
for a failed fit's alpha and averages it in, spectra leaves a failed fit out).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from spectra.analysis.htsr import ALPHA_HIGH, ALPHA_LOW
from spectra.analysis.results import GroupSummary, LayerMetrics, ModelSummary

ROBUST_Z = 3.0  # |robust z| above this within a role makes a standout
MIN_GROUP = 4  # fewer matrices than this in a role: no z-scores
MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
SUMMARY_METRICS = (
    "log_norm",
    "alpha",
    "alpha_weighted",
    "log_alpha_norm",
    "log_spectral_norm",
    "stable_rank",
    "mp_softrank",
)


def summary_means(layers: Iterable[LayerMetrics]) -> dict[str, float]:
    """WeightWatcher's get_summary(): mean of each SUMMARY_METRICS column with any value."""
    layers = list(layers)
    out: dict[str, float] = {}
    for metric in SUMMARY_METRICS:
        values = [getattr(lm, metric) for lm in layers if getattr(lm, metric) is not None]
        if values:
            out[metric] = statistics.fmean(values)
    return out


def group_summary(layers: Iterable[LayerMetrics]) -> GroupSummary:
    """count, mean and median alpha over fitted matrices, number with warnings."""
    layers = list(layers)
    alphas = [lm.alpha for lm in layers if lm.alpha is not None]
    return GroupSummary(
        count=len(layers),
        mean_alpha=statistics.fmean(alphas) if alphas else None,
        median_alpha=statistics.median(alphas) if alphas else None,
        warned=sum(1 for lm in layers if lm.warnings),
    )


def model_summary(layers: list[LayerMetrics]) -> ModelSummary:
    """The ModelSummary of a list of matrices (any order)."""
    by_role: dict[str, list[LayerMetrics]] = defaultdict(list)
    by_depth: dict[int, list[LayerMetrics]] = defaultdict(list)
    for lm in layers:
        by_role[lm.role].append(lm)
        if lm.layer is not None:
            by_depth[lm.layer].append(lm)
    overall = group_summary(layers)
    return ModelSummary(
        num_matrices=len(layers),
        num_warned=overall.warned,
        warned_share=overall.warned / len(layers) if layers else None,
        mean_alpha=overall.mean_alpha,
        by_role={role: group_summary(group) for role, group in sorted(by_role.items())},
        by_depth={d: group_summary(group) for d, group in sorted(by_depth.items())},
        standouts=standouts(layers),
        means=summary_means(layers),
    )


def standouts(layers: list[LayerMetrics]) -> list[dict[str, Any]]:
    """Matrices that stand out (module docstring), most notable first."""
    out = _failed(layers) + _alpha_band(layers)
    by_role: dict[str, list[LayerMetrics]] = defaultdict(list)
    for lm in layers:
        by_role[lm.role].append(lm)
    for role, group in sorted(by_role.items()):
        for metric in ("alpha", "log_spectral_norm"):
            out.extend(_robust_outliers(role, group, metric))
    out.extend(_largest_outlier_ratio(layers))
    return out


def _item(lm: LayerMetrics, metric: str, value: Any, reason: str) -> dict[str, Any]:
    return {"key": lm.key, "metric": metric, "value": value, "reason": reason}


def _failed(layers: list[LayerMetrics]) -> list[dict[str, Any]]:
    return [
        _item(lm, "fit_status", lm.fit_status, lm.fit_message or "fit failed")
        for lm in layers
        if lm.fit_status == "failed"
    ]


def _alpha_band(layers: list[LayerMetrics]) -> list[dict[str, Any]]:
    rows = []
    for lm in layers:
        a = lm.alpha
        if a is None or ALPHA_LOW <= a <= ALPHA_HIGH:
            continue
        if a > ALPHA_HIGH:
            reason, dist = f"alpha > {ALPHA_HIGH:g}: under-trained", a - ALPHA_HIGH
        else:
            reason, dist = f"alpha < {ALPHA_LOW:g}: over-trained", ALPHA_LOW - a
        rows.append((dist, _item(lm, "alpha", a, reason)))
    rows.sort(key=lambda r: -r[0])
    return [r[1] for r in rows]


def _robust_outliers(role: str, group: list[LayerMetrics], metric: str) -> list[dict[str, Any]]:
    pairs = [(lm, getattr(lm, metric)) for lm in group if getattr(lm, metric) is not None]
    if len(pairs) < MIN_GROUP:
        return []
    values = np.array([v for _, v in pairs], dtype=np.float64)
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * MAD_SCALE
    if mad <= 0:
        return []
    rows = []
    for lm, v in pairs:
        z = (v - med) / mad
        if abs(z) > ROBUST_Z:
            reason = f"robust z = {z:+.1f} against the {len(pairs)} '{role}' matrices"
            rows.append((abs(z), _item(lm, metric, v, reason)))
    rows.sort(key=lambda r: -r[0])
    return [r[1] for r in rows]


def _largest_outlier_ratio(layers: list[LayerMetrics]) -> list[dict[str, Any]]:
    rated = [lm for lm in layers if lm.outlier_ratio is not None and lm.outlier_ratio > 0]
    if not rated:
        return []
    top = max(rated, key=lambda lm: lm.outlier_ratio or 0.0)
    reason = "largest share of weight-magnitude outliers in the model"
    return [_item(top, "outlier_ratio", top.outlier_ratio, reason)]
