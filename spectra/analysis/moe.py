"""The mixture-of-experts view of an analysis: per-expert metrics by layer, expert and role.

Routed experts (role "expert") are grouped by (layer, role inside the expert): one group holds
the E experts of one layer's gate (or up, gate_up, down) projections, with each expert's alpha.
Aggregates (`by_expert_role`, `by_layer`) are over routed experts only. The router (role
"router") and the shared experts (role "shared_expert": always active, so no per-expert
comparison) are listed apart, never averaged with the routed experts. Expert similarity
(`spectra.analysis.expert_overlap`) is attached per group when it was computed. The result
dataclasses (`MoeSummary`, `ExpertGroup`) are in spectra.analysis.results.
Roles come from `spectra.sources.roles` (`expert_slot` reads the expert index back from a key).
"""

from __future__ import annotations

from collections import defaultdict

from spectra.analysis.results import ExpertGroup, LayerMetrics, MoeSummary, expert_role_rank
from spectra.analysis.summary import group_summary
from spectra.sources.roles import expert_slot


def moe_summary(layers: list[LayerMetrics]) -> MoeSummary | None:
    """The MoeSummary of an analysis' matrices, or None when none is a routed expert."""
    routed = [lm for lm in layers if lm.role == "expert"]
    if not routed:
        return None
    cells: dict[tuple[int | None, str | None], list[tuple[int, LayerMetrics]]] = defaultdict(list)
    for lm in routed:
        expert, role = expert_slot(lm.key)
        cells[(lm.layer, role)].append((-1 if expert is None else expert, lm))
    groups = []
    for (layer, role), members in sorted(
        cells.items(), key=lambda item: (_depth(item[0][0]), expert_role_rank(item[0][1]))
    ):
        members.sort(key=lambda m: m[0])
        groups.append(
            ExpertGroup(
                layer=layer,
                expert_role=role,
                experts=tuple(e for e, _ in members),
                keys=tuple(lm.key for _, lm in members),
                alphas=tuple(lm.alpha for _, lm in members),
                summary=group_summary(lm for _, lm in members),
            )
        )
    by_role: dict[str | None, list[LayerMetrics]] = defaultdict(list)
    by_layer: dict[int, list[LayerMetrics]] = defaultdict(list)
    experts: dict[int | None, set[int]] = defaultdict(set)
    for (layer, role), members in cells.items():
        by_role[role].extend(lm for _, lm in members)
        experts[layer].update(e for e, _ in members)
        if layer is not None:
            by_layer[layer].extend(lm for _, lm in members)
    return MoeSummary(
        num_experts={k: len(v) for k, v in sorted(experts.items(), key=lambda i: _depth(i[0]))},
        groups=tuple(groups),
        by_expert_role={
            str(r): group_summary(g)
            for r, g in sorted(by_role.items(), key=lambda i: expert_role_rank(i[0]))
        },
        by_layer={d: group_summary(g) for d, g in sorted(by_layer.items())},
        routers=tuple(lm.key for lm in layers if lm.role == "router"),
        shared=tuple(lm.key for lm in layers if lm.role == "shared_expert"),
    )


def _depth(layer: int | None) -> int:
    return -1 if layer is None else layer
