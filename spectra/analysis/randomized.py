"""Randomized control: the ESD of W with its entries shuffled, and its distance to W's ESD.

Shuffling keeps the entry distribution (and the Frobenius norm, so both ESDs have the same sum)
but destroys correlations; a layer whose ESD matches its shuffled twin has learned little
structure (Martin & Mahoney, arXiv 1810.01075). Cost: one extra exact spectrum per matrix.

Distance (WeightWatcher 0.7.x's `rand_distance`): the Jensen-Shannon distance, natural log,
`sqrt((KL(p || m) + KL(q || m)) / 2)` with `m = (p + q) / 2`, between `p = sort(lambda) / sum`
and `q = sort(lambda_rand) / sum`, compared entry by entry (rank i against rank i). It lies in
[0, sqrt(ln 2)]; 0 means identical spectra. WeightWatcher shuffles with the unseeded global numpy
generator, so its values are not reproducible; ours are seeded (torch.Generator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from spectra.errors import ValidationError

DEFAULT_SEED = 0


def shuffle_entries(W: torch.Tensor, *, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """W (m, n) with its entries permuted by a seeded uniform random permutation (same device).

    The permutation is drawn on the CPU so a seed gives the same shuffle on every device.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    perm = torch.randperm(W.numel(), generator=gen).to(W.device)
    return W.reshape(-1)[perm].reshape(W.shape)


def esd_distance(evals: np.ndarray, rand_evals: np.ndarray) -> float | None:
    """Jensen-Shannon distance between two ESDs of equal length, rank by rank (see module).

    Returns None when either spectrum sums to zero or is not finite.
    """
    p = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    q = np.sort(np.asarray(rand_evals, dtype=np.float64).ravel())
    if p.shape != q.shape:
        raise ValidationError(f"ESDs differ in length: {p.size} vs {q.size}")
    sp, sq = p.sum(), q.sum()
    if not (np.isfinite(sp) and np.isfinite(sq) and sp > 0 and sq > 0):
        return None
    p = np.clip(p / sp, 0.0, None)
    q = np.clip(q / sq, 0.0, None)
    m = (p + q) / 2.0
    div = (_kl(p, m) + _kl(q, m)) / 2.0
    return float(np.sqrt(max(div, 0.0)))


def _kl(p: np.ndarray, m: np.ndarray) -> float:
    """sum p ln(p / m) over p > 0 (m > 0 wherever p > 0)."""
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / m[mask])))


def randomized_control(
    W: torch.Tensor,
    evals: np.ndarray,
    spectrum: Callable[[torch.Tensor], np.ndarray],
    *,
    seed: int = DEFAULT_SEED,
) -> tuple[np.ndarray, float | None]:
    """ESD of shuffled W (m, n) and its distance to `evals` (W's own ESD, lambda = S^2).

    spectrum: maps a (m, n) tensor to its singular values (use the same exact route as for W,
    so the two ESDs are comparable). Returns (rand_evals descending, distance).
    """
    S_rand = np.asarray(spectrum(shuffle_entries(W, seed=seed)), dtype=np.float64)
    rand_evals = np.sort(S_rand**2)[::-1]
    return rand_evals, esd_distance(evals, rand_evals)


class ShuffledView:
    """A checkpoint whose matrices read back entry-shuffled (seeded), for the spectral engine.

    Lets `compute_spectra` batch, budget and place the shuffled matrices exactly as it does the
    real ones. `tap(ref, W)` (optional) sees each original matrix before it is shuffled, so a
    metric that needs W (the outlier ratio) rides on the same read. With a spectrum cache the
    engine keys its entries by this view's own `content_key` (`...:shuffled:<seed>`), never by
    the unshuffled bytes alone.
    """

    def __init__(
        self,
        ckpt: Any,
        *,
        seed: int = DEFAULT_SEED,
        tap: Callable[[Any, torch.Tensor], None] | None = None,
    ) -> None:
        self._ckpt = ckpt
        self._seed = seed
        self._tap = tap
        self.source = f"shuffled({getattr(ckpt, 'source', ckpt)}, seed={seed})"

    def matrices(self, *args: Any, **kwargs: Any) -> list[Any]:
        return self._ckpt.matrices(*args, **kwargs)

    def read_groups(self, refs: Any) -> list[list[int]]:
        groups = getattr(self._ckpt, "read_groups", None)
        return [list(range(len(refs)))] if groups is None else groups(refs)

    def content_key(self, ref: Any) -> str:
        return f"{self._ckpt.content_key(ref)}:shuffled:{self._seed}"

    def read_many(self, refs: Any, **kwargs: Any) -> Iterator[tuple[Any, torch.Tensor]]:
        for ref, W in self._ckpt.read_many(refs, **kwargs):
            if self._tap is not None:
                self._tap(ref, W)
            yield ref, shuffle_entries(W, seed=self._seed)
