"""Correlation traps removed from one matrix (WeightWatcher 0.8's `remove_traps`, read on its
GitHub main; docs/methods.md section 2f). Pure: a matrix in, a matrix out.

The traps are those of `spectra.analysis.traps` (the modes of the entry-shuffled matrix past the
MP bulk, `trap_modes`). For each trap chosen (1-based, largest first; all by default), in order:

- `T` = its rank-1 mode `s u v^T` of the shuffled matrix mapped back to W's positions (for a
  single large weight, mostly that weight);
- `R` = a Gaussian matrix with T's mean and standard deviation: `R = mean(T) + std(T) G`, `G`
  standard normal draws (numpy `default_rng(seed + 1)`, one draw of W's shape per trap, shifted
  and scaled to mean 0, std 1 exactly);
- `W <- W - T + R`.

So the change is exactly `sum (R - T)`: the trap's weight is replaced by a draw of the size of
everything T spreads over the matrix, and every other weight moves by that mode's tiny share plus
noise of std(T). WeightWatcher also removes "bulk" modes (`bulk_indices`,
`num_random_bulk_vectors`) as a control experiment; that is not done here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spectra.analysis.mp import MPFit
from spectra.analysis.traps import trap_modes

MpFit = Callable[[np.ndarray, tuple[int, int]], MPFit | None]


@dataclass(frozen=True)
class Untrapped:
    """What `remove_traps` did to one matrix: the traps found, the 1-based indices removed
    (largest first), where each removed one sat in W (row, col: the entry of largest magnitude
    of its mode) and the new matrix (None: nothing removed)."""

    found: int
    removed: tuple[int, ...]
    positions: tuple[tuple[int, int], ...]
    matrix: np.ndarray | None


def _matched_noise(T: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`mean(T) + std(T) G` with G standard normal draws standardized to mean 0, std 1."""
    G = rng.standard_normal(T.shape)
    G = G - np.mean(G)
    spread = np.std(G)
    G = G / spread if spread > 0 else np.zeros_like(T)
    return np.mean(T) + np.std(T) * G


def remove_matrix_traps(
    W: torch.Tensor, mp_fit: MpFit, *, seed: int, which: tuple[int, ...] = ()
) -> Untrapped:
    """Remove the correlation traps `which` (1-based, largest first; () = all found) from
    `W (m, n)`, computed in float64; see the module docstring. An index past the number found
    is ignored (the result lists what was removed)."""
    modes = trap_modes(W, mp_fit, seed=seed)
    found = 0 if modes is None else int(modes.spikes.size)
    chosen = tuple(range(1, found + 1)) if not which else tuple(i for i in sorted(set(which)))
    chosen = tuple(i for i in chosen if 1 <= i <= found)
    if modes is None or not chosen:
        return Untrapped(found=found, removed=(), positions=(), matrix=None)
    A = W.detach().to(device="cpu", dtype=torch.float64).numpy()
    new = A.copy()
    rng = np.random.default_rng(seed + 1)
    positions = []
    for index in chosen:
        T = modes.component(int(modes.spikes[index - 1]))
        positions.append(divmod(int(np.argmax(np.abs(T))), A.shape[1]))
        new = new - T + _matched_noise(T, rng)
    return Untrapped(found=found, removed=chosen, positions=tuple(positions), matrix=new)
