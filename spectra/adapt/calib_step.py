"""The calibration step of `init_adapter`: statistics, EVA's ranks and alphas, the manifest record.

Data-driven initializers (CorDA, EVA; ``needs_calibration``) get their statistics here, between
the choice of the initial ranks and the plan:

1. statistics: reuse a file written earlier (``stats``, see spectra.adapt.stats.save_stats) or run
   forward passes over the calibration text (``calib``: a text or JSONL file; None: the built-in
   corpus) with spectra.adapt.calibrate; optionally save them (``stats_out``);
2. ranks: EVA redistributes the initial ranks (rho; arXiv 2410.07170), CorDA keeps them; either
   way a module calibration has no statistics for (skipped: its input is not
   ``(batch, tokens, features)``, or the transformers model has no such module) gets rank 0, so
   no adapter, and is named in the manifest (EVA's budget is then the sum of the initial ranks
   of the modules that have statistics); no statistics for any target is an error;
3. alphas: with ``adjust_scaling`` (EVA's ``adjust_scaling_factors``, on by default as in PEFT)
   ``alpha_l = alpha * r_l_new / r_l_old`` (rsLoRA: ``alpha * sqrt(r_l_new / r_l_old)``) so
   every module keeps the LoRA scale it had before redistribution; ``alpha`` None means
   ``alpha = r_l_old`` (the tool's default ``alpha = r``).
   Without it every module keeps ``alpha`` (or its old rank).

Nothing here reads weights: `init_adapter` hands over the selected matrices and initial ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from spectra.adapt.calib_collect import CalibrationOptions
from spectra.adapt.calibrate import calibration_for_method
from spectra.adapt.eva import DEFAULT_RHO, DEFAULT_TAU, adjusted_alphas
from spectra.adapt.stats import CalibrationStats, load_stats, save_stats
from spectra.errors import ValidationError

BUILTIN_CORPUS = "built-in corpus (spectra/adapt/data/default_corpus.txt)"


@dataclass(frozen=True)
class CalibrationRequest:
    """Where calibration data comes from and how it is used (CLI: ``spectra init --calib ...``).

    calib: text file (one sample per line) or JSONL file; None: the built-in corpus.
    text_field: the JSONL field with the text. samples / max_length / batch_size / max_batches /
    tau: see spectra.adapt.calibrate.CalibrationOptions (tau and max_batches: EVA only).
    rho: EVA's components per unit of rank (>= 1; 1 = no redistribution). adjust_scaling: EVA's
    ``adjust_scaling_factors`` (see module docstring). stats: reuse saved statistics instead of
    forward passes. stats_out: save the statistics there. progress: ``(done, total)`` batches.
    """

    calib: str | Path | None = None
    text_field: str = "text"
    samples: int | None = 128
    max_length: int = 128
    batch_size: int = 8
    max_batches: int | None = None
    tau: float = DEFAULT_TAU
    rho: float = DEFAULT_RHO
    adjust_scaling: bool = True
    stats: str | Path | None = None
    stats_out: str | Path | None = None
    progress: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.options()  # validates samples, max_length, batch_size, max_batches, tau
        if not self.rho >= 1.0:
            raise ValidationError(
                f"rho must be >= 1 (1 keeps the ranks as they are), got {self.rho}"
            )
        if self.stats is not None and self.calib is not None:
            raise ValidationError("give --calib (compute statistics) or --stats (reuse), not both")

    def options(self) -> CalibrationOptions:
        """Forward-pass options (what to collect is set per method by calibration_for_method)."""
        return CalibrationOptions(
            samples=self.samples,
            max_length=self.max_length,
            batch_size=self.batch_size,
            covariance=True,
            tau=self.tau,
            max_batches=self.max_batches,
        )


@dataclass(frozen=True)
class CalibrationOutcome:
    """stats: module path -> statistics for ``InitContext.stats``; ranks: weight key -> rank
    (0 = no adapter); alphas: weight key -> alpha, or None to keep the plan's rule; summary:
    JSON-safe record for the manifest."""

    stats: dict[str, Any]
    ranks: dict[str, int]
    alphas: dict[str, float] | None
    summary: dict[str, Any]


def run_calibration_step(
    source: str | Path,
    method: str,
    matrices: Sequence[Any],
    ranks: Mapping[str, int],
    request: CalibrationRequest,
    *,
    alpha: float | None,
    device: str | torch.device,
    rslora: bool = False,
) -> CalibrationOutcome:
    """Statistics, ranks and alphas for `method` on `matrices` (MatrixRef-like: key, shape) with
    initial `ranks` (weight key -> rank); `rslora`: the scale is alpha / sqrt(r) (EVA's
    adjusted alphas keep that scale). See the module docstring."""
    from spectra.adapt.calib_data import load_texts

    keys = [m.key for m in matrices]
    saved = None if request.stats is None else load_stats(request.stats)
    texts = None
    if saved is None:
        texts = load_texts(request.calib, samples=request.samples, text_field=request.text_field)
    result = calibration_for_method(
        source,
        method,
        keys,
        {k: int(ranks[k]) for k in keys},
        texts=texts,
        saved=saved,
        options=request.options(),
        rho=request.rho,
        device=device,
        max_ranks={m.key: min(int(d) for d in m.shape) for m in matrices},
        progress=request.progress,
    )
    calibration = result.calibration
    if saved is None:
        data = str(request.calib) if request.calib is not None else BUILTIN_CORPUS
        calibration = replace(calibration, info={**calibration.info, "data": data})
    if request.stats_out is not None:
        save_stats(request.stats_out, calibration)
    alphas = None
    if method == "eva" and request.adjust_scaling:
        base = {k: float(ranks[k]) if alpha is None else float(alpha) for k in result.ranks}
        old = {k: int(ranks[k]) for k in result.ranks}
        alphas = adjusted_alphas(base, old, result.ranks, rslora=rslora)
    elif method == "eva" and alpha is None:
        alphas = {k: float(ranks[k]) for k, new in result.ranks.items() if new > 0}
    summary = calibration_summary(calibration, request, dict(ranks), result.ranks, method)
    return CalibrationOutcome(result.stats, result.ranks, alphas, summary)


def calibration_summary(
    stats: CalibrationStats,
    request: CalibrationRequest,
    before: Mapping[str, int],
    after: Mapping[str, int],
    method: str,
) -> dict[str, Any]:
    """The manifest's ``calibration`` record: data, run facts, skipped modules, ranks, and (EVA)
    per-module convergence of the components each adapter uses."""
    info = dict(stats.info)
    record: dict[str, Any] = {
        "data": info.get("data"),
        "stats_file": None if request.stats is None else str(request.stats),
        "stats_out": None if request.stats_out is None else str(request.stats_out),
        "text_field": request.text_field,
        **{k: info.get(k) for k in ("samples", "tokens", "batches", "stop", "max_length")},
        "batch_size": info.get("batch_size"),
        "shared_inputs": dict(stats.shared),
        "skipped": dict(stats.skipped),
        "ranks_before": dict(before),
        "ranks_after": dict(after),
    }
    if method == "eva":
        record.update(
            tau=info.get("tau"),
            max_batches=info.get("max_batches"),
            rho=request.rho,
            adjust_scaling=request.adjust_scaling,
            convergence=_convergence(stats, after),
        )
    return record


def _convergence(stats: CalibrationStats, ranks: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, rank in ranks.items():
        path = key.removesuffix(".weight")
        if rank <= 0 or stats.leader(path) not in stats.svd:
            continue
        state = stats.svd_state(path)
        flags = state.converged[:rank]
        out[path] = {
            "rank": int(rank),
            "converged": bool(flags.all()),
            "converged_components": int(flags.sum()),
            "batches": int(state.batches),
        }
    return out
