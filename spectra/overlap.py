"""A worker stage one group behind its producer: `fn(item)` on one worker thread while the
producer's thread makes the next group of items, results taken in order.

The engine uses it for `compute_spectra(..., then=fn)`: the spectra of one batch are handed to
`fn` (the report's power-law fits) while the engine decomposes the next batch, and the results
of a batch are taken (waited for) before the batch after that is decomposed. So on a GPU the
device does not wait for the CPU's fits between batches, on a CPU the fits take another core
when there is one, and the producer is never more than one group ahead of its consumer.

Sequential semantics, kept exactly: `fn` runs on each item once, in order, on one thread (never
two calls at once); `take` gives results in the order of `add`, and an error of `fn` is raised
by `take` at that item's place, before any later result. Memory: the items of two groups.
`close()` cancels what is queued; an `fn` call already running finishes on its thread and its
result is dropped.

>>> lag = Lagged(lambda x: x * x, name="doc")
>>> for x in range(3): lag.add(x, tag=x)
>>> lag.end_group(); lag.add(3, tag=3); lag.end_group()
>>> [r for _, r in lag.take(keep=1)], [r for _, r in lag.take(keep=0)]
([0, 1, 4], [9])
>>> lag.close()
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Lagged(Generic[T, R]):
    """`fn` on a worker thread; results taken a group at a time (module docstring).

    add(item, tag): queue `fn(item)` in the current group; `tag` comes back with its result.
    end_group(): the current group is complete (a no-op when it is empty).
    take(keep): yield `(tag, fn(item))` in order for every completed group but the last
        `keep` ones, waiting for them; `fn`'s error is raised at its item.
    close(): cancel what is queued and let the worker thread end.
    """

    def __init__(self, fn: Callable[[T], R], *, name: str = "spectra-worker") -> None:
        self._fn = fn
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._groups: deque[list[tuple[object, Future[R]]]] = deque()
        self._open: list[tuple[object, Future[R]]] = []

    def add(self, item: T, tag: object = None) -> None:
        self._open.append((tag, self._pool.submit(self._fn, item)))

    def end_group(self) -> None:
        if self._open:
            self._groups.append(self._open)
            self._open = []

    def take(self, keep: int) -> Iterator[tuple[object, R]]:
        while len(self._groups) > keep:
            group = self._groups[0]
            while group:
                tag, future = group[0]
                result = future.result()  # raises fn's error here, in order
                group.pop(0)
                yield tag, result
            self._groups.popleft()

    def pending(self) -> int:
        """Items added and not yet taken."""
        return len(self._open) + sum(len(g) for g in self._groups)

    def close(self) -> None:
        for group in (*self._groups, self._open):
            for _, future in group:
                future.cancel()
        self._groups.clear()
        self._open = []
        self._pool.shutdown(wait=False, cancel_futures=True)
