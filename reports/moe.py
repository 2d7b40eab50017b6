"""The mixture-of-experts section of `spectra report` (HTML and Markdown), from `Analysis.moe`.

What it shows, in both formats: the experts per layer, the router and shared-expert matrices
(listed, never averaged with the routed experts), aggregates by role inside the expert, one
layer x expert x role table of alpha per layer, and the expert similarity per layer and role
(the overlap of the experts' top-k singular subspaces, docs/methods.md "Mixture of experts"):
a shaded E x E table for up to MAX_MATRIX_EXPERTS experts, the mean off-diagonal overlap and the
redundant pairs always. Every number is also in metrics.json (`moe`).
"""

from __future__ import annotations

from collections.abc import Sequence

from spectra.analysis.results import Analysis, ExpertGroup, ExpertOverlap, MoeSummary
from spectra.reports import html as H
from spectra.reports import markdown as M

#: Largest number of experts whose full overlap matrix is drawn (beyond: summary rows only).
MAX_MATRIX_EXPERTS = 32
#: Redundant pairs shown per group (all are in metrics.json).
MAX_PAIRS = 20
GROUP_HEADERS = ("count", "mean α", "median α", "warned")

INTRO = (
    "Routed experts grouped by layer and by role inside the expert. The router and the shared "
    "experts (always active) are listed apart and left out of the expert aggregates. Expert "
    "similarity: overlap of two experts' top-k singular subspaces on the model-width side, "
    "‖P_iᵀP_j‖²_F / k (1: the same directions; k/d: what independent random experts give); "
    "pairs at or above 0.9 are called redundant."
)


def _layer_label(layer: int | None) -> str:
    return "–" if layer is None else str(layer)


def _roles(groups: Sequence[ExpertGroup]) -> list[str | None]:
    seen: dict[str | None, None] = {}
    for g in groups:
        seen[g.expert_role] = None
    return list(seen)


def _by_layer(moe: MoeSummary) -> dict[int | None, list[ExpertGroup]]:
    out: dict[int | None, list[ExpertGroup]] = {}
    for g in moe.groups:
        out.setdefault(g.layer, []).append(g)
    return out


def alpha_table(groups: Sequence[ExpertGroup]) -> tuple[list[str], list[list[object]]]:
    """One layer's expert x role table of alpha: (headers, rows), one row per expert."""
    roles = _roles(groups)
    alpha = {
        (g.expert_role, e): a for g in groups for e, a in zip(g.experts, g.alphas, strict=True)
    }
    experts = sorted({e for g in groups for e in g.experts})
    headers = ["expert", *(f"α {r or '?'}" for r in roles)]
    return headers, [[e, *(alpha.get((r, e)) for r in roles)] for e in experts]


def overlap_rows(ov: ExpertOverlap) -> list[list[object]]:
    return [[e, *row] for e, row in zip(ov.experts, ov.overlap, strict=True)]


def _summary_facts(moe: MoeSummary) -> list[tuple[str, object]]:
    counts = sorted(set(moe.num_experts.values()))
    groups = [g for g in moe.groups if g.overlap is not None]
    redundant = sum(len(g.overlap.redundant) for g in groups if g.overlap is not None)
    facts: list[tuple[str, object]] = [
        ("MoE layers", len(moe.num_experts)),
        ("experts per layer", ", ".join(map(str, counts))),
        ("router matrices", len(moe.routers)),
        ("shared-expert matrices", len(moe.shared)),
    ]
    if groups:
        facts.append(("redundant expert pairs", redundant))
    return facts


def _overlap_caption(ov: ExpertOverlap) -> str:
    mean = H.fmt(ov.mean_offdiag, 3)
    return (
        f"k = {ov.k} of d = {ov.dim} ({ov.side}put side); random baseline k/d = "
        f"{H.fmt(ov.baseline, 3)}; mean off-diagonal overlap {mean}"
    )


def _pairs_text(ov: ExpertOverlap) -> str:
    shown = ", ".join(f"{i}–{j} ({v:.3f})" for i, j, v in ov.redundant[:MAX_PAIRS])
    more = len(ov.redundant) - MAX_PAIRS
    return "redundant pairs: " + (shown or "none") + (f" and {more} more" if more > 0 else "")


# --- HTML ---


def _shade(value: float | None) -> object:
    if value is None:
        return None
    alpha = max(0.0, min(1.0, value))
    return H.tag("span", H.fmt(value, 3), style=f"background: rgba(214, 39, 40, {alpha:.2f})")


def _html_overlap(ov: ExpertOverlap) -> list[object]:
    parts: list[object] = [H.paragraph(_overlap_caption(ov), class_="muted")]
    if len(ov.experts) <= MAX_MATRIX_EXPERTS:
        cols = [
            H.Column("expert", numeric=True),
            *(H.Column(str(e), numeric=True) for e in ov.experts),
        ]
        rows = [[row[0], *(_shade(v) for v in row[1:])] for row in overlap_rows(ov)]
        parts.append(H.table(cols, rows))
    parts.append(H.paragraph(_pairs_text(ov)))
    return parts


def moe_html(analysis: Analysis) -> H.Markup | None:
    """The "Mixture of experts" section of report.html (None for a model without experts)."""
    moe = analysis.moe
    if moe is None:
        return None
    num = [H.Column(h, numeric=True) for h in GROUP_HEADERS]
    role_rows = [
        [r, g.count, g.mean_alpha, g.median_alpha, g.warned] for r, g in moe.by_expert_role.items()
    ]
    parts: list[object] = [
        H.paragraph(INTRO, class_="muted"),
        H.facts(_summary_facts(moe)),
        H.tag("h3", "Routed experts by role inside the expert"),
        H.table(["role", *num], role_rows),
    ]
    by_key = {lm.key: lm for lm in analysis.layers}
    apart = [(k, "router") for k in moe.routers] + [(k, "shared expert") for k in moe.shared]
    if apart:
        rows = [[k, kind, by_key[k].layer, by_key[k].alpha] for k, kind in apart if k in by_key]
        cols = [
            H.Column("matrix", name=True),
            "kind",
            H.Column("layer", numeric=True),
            H.Column("α", numeric=True),
        ]
        parts += [
            H.tag("h3", "Router and shared experts (not in the aggregates)"),
            H.table(cols, rows),
        ]
    for layer, groups in _by_layer(moe).items():
        headers, rows = alpha_table(groups)
        body: list[object] = [H.table([H.Column(h, numeric=True) for h in headers], rows)]
        for g in groups:
            if g.overlap is not None:
                body += [
                    H.tag("h4", f"Expert similarity: {g.expert_role or '?'}"),
                    *_html_overlap(g.overlap),
                ]
        parts.append(H.details(f"layer {_layer_label(layer)}: {len(rows)} experts", *body))
    return H.section("Mixture of experts", *parts, id="moe")


# --- Markdown ---


def moe_markdown(analysis: Analysis) -> list[str]:
    """The "Mixture of experts" part of report.md (empty for a model without experts)."""
    moe = analysis.moe
    if moe is None:
        return []
    out = [
        M.heading("Mixture of experts"),
        M.md_escape(INTRO) + "\n",
        M.bullet_list(f"{k}: {v}" for k, v in _summary_facts(moe)),
        M.heading("Routed experts by role inside the expert", 3),
        M.md_table(
            ["role", *GROUP_HEADERS],
            [
                [r, g.count, g.mean_alpha, g.median_alpha, g.warned]
                for r, g in moe.by_expert_role.items()
            ],
            numeric=[False, True, True, True, True],
        ),
    ]
    by_key = {lm.key: lm for lm in analysis.layers}
    apart = [(k, "router") for k in moe.routers] + [(k, "shared expert") for k in moe.shared]
    if apart:
        rows = [[k, kind, by_key[k].layer, by_key[k].alpha] for k, kind in apart if k in by_key]
        out += [
            M.heading("Router and shared experts (not in the aggregates)", 3),
            M.md_table(["matrix", "kind", "layer", "α"], rows, numeric=[False, False, True, True]),
        ]
    for layer, groups in _by_layer(moe).items():
        headers, rows = alpha_table(groups)
        out += [
            M.heading(f"Layer {_layer_label(layer)}", 3),
            M.md_table(headers, rows, numeric=[True] * len(headers)),
        ]
        for g in groups:
            ov = g.overlap
            if ov is None:
                continue
            out.append(
                M.md_escape(
                    f"Expert similarity, {g.expert_role or '?'}: "
                    f"{_overlap_caption(ov)}; {_pairs_text(ov)}"
                )
                + "\n"
            )
            if len(ov.experts) <= MAX_MATRIX_EXPERTS:
                hdr = ["expert", *map(str, ov.experts)]
                out.append(M.md_table(hdr, overlap_rows(ov), numeric=[True] * len(hdr)))
    return out
