"""Plots of a `Comparison` (spectra compare), rendered to PNG bytes without pyplot.

Each function takes the Comparison and returns PNG bytes, or None when there is nothing to draw.
Every number drawn is in compare.json (max-cos values, dW's top singular values, counts).
Tensor names are drawn with `parse_math=False`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from spectra.analysis.comparison import Comparison
from spectra.analysis.intruders import epsilon_key
from spectra.reports.plots import fixed_margins, png_bytes
from spectra.reports.roles import ordered_roles, role_color

FIGSIZE = (8.0, 4.2)


def _first_eps(cmp: Comparison) -> float:
    return cmp.options.epsilons[0]


def intruders_by_layer(cmp: Comparison) -> bytes | None:
    """Stacked bars: intruder count at the first epsilon per depth, one colour per role."""
    eps = _first_eps(cmp)
    counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    depths = sorted({p.layer for p in cmp.pairs if p.layer is not None})
    if not depths:
        return None
    for p in cmp.pairs:
        if p.layer is not None:
            counts[p.role][p.layer] += p.intruders.count(eps)
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    x = np.arange(len(depths))
    bottom = np.zeros(len(depths))
    for role in ordered_roles(list(counts)):
        heights = np.array([counts[role].get(d, 0) for d in depths], dtype=float)
        ax.bar(x, heights, bottom=bottom, color=role_color(role), label=role, width=0.8)
        bottom += heights
    ax.set_xticks(x, [str(d) for d in depths])
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel(f"intruders (epsilon = {eps:g})")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Intruder dimensions by layer and role (top k = {cmp.options.k})")
    ax.set_ylim(0, max(1.0, float(bottom.max()) * 1.15))
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    fixed_margins(fig)
    return png_bytes(fig)


def max_cos_curves(cmp: Comparison) -> bytes | None:
    """Max |cos| of each top-k fine-tuned singular vector vs its rank, one line per matrix."""
    changed = [p for p in cmp.pairs if p.kind != "unchanged" and p.intruders.max_cos]
    if not changed:
        return None
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    seen: set[str] = set()
    for p in changed:
        idx = np.arange(1, len(p.intruders.max_cos) + 1)
        label = p.role if p.role not in seen else None
        seen.add(p.role)
        ax.plot(idx, p.intruders.max_cos, color=role_color(p.role), alpha=0.55, lw=1, label=label)
    for eps in cmp.options.epsilons:
        ax.axhline(eps, color="#b42318", lw=0.8, ls="--", alpha=0.7)
    floor = max(p.intruders.floor for p in changed)
    ax.axhline(floor, color="#5b6475", lw=0.8, ls=":", label="1/sqrt(m) floor")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fine-tuned singular vector (1 = largest)")
    ax.set_ylabel("max |cos| to any base singular vector")
    ax.set_title("How close each top singular vector stays to the base (dashed: epsilons)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, ncol=4, loc="lower left")
    fixed_margins(fig)
    return png_bytes(fig)


def update_spectra(cmp: Comparison) -> bytes | None:
    """Top singular values of dW, normalized by its largest, one line per changed matrix."""
    changed = [p for p in cmp.pairs if p.kind != "unchanged" and p.update.spectral_norm > 0]
    if not changed:
        return None
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    seen: set[str] = set()
    for p in changed:
        s = np.asarray(p.update.top_singular_values) / p.update.spectral_norm
        s = s[s > 0]
        label = p.role if p.role not in seen else None
        seen.add(p.role)
        ax.semilogy(
            np.arange(1, s.size + 1), s, color=role_color(p.role), alpha=0.55, lw=1, label=label
        )
    ax.set_xlabel("index i")
    ax.set_ylabel("S_i(dW) / S_1(dW)")
    ax.set_title("Spectrum of the update dW = W_ft - W_base (top values)")
    ax.legend(fontsize=8, ncol=4, loc="upper right")
    fixed_margins(fig)
    return png_bytes(fig)


def epsilon_sweep(cmp: Comparison) -> bytes | None:
    """Total intruder count vs epsilon, overall and per role."""
    eps = list(cmp.options.epsilons)
    f = cmp.forensics
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    keys = [epsilon_key(e) for e in eps]
    ax.plot(eps, [f.intruders_total[k] for k in keys], "o-", color="#1d2430", label="all")
    for role in ordered_roles(list(f.intruders_by_role)):
        row = f.intruders_by_role[role]
        ax.plot(eps, [row[k] for k in keys], ".--", color=role_color(role), label=role)
    ax.set_xlabel("epsilon (max |cos| below it = intruder)")
    ax.set_ylabel("intruder dimensions")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Epsilon sweep")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    fixed_margins(fig)
    return png_bytes(fig)


PLOTS = {
    "intruders_by_layer": (intruders_by_layer, "Intruder count by layer and role"),
    "max_cos": (max_cos_curves, "Max |cos| of the top-k singular vectors per matrix"),
    "dw_spectra": (update_spectra, "Singular value spectra of dW"),
    "epsilon_sweep": (epsilon_sweep, "Intruders across the epsilon sweep"),
}


def render_all(cmp: Comparison) -> dict[str, bytes]:
    """{name: PNG bytes} for every plot that has something to draw."""
    out = {}
    for name, (func, _) in PLOTS.items():
        png = func(cmp)
        if png is not None:
            out[name] = png
    return out
