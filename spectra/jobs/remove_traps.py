"""`remove_traps(source, out)`: the remove-traps job. WeightWatcher 0.8's `remove_traps`
written as a checkpoint (docs/methods.md section 2f): every correlation trap found (or the ones
chosen by index) replaced by matched noise.

1. open SOURCE (a file, a folder, a Hub repo id; quantized and GGUF sources too) and select its
   matrices as `spectra smooth` does (`export.rewrite.select_matrices`: include/exclude/roles,
   WeightWatcher's min_evals 8, matrices the writer cannot replace listed as skipped);
2. stream the checkpoint shard by shard (export/rewrite.py); as each selected matrix comes up:
   shuffle it (seeded), one float64 SVD of the shuffled matrix, MP fit of its ESD (`mp_method`),
   and each chosen trap mode `T` mapped back to W's positions is swapped for `R`, Gaussian noise
   with T's mean and std (spectra.adapt.untrap); rounded to the stored dtype. A matrix without a
   trap is copied byte for byte; one matrix in memory at a time;
3. written atomically (spectra.outdir) with ``traps.json`` (`TrapRemoval`: per matrix the traps
   found, the ones removed and where they sat, and the relative change).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra.adapt.untrap import remove_matrix_traps
from spectra.analysis.randomized import DEFAULT_SEED
from spectra.analysis.results import json_safe, runtime_versions
from spectra.distributed.runtime import apply_threads
from spectra.errors import ValidationError
from spectra.export.rewrite import select_matrices, stored_value, write_rewritten
from spectra.fields import check_fields, check_instance, check_value, str_tuple
from spectra.formats.files import check_source
from spectra.formats.safetensors import clip
from spectra.jobs.report import MP_METHODS
from spectra.outdir import atomic_output_dir, check_output_dir
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub_options import HubOptions
from spectra.sources.roles import MatrixRef

Progress = Callable[[int, int, str], None]  # (done, total, key of the matrix just written)
REPORT_NAME = "traps.json"
WW_MIN_EVALS = 8


@dataclass(frozen=True)
class RemoveTrapsOptions:
    """Knobs of `remove_traps()` (validated).

    traps: which traps of each matrix to remove, 1-based, largest first (WeightWatcher's
    `trap_indices`); () removes every trap found. mp_method: the MP fit of the shuffled ESD
    ("quantile": spectra's; "ww": WeightWatcher's KDE fit). seed: the shuffle (and seed + 1 the
    replacement noise, as WeightWatcher seeds them). min_evals, include/exclude/roles: which
    matrices, as in `smooth`. hub: how a Hub repo id is opened.
    """

    traps: tuple[int, ...] = ()
    mp_method: str = "quantile"
    seed: int = DEFAULT_SEED
    min_evals: int = WW_MIN_EVALS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    hub: HubOptions | None = None

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "roles"):
            object.__setattr__(self, name, str_tuple(getattr(self, name), name))
        if isinstance(self.traps, list):
            object.__setattr__(self, "traps", tuple(self.traps))
        check_fields(self)
        bad = [i for i in self.traps if i < 1]
        if bad:
            raise ValidationError(
                f"trap indices are 1-based (1 = the largest trap of a matrix), got {bad[0]}"
            )
        if self.mp_method not in MP_METHODS:
            raise ValidationError(
                f"mp_method must be one of {', '.join(MP_METHODS)}, got {clip(self.mp_method)}"
            )
        if self.min_evals < 1:
            raise ValidationError(f"min_evals must be a positive integer, got {self.min_evals}")
        if self.seed < 0:
            raise ValidationError(f"seed must be a non-negative integer, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "traps": list(self.traps) or "all",
            "mp_method": self.mp_method,
            "seed": self.seed,
            "min_evals": self.min_evals,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "roles": list(self.roles),
        }


@dataclass(frozen=True)
class UntrappedMatrix:
    """One examined matrix: the traps `found`, the indices `removed` (1-based, largest first),
    where each removed trap sat in W (row, col, the weight there before) and the relative change
    `||W' - W||_F / ||W||_F` (before rounding to the stored dtype; 0 when nothing was removed)."""

    key: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    found: int
    removed: tuple[int, ...]
    positions: tuple[tuple[int, int, float], ...]
    change: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "role": self.role,
            "layer": self.layer,
            "shape": list(self.shape),
            "traps_found": self.found,
            "traps_removed": list(self.removed),
            "positions": [{"row": r, "col": c, "weight": w} for r, c, w in self.positions],
            "change": self.change,
        }


@dataclass(frozen=True)
class TrapRemoval:
    """What `remove_traps()` returns and writes as traps.json."""

    source: str
    out: Path
    options: RemoveTrapsOptions
    matrices: tuple[UntrappedMatrix, ...]
    skipped: tuple[tuple[str, str], ...]  # (key, why)
    dequantized: bool
    commit: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> tuple[UntrappedMatrix, ...]:
        return tuple(m for m in self.matrices if m.removed)

    @property
    def removed(self) -> int:
        return sum(len(m.removed) for m in self.matrices)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "kind": "remove-traps",
                "method": "WeightWatcher 0.8 remove_traps: trap modes of the shuffled matrix "
                "replaced by matched Gaussian noise",
                "source": self.source,
                "commit": self.commit,
                "options": self.options.to_dict(),
                "versions": dict(self.versions),
                "dequantized": self.dequantized,
                "matrices_changed": len(self.changed),
                "traps_removed": self.removed,
                "matrices": [m.to_dict() for m in self.matrices],
                "skipped": [{"key": k, "why": why} for k, why in self.skipped],
            }
        )

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def remove_traps(
    source: str | Path,
    out: str | Path,
    options: RemoveTrapsOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
) -> TrapRemoval:
    """Write `source` to `out` (atomically; an existing folder is refused without `force`) with
    the correlation traps of every selected matrix replaced by matched noise.

    >>> res = remove_traps("model/", "untrapped/")                  # doctest: +SKIP
    >>> [(m.key, m.removed, m.positions) for m in res.changed]     # doctest: +SKIP
    [('encoder.layer.0.output.dense.weight', (1,), ((99, 856, 7.91...),))]
    """
    check_source(source, "source")
    check_source(out, "out")
    check_instance(options, RemoveTrapsOptions, "options")
    check_value(progress, Progress | None, "progress")
    opts = RemoveTrapsOptions() if options is None else options
    final = Path(out).expanduser().absolute()
    check_output_dir(final, force=force, protect=(source,))
    apply_threads(threads)
    hub = opts.hub or HubOptions()
    with Checkpoint.open(
        source, revision=hub.revision, local_only=hub.local_only, disk_budget=hub.disk_budget
    ) as ckpt:
        todo, skipped = select_matrices(
            ckpt, opts.include, opts.exclude, opts.roles, min_evals=opts.min_evals
        )
        rows: list[UntrappedMatrix] = []

        def replace(name: str) -> torch.Tensor | None:
            ref = todo.get(name)
            if ref is None:
                return None
            row, new = _untrap(opts, ref, ckpt.read(ref, dtype=torch.float64))
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(todo), ref.key)
            return None if new is None else stored_value(ref, new)

        folder_source = not Path(str(source)).expanduser().is_file()
        with atomic_output_dir(final, force=force, protect=(source,)) as tmp:
            dequantized = write_rewritten(ckpt, tmp, replace, folder_source=folder_source)
            result = TrapRemoval(
                source=str(source),
                out=final,
                options=opts,
                matrices=tuple(rows),
                skipped=tuple(skipped),
                dequantized=dequantized,
                commit=ckpt.commit,
                versions=runtime_versions(),
            )
            (tmp / REPORT_NAME).write_text(result.to_json() + "\n", encoding="utf-8")
    return result


def _untrap(
    opts: RemoveTrapsOptions, ref: MatrixRef, W: torch.Tensor
) -> tuple[UntrappedMatrix, torch.Tensor | None]:
    """One matrix: its row and the new matrix (None: no trap removed, left as it is)."""
    done = remove_matrix_traps(W, MP_METHODS[opts.mp_method], seed=opts.seed, which=opts.traps)
    A = W.numpy()
    change = 0.0
    if done.matrix is not None:
        norm = float(np.linalg.norm(A))
        change = float(np.linalg.norm(done.matrix - A)) / norm if norm > 0 else 0.0
    row = UntrappedMatrix(
        key=ref.key,
        role=ref.role,
        layer=ref.layer,
        shape=ref.shape,
        found=done.found,
        removed=done.removed,
        positions=tuple((r, c, float(A[r, c])) for r, c in done.positions),
        change=change,
    )
    return row, None if done.matrix is None else torch.from_numpy(done.matrix)
