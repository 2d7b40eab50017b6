"""SVD slices -> LoRA factors, and the residual base: the one place every initializer goes through.

Conventions (docs/methods.md section 4): W is stored (out, in) = (m, n); a LoRA adapter
adds ``scale * B @ A`` with ``A (r, n)``, ``B (m, r)`` and the scale of PEFT's rule
(``spectra.formats.peft.lora_scale``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA). The
residual is always computed by subtraction, ``W_res = W - scale * B @ A``, so the adapted model
reproduces W up to the rounding of the storage dtype even when the decomposition was approximate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spectra.errors import ValidationError

# Float64 working set of one row block in `residual` and `reconstruction_error` (each holds a few
# temporaries of this size): 32 MiB keeps the products large enough for BLAS to run at speed.
ROW_BLOCK_BYTES = 32 << 20


def factorize(U: Tensor, S: Tensor, Vh: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Split ``U diag(S) Vh`` into LoRA factors with ``scale * B @ A == U diag(S) Vh``.

    Shapes: ``U (..., m, r)``, ``S (..., r)``, ``Vh (..., r, n)`` -> ``A (..., r, n)``,
    ``B (..., m, r)``; the singular values are shared evenly, ``A = diag(sqrt(S / s)) Vh``,
    ``B = U diag(sqrt(S / s))`` (PiSSA, Meng et al. 2024, arXiv 2404.02948, eq. 2-3).
    Works for any slice of the SVD (top-r for PiSSA, bottom-r for MiLoRA, CorDA's V').

    >>> U, S, Vh = torch.linalg.svd(torch.randn(6, 5, dtype=torch.float64), full_matrices=False)
    >>> A, B = factorize(U[:, :2], S[:2], Vh[:2], 0.5)
    >>> torch.allclose(0.5 * B @ A, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2])
    True
    """
    if scale <= 0 or not math.isfinite(scale):
        raise ValidationError(f"LoRA scale must be a positive number, got {scale}")
    r = S.shape[-1]
    if U.shape[-1] != r or Vh.shape[-2] != r:
        raise ValidationError(
            f"SVD slices disagree on the rank: U {tuple(U.shape)}, S {tuple(S.shape)}, "
            f"Vh {tuple(Vh.shape)}"
        )
    if bool((S < 0).any()):
        raise ValidationError("singular values must be non-negative")
    root = torch.sqrt(S / scale)  # (..., r)
    A = root.unsqueeze(-1) * Vh  # (..., r, n)
    B = U * root.unsqueeze(-2)  # (..., m, r)
    return A, B


def as_stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` rounded to the storage ``dtype`` and back to its own dtype (exact for float32)."""
    return t.to(dtype).to(t.dtype) if dtype != t.dtype else t


def row_blocks(shape: tuple[int, ...], *, block_bytes: int | None = None) -> list[slice]:
    """Row slices of an ``(m, n)`` matrix whose float64 copy stays within ``block_bytes``
    (default ROW_BLOCK_BYTES): one slice when the whole float64 copy fits.

    >>> row_blocks((11008, 4096))[:2]  # 7B up_proj: 1024 rows of float64 = 32 MiB
    [slice(0, 1024, None), slice(1024, 2048, None)]
    >>> row_blocks((1536, 384))
    [slice(0, 1536, None)]
    """
    m, n = int(shape[0]), int(shape[1])
    limit = ROW_BLOCK_BYTES if block_bytes is None else int(block_bytes)
    step = max(1, limit // max(1, 8 * n))
    return [slice(start, min(m, start + step)) for start in range(0, max(m, 1), step)]


def residual(W: Tensor, A: Tensor, B: Tensor, scale: float, *, dtype: torch.dtype) -> Tensor:
    """``W - scale * B @ A`` computed in float64 and cast to ``dtype`` (the storage dtype).

    ``W (m, n)``, ``A (r, n)``, ``B (m, r)`` -> ``(m, n)`` in ``dtype``. Computed in row blocks
    (`row_blocks`), so the float64 temporaries stay within a few ROW_BLOCK_BYTES whatever the
    matrix: the memory is W plus the output (a 7B ``up_proj`` as one float64 expression held
    three 344 MiB temporaries). Every entry is the same float64 expression as before.
    """
    work = torch.float64
    A64 = A.to(work)
    out = torch.empty(W.shape, dtype=dtype, device=W.device)
    for rows in row_blocks(tuple(W.shape)):
        out[rows] = (W[rows].to(work) - scale * (B[rows].to(work) @ A64)).to(dtype)
    return out


def reconstruction_error(
    W: Tensor, W_res: Tensor | None, A: Tensor, B: Tensor, scale: float
) -> float:
    """Relative Frobenius error ``||W - (W_res + scale B A)|| / ||W||`` in float64.

    ``W_res`` None means the base is unchanged (the adapter must then add nothing: EVA-style
    ``B = 0``), so the error is ``||scale B A|| / ||W||``. A zero matrix gives the absolute error.
    Row blocks as in `residual`; with several blocks the norms combine as ``sqrt(sum n_i^2)``.
    """
    A64 = A.to(torch.float64)
    errs, norms = [], []
    for rows in row_blocks(tuple(W.shape)):
        W64 = W[rows].to(torch.float64)
        norms.append(float(torch.linalg.matrix_norm(W64)))
        delta = scale * (B[rows].to(torch.float64) @ A64)
        # W64 - (base + delta), in place (the same float64 operations: + is commutative)
        delta += W64 if W_res is None else W_res[rows].to(torch.float64)
        errs.append(float(torch.linalg.matrix_norm(W64.sub_(delta))))
        del W64, delta
    norm, err = (x[0] if len(x) == 1 else math.sqrt(sum(v * v for v in x)) for x in (norms, errs))
    return err / norm if norm > 0 else err
