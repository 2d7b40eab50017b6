"""Failing loudly across ranks: which rank, which matrix, why; never a hang.

Protocol (one work phase):
1. Each rank runs its share inside `guarded()`, calling `tracker.step(key)` before each matrix.
   `step` records the matrix, and checks a failure counter in the rendezvous store (one TCP
   round trip), so when a peer has failed the rank stops at its next matrix (`Aborted`) instead
   of finishing hours of work nobody will use.
2. A rank whose work raises records a `RankStatus` (rank, host, matrix key, error type and
   message) and bumps the store's failure counter.
3. All ranks exchange statuses (`all_gather` over gloo, bounded by the group timeout) and, when
   any rank failed, every rank raises `DistributedError` with the failing ranks' messages; the
   CLI turns that into one line and a non-zero exit on every rank, so torchrun exits non-zero.
A rank that dies outright (OOM kill, SIGKILL) cannot report: gloo then fails the peers'
collective with a connection error and torchrun's agent stops the job with the dead rank's exit
code, so the job still exits non-zero.

Fault injection for tests: `SPECTRA_DIST_FAULT="RANK:N:MODE"` makes rank RANK fail when it
starts its (N+1)-th matrix; MODE `raise` raises a RuntimeError, `exit` calls `os._exit(17)`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from spectra.distributed.gather import all_gather
from spectra.distributed.runtime import Session
from spectra.errors import SpectraError, ValidationError

T = TypeVar("T")
FAULT_ENV = "SPECTRA_DIST_FAULT"
_FAILED_KEY = "spectra/failed_ranks/{tag}"


class DistributedError(SpectraError):
    """One or more ranks failed; the message names them, their matrices and their errors."""


class Aborted(Exception):  # noqa: N818 - a signal between ranks, not an error of this rank
    """Raised inside a rank's work when a peer has failed: stop now, report nothing new."""


@dataclass(frozen=True)
class RankStatus:
    """How one rank's work phase ended. state: 'ok' | 'failed' | 'aborted'."""

    rank: int
    host: str
    state: str = "ok"
    key: str | None = None
    error_type: str = ""
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def describe(self) -> str:
        """One line: 'rank 1 (host) failed on matrix 'k': ValueError: ...'."""
        where = f" on matrix {self.key!r}" if self.key else ""
        return f"rank {self.rank} ({self.host}) failed{where}: {self.error_type}: {self.message}"


@dataclass(frozen=True)
class Fault:
    """An injected failure (tests): rank `rank` fails before matrix number `after` + 1."""

    rank: int
    after: int
    mode: str

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Fault | None:
        raw = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
        if not raw:
            return None
        parts = raw.split(":")
        if len(parts) != 3 or parts[2] not in ("raise", "exit"):
            raise ValidationError(f"{FAULT_ENV}={raw!r}: expected RANK:N:raise or RANK:N:exit")
        try:
            return cls(int(parts[0]), int(parts[1]), parts[2])
        except ValueError:
            raise ValidationError(f"{FAULT_ENV}={raw!r}: RANK and N must be integers") from None


class FailureBoard:
    """A failure counter in the rendezvous store that every rank can read cheaply."""

    def __init__(self, store: Any = None, tag: int = 0) -> None:
        self._store = store
        self._key = _FAILED_KEY.format(tag=tag)

    def mark_failed(self) -> None:
        if self._store is not None:
            self._store.add(self._key, 1)

    def any_failed(self) -> bool:
        if self._store is None:
            return False
        return int(self._store.add(self._key, 0)) > 0  # add 0: read without blocking


class Tracker:
    """Knows which matrix this rank is on; the place where peers' failures are noticed."""

    def __init__(self, session: Session, board: FailureBoard, fault: Fault | None = None) -> None:
        self.session, self.board, self.fault = session, board, fault
        self.current: str | None = None
        self.started = 0

    def step(self, key: str) -> None:
        """Call before working on matrix `key`."""
        if self.board.any_failed():
            raise Aborted(key)
        self.current = key
        self.started += 1
        self._maybe_fault()

    def _maybe_fault(self) -> None:
        f = self.fault
        if f is None or f.rank != self.session.env.rank or self.started <= f.after:
            return
        if f.mode == "exit":
            os._exit(17)
        raise RuntimeError(f"injected failure ({FAULT_ENV}) at matrix {self.started}")


def guarded(
    session: Session, work: Callable[[Tracker], T], *, fault: Fault | None = None
) -> tuple[RankStatus, T | None]:
    """Run `work(tracker)`; return this rank's status and the result (None on failure)."""
    board = FailureBoard(session.store, session.tag)
    tracker = Tracker(session, board, fault if fault is not None else Fault.from_env())
    host = socket.gethostname()
    rank = session.env.rank
    try:
        return RankStatus(rank, host), work(tracker)
    except Aborted:
        return RankStatus(rank, host, "aborted", tracker.current), None
    except Exception as exc:  # noqa: BLE001 - any error of this rank must reach every rank
        board.mark_failed()
        status = RankStatus(
            rank, host, "failed", tracker.current, type(exc).__name__, _one_line(str(exc))
        )
        if not session.env.is_distributed:
            raise
        return status, None


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


RESUME_FROM_CACHE = (
    "Finished spectra are in the spectrum cache: fix the cause and rerun the same command to resume"
)
RERUN = "Nothing was written: fix the cause and rerun the same command"


def check_statuses(statuses: list[RankStatus], hint: str = RESUME_FROM_CACHE) -> None:
    """Raise DistributedError naming every failed rank (pure). `hint`: what the user does next
    (RESUME_FROM_CACHE where the work phase fills the spectrum cache, RERUN where it does not)."""
    failed = [s for s in statuses if s.failed]
    if failed:
        lines = "; ".join(s.describe() for s in failed)
        raise DistributedError(f"{len(failed)} of {len(statuses)} rank(s) failed: {lines}. {hint}")
    aborted = [s for s in statuses if s.state == "aborted"]
    if aborted:  # a peer saw a failure flag that no status explains (should not happen)
        raise DistributedError(
            f"rank(s) {[s.rank for s in aborted]} stopped because a peer flagged a failure, "
            f"but no rank reported one. {hint}"
        )


def settle(session: Session, status: RankStatus, hint: str = RESUME_FROM_CACHE) -> None:
    """Exchange statuses after the work phase; raise on every rank if any rank failed."""
    check_statuses(all_gather(session, status), hint)
