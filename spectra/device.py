"""Device selection: `auto` means cuda, then mps, then cpu."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from spectra.errors import SourceError, ValidationError

if TYPE_CHECKING:  # torch is imported where a device is resolved, so headers-only work
    import torch  # (`spectra inspect`) never pays for it


def host_memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def require_host_memory(nbytes: int, what: str, hint: str) -> None:
    """`SourceError` before allocating when `what` would hold `nbytes` in memory at once and that
    is more than half of this machine's physical memory: a header can claim any size (a sparse
    file holds a terabyte matrix in a few KB of disk), and the allocator would otherwise fail
    with a bare MemoryError or the kernel would kill the process."""
    total = host_memory_bytes()
    if total is None or nbytes <= total // 2:
        return
    raise SourceError(
        f"{what} needs {nbytes / 2**30:,.1f} GiB in memory at once, more than half of this "
        f"machine's {total / 2**30:,.1f} GiB: {hint}"
    )


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a concrete torch device. `auto`/None picks cuda, then mps, then cpu.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch

    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValidationError(
            f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError(f"device {device!r} requested but CUDA is not available here")
    return dev
