"""Move per-matrix result objects between ranks (over the gloo object group).

Results travel as `(global_index, result)` pairs, where `global_index` is the matrix's position
in the single-process order; rank 0 puts them back in that order and checks that every index
arrived exactly once. Results are any picklable objects (dataclasses, dicts, numpy arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from spectra.distributed.runtime import Session
from spectra.errors import SpectraError

T = TypeVar("T")


class GatherError(SpectraError):
    """Gathered results do not cover the work exactly once (a partition bug, never user input)."""


def all_gather(session: Session, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in a world of one)."""
    if not session.env.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * session.env.world_size
    dist.all_gather_object(out, obj, group=session.objects)
    return out


def gather_to_writer(session: Session, obj: Any) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0; None on the other ranks."""
    if not session.env.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * session.env.world_size if session.is_writer else None
    dist.gather_object(obj, out, dst=0, group=session.objects)
    return out


def merge_indexed(parts: Sequence[Sequence[tuple[int, T]]], total: int) -> list[T]:
    """Concatenate per-rank `(index, result)` lists into the result list of length `total`
    ordered by index (pure). Raises GatherError on a missing or duplicated index.

    >>> merge_indexed([[(1, "b")], [(0, "a"), (2, "c")]], 3)
    ['a', 'b', 'c']
    """
    slots: list[Any] = [None] * total
    seen = [False] * total
    for part in parts:
        for index, result in part:
            if not 0 <= index < total:
                raise GatherError(f"result index {index} out of range [0, {total})")
            if seen[index]:
                raise GatherError(f"result index {index} arrived twice")
            seen[index] = True
            slots[index] = result
    missing = [i for i, ok in enumerate(seen) if not ok]
    if missing:
        raise GatherError(
            f"{len(missing)} result(s) missing after the gather, e.g. index {missing[0]}"
        )
    return slots


def gather_results(session: Session, mine: Sequence[tuple[int, T]], total: int) -> list[T] | None:
    """All ranks' `(index, result)` pairs merged in single-process order on rank 0; None
    elsewhere. In a world of one, `mine` must already cover all `total` indices."""
    parts = gather_to_writer(session, list(mine))
    if parts is None:
        return None
    return merge_indexed(parts, total)
