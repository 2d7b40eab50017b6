"""`smooth(source, out)`: the smooth job. WeightWatcher 0.7.7's `SVDSmoothing` (keep each
matrix's top singular components) and `SVDSharpness` (drop them), written as a checkpoint
(docs/methods.md section 2e).

1. open SOURCE (a file, a folder, a Hub repo id; quantized and GGUF sources too) and select its
   matrices as `spectra report` does (include/exclude globs, roles); WeightWatcher's `min_evals`
   filter (8: a matrix with min(m, n) < 8 is left as it is) and the matrices the writer cannot
   replace (export/rewrite.py: expert-stack slices, integer/float8 storage) are listed as skipped;
2. stream the checkpoint shard by shard (export/rewrite.py); as each selected matrix comes up:
   read it in float64, one exact SVD, the count `k` (spectra.adapt.smooth: detX tail, power-law
   tail, MP spikes or a share for smoothing; the shuffled ESD's spikes for sharpening), keep or
   drop the top k, round to the stored dtype. One matrix in memory at a time;
3. written atomically (spectra.outdir) with ``smoothing.json`` (`Smoothing`: per matrix the
   count of components, kept and dropped, and the share of the squared Frobenius norm kept).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.adapt.smooth import (
    DEFAULT_PERCENT,
    SMOOTH_METHODS,
    drop_top,
    exact_svd64,
    keep_top,
    kept_components,
    sharpen_components,
)
from spectra.analysis.randomized import DEFAULT_SEED
from spectra.analysis.results import json_safe, runtime_versions
from spectra.device import resolve_device
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
REPORT_NAME = "smoothing.json"
MODES = ("smooth", "sharpen")
WW_MIN_EVALS = 8  # WeightWatcher's DEFAULT_MIN_EVALS: smaller matrices are not transformed


@dataclass(frozen=True)
class SmoothOptions:
    """Knobs of `smooth()` (validated).

    mode: "smooth" (keep the top k components: SVDSmoothing) or "sharpen" (drop the top k:
    SVDSharpness). method (smooth only): how k is chosen, WeightWatcher's names: "detx" (its
    default: the detX tail), "lambda_min" (the power-law tail), "rmt" (spikes past the MP bulk),
    "svd" (int(percent * min(m, n))). percent: the share of "svd", in (0, 1] (WeightWatcher's
    0.8). mp_method: the MP fit of "rmt" and "sharpen" ("quantile": spectra's; "ww":
    WeightWatcher's KDE fit). seed: the shuffle of "sharpen" (WeightWatcher's is unseeded).
    min_evals: matrices with min(m, n) below it are left as they are (WeightWatcher: 8).
    include/exclude/roles: which matrices, as in `spectra report`. device: where the SVDs run.
    hub: how a Hub repo id is opened (revision, disk_budget, local_only).
    """

    mode: str = "smooth"
    method: str = "detx"
    percent: float = DEFAULT_PERCENT
    mp_method: str = "quantile"
    seed: int = DEFAULT_SEED
    min_evals: int = WW_MIN_EVALS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    device: str = "auto"
    hub: HubOptions | None = None

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "roles"):
            object.__setattr__(self, name, str_tuple(getattr(self, name), name))
        check_fields(self)
        _one_of("mode", self.mode, MODES)
        _one_of("method", self.method, SMOOTH_METHODS)
        _one_of("mp_method", self.mp_method, tuple(MP_METHODS))
        if not 0.0 < self.percent <= 1.0:
            raise ValidationError(f"percent must be in (0, 1], got {self.percent!r}")
        if self.min_evals < 1:
            raise ValidationError(f"min_evals must be a positive integer, got {self.min_evals}")
        if self.seed < 0:
            raise ValidationError(f"seed must be a non-negative integer, got {self.seed}")
        resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "method": self.method if self.mode == "smooth" else "randomized spikes",
            "percent": self.percent,
            "mp_method": self.mp_method,
            "seed": self.seed,
            "min_evals": self.min_evals,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "roles": list(self.roles),
            "device": self.device,
        }


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValidationError(f"{name} must be one of {', '.join(allowed)}, got {clip(value)}")


@dataclass(frozen=True)
class SmoothedMatrix:
    """One transformed matrix: its `components` (min(m, n)), how many top ones were `kept`
    (smooth) or `dropped` (sharpen), and the share of `sum S^2` the written matrix holds
    (before rounding to the stored dtype). changed False: k was 0, the matrix is as it was."""

    key: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    components: int
    kept: int
    dropped: int
    energy_kept: float
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "role": self.role,
            "layer": self.layer,
            "shape": list(self.shape),
            "components": self.components,
            "kept": self.kept,
            "dropped": self.dropped,
            "energy_kept": self.energy_kept,
            "changed": self.changed,
        }


@dataclass(frozen=True)
class Smoothing:
    """What `smooth()` returns and writes as smoothing.json."""

    source: str
    out: Path
    options: SmoothOptions
    matrices: tuple[SmoothedMatrix, ...]
    skipped: tuple[tuple[str, str], ...]  # (key, why)
    dequantized: bool
    commit: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> tuple[SmoothedMatrix, ...]:
        return tuple(m for m in self.matrices if m.changed)

    def to_dict(self) -> dict[str, Any]:
        name = "SVDSmoothing" if self.options.mode == "smooth" else "SVDSharpness"
        return json_safe(
            {
                "kind": "smooth",
                "method": f"WeightWatcher 0.7.7 {name}, exact float64 SVD",
                "source": self.source,
                "commit": self.commit,
                "options": self.options.to_dict(),
                "versions": dict(self.versions),
                "dequantized": self.dequantized,
                "matrices_changed": len(self.changed),
                "matrices": [m.to_dict() for m in self.matrices],
                "skipped": [{"key": k, "why": why} for k, why in self.skipped],
            }
        )

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def smooth(
    source: str | Path,
    out: str | Path,
    options: SmoothOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
) -> Smoothing:
    """Write `source` to `out` (atomically; an existing folder is refused without `force`) with
    every selected matrix smoothed (top k components kept) or sharpened (top k dropped).

    >>> res = smooth("model/", "smoothed/", SmoothOptions(method="detx"))  # doctest: +SKIP
    >>> [(m.key, m.kept, m.components) for m in res.changed][:1]          # doctest: +SKIP
    [('encoder.layer.0.attention.self.query.weight', 228, 384)]
    """
    check_source(source, "source")
    check_source(out, "out")
    check_instance(options, SmoothOptions, "options")
    check_value(progress, Progress | None, "progress")
    opts = SmoothOptions() if options is None else options
    final = Path(out).expanduser().absolute()
    check_output_dir(final, force=force, protect=(source,))
    apply_threads(threads)
    device = resolve_device(opts.device)
    hub = opts.hub or HubOptions()
    with Checkpoint.open(
        source, revision=hub.revision, local_only=hub.local_only, disk_budget=hub.disk_budget
    ) as ckpt:
        todo, skipped = select_matrices(
            ckpt, opts.include, opts.exclude, opts.roles, min_evals=opts.min_evals
        )
        rows: list[SmoothedMatrix] = []

        def replace(name: str) -> torch.Tensor | None:
            ref = todo.get(name)
            if ref is None:
                return None
            W = ckpt.read(ref, dtype=_work_dtype(device), device=str(device))
            row, new = _transform(opts, ref, W)
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(todo), ref.key)
            return None if new is None else stored_value(ref, new)

        folder_source = not Path(str(source)).expanduser().is_file()
        with atomic_output_dir(final, force=force, protect=(source,)) as tmp:
            dequantized = write_rewritten(ckpt, tmp, replace, folder_source=folder_source)
            result = Smoothing(
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


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _transform(
    opts: SmoothOptions, ref: MatrixRef, W: torch.Tensor
) -> tuple[SmoothedMatrix, torch.Tensor | None]:
    """One matrix: its row and the new matrix (None: k = 0, left as it is)."""
    svd = exact_svd64(W)
    S = svd[1]
    fit = MP_METHODS[opts.mp_method]
    big_m = int(S.numel())
    if opts.mode == "smooth":
        s_np = S.double().cpu().numpy()
        k = kept_components(s_np, ref.shape, opts.method, percent=opts.percent, mp_fit=fit)
    else:
        k = sharpen_components(W, seed=opts.seed, mp_fit=fit)
    k = min(k, big_m)
    energy = S.double() ** 2
    total = float(energy.sum())
    kept_energy = float(energy[:k].sum()) if opts.mode == "smooth" else float(energy[k:].sum())
    changed = k > 0 and not (opts.mode == "smooth" and k == big_m)
    kept = big_m if not changed else k if opts.mode == "smooth" else big_m - k
    row = SmoothedMatrix(
        key=ref.key,
        role=ref.role,
        layer=ref.layer,
        shape=ref.shape,
        components=big_m,
        kept=kept,
        dropped=big_m - kept,
        energy_kept=kept_energy / total if total > 0 and changed else 1.0,
        changed=changed,
    )
    if not changed:
        return row, None
    new = keep_top(svd, k) if opts.mode == "smooth" else drop_top(svd, k)
    return row, new
