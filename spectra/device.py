"""Device selection: `auto` means cuda, then mps, then cpu."""

from __future__ import annotations

import torch

from spectra.errors import ValidationError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a concrete torch device. `auto`/None picks cuda, then mps, then cpu.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
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
