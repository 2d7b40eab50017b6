"""The torchrun environment: who am I, which device, which process groups, how many threads.

`torchrun` (torch.distributed.elastic) starts every worker with `RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` set. `detect_env()` reads them
(a plain `python -m spectra ...` has none and is a world of one). `distributed_session()` then
creates the process group (NCCL when the device is CUDA, gloo otherwise), plus a gloo group for
the Python objects spectra exchanges (results, failure reports), so object traffic never needs GPU
memory. The groups live until the process exits, so several sessions (a report, then a
comparison) share them.

Threads: BLAS/LAPACK results move in their last bits with the thread count (docs/architecture.md,
"Reproducibility contract"), and torchrun starts each worker with `OMP_NUM_THREADS=1` unless told
otherwise. `apply_threads(n)` sets an explicit per-process count (argument, or the
`SPECTRA_NUM_THREADS` environment variable) so a distributed run and a single-process run can be
made bit-comparable.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from spectra.device import resolve_device
from spectra.errors import ValidationError

THREADS_ENV = "SPECTRA_NUM_THREADS"
TIMEOUT_ENV = "SPECTRA_DIST_TIMEOUT"
# Collectives run only after each rank's work phase, and a failing rank tells the others to stop
# early (failures.py), so the timeout only bounds how long the fastest rank waits for the slowest
# one or for a peer that hangs without dying. One hour covers an unbalanced 400B run on few GPUs.
DEFAULT_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (a world of one outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 assembles results and writes every output."""
        return self.rank == 0

    @property
    def is_local_leader(self) -> bool:
        """Local rank 0 does once-per-node work (Hub downloads)."""
        return self.local_rank == 0


def _int_var(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(
            f"environment variable {name}={raw!r} is not an integer: it is set by torchrun; "
            "unset it to run in a single process"
        ) from None


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The DistEnv described by torchrun's variables (defaults: a world of one).

    >>> detect_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).is_writer
    False
    """
    env = os.environ if environ is None else environ
    world = _int_var(env, "WORLD_SIZE", 1)
    rank = _int_var(env, "RANK", 0)
    local_rank = _int_var(env, "LOCAL_RANK", rank if world > 1 else 0)
    local_world = _int_var(env, "LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise ValidationError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}; "
            "expected 0 <= RANK < WORLD_SIZE"
        )
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise ValidationError(
            f"inconsistent torchrun environment: LOCAL_RANK={local_rank}, "
            f"LOCAL_WORLD_SIZE={local_world}; expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE"
        )
    return DistEnv(rank, world, local_rank, local_world)


def is_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """True under torchrun with more than one process."""
    return detect_env(environ).is_distributed


def rank_device(env: DistEnv, requested: str | torch.device | None = "auto") -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` for "auto"/"cuda" when CUDA is there, else as asked.

    An explicit `cuda:N` is honoured as given (the user pinned it); "auto" without CUDA resolves
    like `resolve_device` (mps, then cpu).
    """
    text = "auto" if requested is None else str(requested)
    if text in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise ValidationError(
                f"LOCAL_RANK={env.local_rank} but this node has {count} CUDA device(s): start "
                f"torchrun with --nproc-per-node <= {count}"
            )
        return torch.device("cuda", env.local_rank)
    return resolve_device(text)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def resolve_threads(threads: int | None, environ: Mapping[str, str] | None = None) -> int | None:
    """The explicit thread count: `threads`, else $SPECTRA_NUM_THREADS, else None (leave as is)."""
    env = os.environ if environ is None else environ
    if threads is None:
        raw = env.get(THREADS_ENV, "").strip()
        if not raw:
            return None
        try:
            threads = int(raw)
        except ValueError:
            raise ValidationError(f"{THREADS_ENV}={raw!r} is not an integer") from None
    if isinstance(threads, bool) or threads < 1:
        raise ValidationError(f"thread count must be a positive integer, got {threads!r}")
    return int(threads)


def apply_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count when one is given (or in $SPECTRA_NUM_THREADS).

    Returns the count in effect. Same count in two runs -> bit-comparable LAPACK results.
    """
    n = resolve_threads(threads)
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def resolve_timeout(timeout_s: float | None = None) -> float:
    """Collective timeout in seconds: argument, else $SPECTRA_DIST_TIMEOUT, else one hour."""
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValidationError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not timeout_s > 0:
        raise ValidationError(f"distributed timeout must be > 0 seconds, got {timeout_s!r}")
    return float(timeout_s)


@dataclass(frozen=True)
class Session:
    """One rank's view of a running job.

    env: ranks; device: this rank's compute device; threads: intra-op threads in effect;
    objects: the gloo process group used for object collectives (None in a world of one);
    store: the rendezvous key-value store (None in a world of one), used for failure flags;
    tag: the number of this session in the process (every rank opens sessions in the same order,
    so the tag names the same work phase on all ranks and keeps store keys of phases apart).
    """

    env: DistEnv
    device: torch.device
    threads: int
    objects: Any = None
    store: Any = None
    tag: int = 0

    @property
    def is_writer(self) -> bool:
        return self.env.is_writer


_GROUPS: dict[str, Any] = {}  # the process-wide object group, created once
_COUNTER = [0]  # sessions opened in this process


@contextmanager
def distributed_session(
    *,
    device: str | torch.device | None = "auto",
    threads: int | None = None,
    timeout_s: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[Session]:
    """Join the torchrun job for the duration of the block (a no-op world of one outside it).

    The first session of a process creates the default group (NCCL on CUDA, gloo otherwise) with
    a timeout, and a gloo group for objects, and sets this rank's CUDA device; later sessions
    reuse them (destroying and re-creating a group on the same rendezvous store can hand a peer
    the stale address of the previous group). The groups are destroyed when the process exits.
    """
    env = detect_env(environ)
    n_threads = apply_threads(threads)
    dev = rank_device(env, device)
    if not env.is_distributed:
        yield Session(env, dev, n_threads)
        return
    import torch.distributed as dist

    timeout = timedelta(seconds=resolve_timeout(timeout_s))
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend_for(dev), timeout=timeout)
        atexit.register(_shutdown)
    if "objects" not in _GROUPS:
        _GROUPS["objects"] = _object_group(dist, timeout)
    _COUNTER[0] += 1
    yield Session(env, dev, n_threads, _GROUPS["objects"], _default_store(dist), _COUNTER[0])


def _shutdown() -> None:
    import torch.distributed as dist

    _GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def _object_group(dist: Any, timeout: timedelta) -> Any:
    """A gloo group over all ranks (the default group itself when it is gloo already)."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timeout)


def _default_store(dist: Any) -> Any:
    """The default group's key-value store (private torch API; None when unavailable)."""
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None:
        return None
    try:
        return getter()
    except (RuntimeError, ValueError):
        return None
