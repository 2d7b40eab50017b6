"""Argument checks shared by the decompositions: shapes, finiteness, dtypes.

Public functions in `rsvd` and `exact` call these before computing; each error echoes the bad
value and says what to pass instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spectra.errors import NumericalError, ValidationError

# Working precisions: inputs in lower precision (bf16, fp16, fp8) are upcast to float32.
WORK_DTYPES = (torch.float32, torch.float64)


def as_batch(W: torch.Tensor, *, what: str = "W") -> tuple[torch.Tensor, bool]:
    """`W` as a `(b, m, n)` batch and whether it was a single `(m, n)` matrix.

    Raises ValidationError for anything but a non-empty 2-D or 3-D floating tensor.
    """
    if not isinstance(W, torch.Tensor):
        raise ValidationError(f"{what} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim not in (2, 3):
        raise ValidationError(
            f"{what} must be (m, n) or (batch, m, n), got {W.ndim}-D shape {tuple(W.shape)}"
        )
    if not (W.is_floating_point()):
        raise ValidationError(f"{what} must be a floating tensor, got dtype {W.dtype}")
    if W.numel() == 0:
        raise ValidationError(f"{what} is empty: shape {tuple(W.shape)}")
    single = W.ndim == 2
    return (W.unsqueeze(0) if single else W), single


def work_dtype(W: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The precision to compute in: `dtype` if given, else W's own if float32/64, else float32."""
    if dtype is None:
        return W.dtype if W.dtype in WORK_DTYPES else torch.float32
    if dtype not in WORK_DTYPES:
        raise ValidationError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


# Entries tested for finiteness at once: `torch.isfinite` allocates |W| and two boolean masks
# the size of its input (300 MiB for a 7B up_proj in float32), a slice of 4M entries 16-32 MiB.
FINITE_CHUNK = 1 << 22


def all_finite(W: torch.Tensor) -> bool:
    """Whether every entry of `W` is finite, tested in row slices of about FINITE_CHUNK entries
    (no temporary the size of W; a matrix may be a strided view, e.g. transposed)."""
    rows = W if W.ndim == 2 else W.reshape(-1, 1)
    step = max(1, FINITE_CHUNK // max(1, rows.shape[1]))
    starts = range(0, rows.shape[0], step)
    return all(bool(torch.isfinite(rows[i : i + step]).all()) for i in starts)


def check_finite(W: torch.Tensor, names: Sequence[str] | None = None) -> None:
    """Raise NumericalError naming the first matrix of the batch `W (b, m, n)` with NaN/Inf.
    Tested in slices of FINITE_CHUNK entries per matrix, so the temporaries stay small."""
    flat = W.flatten(1)
    step = max(1, FINITE_CHUNK // max(1, flat.shape[0]))
    finite = torch.ones(flat.shape[0], dtype=torch.bool, device=W.device)
    for start in range(0, flat.shape[1], step):
        finite &= torch.isfinite(flat[:, start : start + step]).all(dim=1)
    if bool(finite.all()):
        return
    bad = int((~finite).nonzero()[0, 0])
    name = names[bad] if names is not None and bad < len(names) else f"batch index {bad}"
    count = int((~torch.isfinite(W[bad])).sum())
    raise NumericalError(
        f"matrix {name!r} has {count} NaN/Inf entries of {W[bad].numel()}; "
        "fix or exclude it (the engine reports it as failed and continues)"
    )


def check_names(names: Sequence[str] | None, batch: int) -> None:
    if names is not None and len(names) != batch:
        raise ValidationError(f"names has {len(names)} entries for a batch of {batch} matrices")


def check_int(value: object, what: str, *, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high], else ValidationError echoing it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValidationError(f"{what} must be {bound}, got {value}")
    return value
