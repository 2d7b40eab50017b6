"""Batch planning (equal shapes under a memory budget), a one-deep background prefetch, and the
gate that keeps the prefetched batch and the one computing under the budget together.

Pure helpers for the engine: no torch compute, no checkpoint knowledge.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from spectra.errors import ValidationError

T = TypeVar("T")

# Default budgets: the engine sizes a batch so its working memory stays under this.
CPU_BUDGET = 1 << 30  # 1 GiB
GPU_FREE_FRACTION = 0.5  # of the device memory free when the run starts


@dataclass(frozen=True)
class Batch:
    """Positions (into the caller's matrix list) of equal-shape matrices computed together."""

    indices: tuple[int, ...]
    shape: tuple[int, int]


def plan_batches(
    shapes: Sequence[tuple[int, int]],
    bytes_per_matrix: Callable[[tuple[int, int]], int],
    budget: int,
    *,
    skip: Iterable[int] = (),
) -> list[Batch]:
    """Group positions by shape (first appearance order), cut each group into batches whose
    estimated working memory fits `budget` (at least one matrix each), and order the batches
    by their first position, so results can be yielded in input order with little buffering.

    >>> plan_batches([(4, 4), (8, 4), (4, 4)], lambda s: 10, budget=100)
    [Batch(indices=(0, 2), shape=(4, 4)), Batch(indices=(1,), shape=(8, 4))]
    """
    skipped = set(skip)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        if i not in skipped:
            groups.setdefault(tuple(shape), []).append(i)
    batches = []
    for shape, members in groups.items():
        size = max(1, budget // max(1, bytes_per_matrix(shape)))
        for start in range(0, len(members), size):
            batches.append(Batch(tuple(members[start : start + size]), shape))
    return sorted(batches, key=lambda b: b.indices[0])


def check_max_memory(max_memory: int | float | None) -> None:
    """ValidationError unless `max_memory` is None or a positive number of bytes."""
    if max_memory is None:
        return
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)):
        raise ValidationError(f"max_memory must be a number of bytes, got {max_memory!r}")
    if max_memory <= 0:
        raise ValidationError(f"max_memory must be > 0 bytes, got {max_memory}")


def memory_budget(device: torch.device, max_memory: int | float | None) -> int:
    """Bytes a batch may use: `max_memory`, else a share of free GPU memory, else 1 GiB."""
    if max_memory is not None:
        check_max_memory(max_memory)
        return int(max_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_FRACTION)
    return CPU_BUDGET


class MemoryGate:
    """Bytes in flight between a reader thread and the consumer, bounded by `capacity`.

    `acquire(n)` waits while other bytes are in flight and `n` more would exceed the capacity
    (an item alone is always admitted, so nothing deadlocks on an item larger than the
    capacity); `release(n)` returns them; `close()` wakes and admits every waiter (used when
    the consumer stops early).

    >>> gate = MemoryGate(10)
    >>> gate.acquire(8); gate.acquire(0); gate.release(8); gate.acquire(9)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.used = 0
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            while self.used > 0 and self.used + nbytes > self.capacity and not self._closed:
                self._cond.wait()
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used = max(0, self.used - nbytes)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterator[T], *, enabled: bool = True) -> Iterator[T]:
    """Yield `items`, producing the next one on a background thread while the caller works on
    the current one (queue depth 1). An exception in the producer is re-raised here; closing
    this generator stops the producer at its next item."""
    if not enabled:
        yield from items
        return
    q: queue.Queue[object] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(obj: object) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer, re-raised there
            offer(_Failure(exc))
            return
        offer(_DONE)

    thread = threading.Thread(target=work, name="spectra-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            obj = q.get()
            if obj is _DONE:
                return
            if isinstance(obj, _Failure):
                raise obj.exc
            yield obj  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)
