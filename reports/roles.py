"""Roles as the reports show them: a transformer block's reading order, one colour per role.

Shared by the plots, the HTML/Markdown tables and the terminal summary; no matplotlib here, so
rendering a page from cached plots never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence

# Roles in reading order (a transformer block top to bottom); unknown roles sort after, by name.
ROLE_ORDER = (
    "embedding",
    "q",
    "k",
    "v",
    "qkv",
    "o",
    "up",
    "gate",
    "gate_up",
    "down",
    "expert",
    "lm_head",
    "other",
    # MoE parts, appended (not placed by the expert) so every older role keeps its colour
    "router",
    "shared_expert",
)
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def ordered_roles(roles: Sequence[str] | set[str]) -> list[str]:
    """Distinct roles in ROLE_ORDER, unknown ones after it in alphabetical order."""
    known = [r for r in ROLE_ORDER if r in set(roles)]
    return known + sorted(set(roles) - set(ROLE_ORDER))


def role_color(role: str) -> str:
    """A stable colour per role (the same role has the same colour in every plot)."""
    if role in ROLE_ORDER:
        return _PALETTE[ROLE_ORDER.index(role) % len(_PALETTE)]
    return _PALETTE[sum(map(ord, role)) % len(_PALETTE)]
