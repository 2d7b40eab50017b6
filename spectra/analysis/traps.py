"""Correlation traps: single large weights (or small clusters) that survive a shuffle of the
matrix's entries and stand out of the shuffled ESD as spikes past the MP bulk (Martin & Mahoney,
arXiv 1810.01075; WeightWatcher 0.7's `rand_num_spikes` counts them, 0.8's `analyze_traps`
locates them; docs/methods.md section 2d).

A shuffle destroys every correlation but keeps every entry: a random matrix's ESD then fills an
MP bulk, and only an entry (or a few) far larger than the rest can still throw a spike. For one
matrix W (m, n):
1. shuffle its entries with the randomized control's seeded permutation (randomized.py);
2. full SVD of the shuffled matrix; fit the MP bulk to its ESD (mp.py or mp_kde.py); the traps
   are its spikes (eigenvalues above the edge plus the Tracy-Widom margin), largest first;
3. each trap's rank-1 component `s u v^T` of the shuffled matrix is mapped back through the
   inverse permutation; where it sits is the entry of largest magnitude of that map (row, col,
   the weight there, and the share of the component's squared mass it holds); `delta` is how
   far past the edge it is, `(lambda - lambda_+) / lambda_+` (0.8's trap_delta).
Cost: one full SVD with vectors of the shuffled matrix per analyzed matrix. `trap_modes` returns
that SVD and the spikes (what `spectra.adapt.untrap` removes); `find_traps` locates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from spectra.analysis.mp import MPFit
from spectra.analysis.randomized import DEFAULT_SEED

MAX_TRAPS = 16  # at most this many traps are located per matrix (the count is not capped)


@dataclass(frozen=True)
class Trap:
    """One correlation trap of a matrix: its rank among the shuffled spikes (1 = largest),
    eigenvalue and distance past the MP edge, and where it sits in W."""

    index: int
    eigenvalue: float
    delta: float
    row: int
    col: int
    weight: float
    share: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _permutation(numel: int, seed: int) -> np.ndarray:
    """The randomized control's permutation (randomized.shuffle_entries): flat index i of the
    shuffled matrix holds flat entry perm[i] of W."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(numel, generator=gen).numpy()


@dataclass(frozen=True)
class TrapModes:
    """The SVD of W with its entries shuffled, and which of its modes are traps.

    perm: flat index i of the shuffled matrix holds flat entry perm[i] of W; U (m, M), S (M,)
    descending, Vh (M, n): the shuffled matrix's SVD (float64); spikes: the indices into S of the
    modes past the MP edge plus the Tracy-Widom margin, largest first; fit: the MP fit."""

    perm: np.ndarray
    U: np.ndarray
    S: np.ndarray
    Vh: np.ndarray
    spikes: np.ndarray
    fit: MPFit

    def component(self, k: int) -> np.ndarray:
        """Mode `k` of the shuffled matrix, `S[k] u_k v_k^T`, mapped back through the inverse
        permutation to W's positions: (m, n)."""
        m, n = self.U.shape[0], self.Vh.shape[1]
        mode = self.S[k] * np.outer(self.U[:, k], self.Vh[k])
        back = np.empty(m * n, dtype=np.float64)
        back[self.perm] = mode.reshape(-1)  # undo the shuffle
        return back.reshape(m, n)


def trap_modes(
    W: torch.Tensor,
    mp_fit: Callable[[np.ndarray, tuple[int, int]], MPFit | None],
    *,
    seed: int = DEFAULT_SEED,
) -> TrapModes | None:
    """Steps 1-2 of the module docstring for W (m, n); None when the MP fit fails."""
    A = W.detach().to(device="cpu", dtype=torch.float64).numpy()
    m, n = A.shape
    perm = _permutation(A.size, seed)
    shuffled = A.reshape(-1)[perm].reshape(m, n)
    U, S, Vh = np.linalg.svd(shuffled, full_matrices=False)
    evals = S**2
    fit = mp_fit(evals, (m, n))
    if fit is None:
        return None
    scale = evals.size / float(evals.sum())
    cut = fit.bulk_max_rescaled
    if fit.tracy_widom:
        q, big_m = fit.Q, min(m, n)
        cut = cut + np.sqrt(q**-0.5 * cut ** (2.0 / 3.0) * big_m ** (-2.0 / 3.0))
    spikes = np.flatnonzero(evals * scale > cut)  # S descending: largest first
    return TrapModes(perm=perm, U=U, S=S, Vh=Vh, spikes=spikes, fit=fit)


def find_traps(
    W: torch.Tensor,
    mp_fit: Callable[[np.ndarray, tuple[int, int]], MPFit | None],
    *,
    seed: int = DEFAULT_SEED,
    max_traps: int = MAX_TRAPS,
) -> tuple[int, list[Trap]]:
    """(number of traps, the largest `max_traps` of them located) of W (m, n); see module."""
    modes = trap_modes(W, mp_fit, seed=seed)
    if modes is None:
        return 0, []
    A = W.detach().to(device="cpu", dtype=torch.float64).numpy()
    n = A.shape[1]
    traps = []
    for rank, k in enumerate(modes.spikes[:max_traps], start=1):
        back = modes.component(int(k))
        flat = int(np.argmax(np.abs(back)))
        r, c = divmod(flat, n)
        lam = float(modes.S[k] ** 2)
        traps.append(
            Trap(
                index=rank,
                eigenvalue=lam,
                delta=float((lam - modes.fit.bulk_max) / modes.fit.bulk_max),
                row=r,
                col=c,
                weight=float(A[r, c]),
                share=float(back[r, c] ** 2 / np.sum(back**2)),
            )
        )
    return int(modes.spikes.size), traps
