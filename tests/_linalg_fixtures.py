"""Helpers for the linalg tests: matrices with planted spectra and subspace comparisons."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _adapt_fixtures import torch_threads


def planted(m: int, n: int, S: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """`W (m, n) = U diag(S) V^T` in float64 with Haar-like random orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    r = S.numel()
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    return (U * S.double()) @ V.T


def decaying(r: int, power: float = 0.5) -> torch.Tensor:
    """S_i = i^-power, i = 1..r (methods.md's 4096x4096 benchmark spectrum uses 0.5)."""
    return torch.arange(1, r + 1, dtype=torch.float64) ** -power


def flat_top(r: int, top: int = 24, *, seed: int = 0) -> torch.Tensor:
    """A MiniLM-like spectrum: `top` values within ~5% of each other over a decaying bulk."""
    gen = torch.Generator().manual_seed(seed)
    head = 1.0 + 0.05 * torch.rand(top, generator=gen, dtype=torch.float64)
    bulk = 0.6 * torch.arange(1, r - top + 1, dtype=torch.float64) ** -0.3
    return torch.cat([head, bulk]).sort(descending=True).values


def worst_cosine(U: torch.Tensor, U_ref: torch.Tensor) -> float:
    """Cosine of the largest principal angle between span(U) and span(U_ref) (orthonormal)."""
    return float(torch.linalg.svdvals(U.double().mT @ U_ref.double()).min())


def rel_err(S: torch.Tensor, S_ref: torch.Tensor) -> float:
    """max_i |S_i - S_ref_i| / S_ref_i."""
    return float(((S.double() - S_ref.double()).abs() / S_ref.double()).max())


@pytest.fixture(autouse=False)
def one_thread() -> Iterator[None]:
    """Run a test with one torch thread, then restore. On a loaded 2-core machine LAPACK with
    2 OpenMP threads measured 10-40x slower than with 1 (threads spin against other jobs)."""
    with torch_threads(1):
        yield
