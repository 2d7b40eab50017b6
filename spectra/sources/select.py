"""Choosing matrices: include/exclude globs on tensor names, and roles."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from spectra.errors import ValidationError
from spectra.sources.roles import ROLES, MatrixRef


def check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """Validate role names; the error lists the known ones."""
    wanted = tuple(roles)
    unknown = [r for r in wanted if r not in ROLES]
    if unknown:
        raise ValidationError(
            f"unknown role(s) {', '.join(map(repr, unknown))}: choose from {', '.join(ROLES)}"
        )
    return wanted


def select(
    matrices: Iterable[MatrixRef],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    roles: Sequence[str] = (),
) -> list[MatrixRef]:
    """Keep matrices whose tensor name (or key) matches an `include` glob (all when empty), drop
    those matching an `exclude` glob, and keep only `roles` when given.

    Globs are case-sensitive `fnmatch` patterns (`*` also crosses dots). A role matches a matrix's
    `role` or its `expert_role`, so `roles=("down",)` keeps dense and expert down projections.
    """
    wanted = set(check_roles(roles))

    def hit(m: MatrixRef, patterns: Sequence[str]) -> bool:
        return any(fnmatchcase(m.tensor.name, p) or fnmatchcase(m.key, p) for p in patterns)

    out = []
    for m in matrices:
        if include and not hit(m, include):
            continue
        if exclude and hit(m, exclude):
            continue
        if wanted and m.role not in wanted and m.expert_role not in wanted:
            continue
        out.append(m)
    return out
