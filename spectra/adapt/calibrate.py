"""Calibration for one method: the statistics CorDA or EVA needs, fresh or reused, and EVA's ranks.

`calibration_for_method` is what the calibration step of `init_adapter` calls: it runs the
forward passes (spectra.adapt.calib_collect) or reuses saved statistics, keys everything by the
checkpoint's module paths (`rekey`, matching saved names by dotted suffix), and for EVA
redistributes the ranks (spectra.adapt.eva.eva_ranks).

The loading and forward-pass names (`load_model`, `run_calibration`, `calibrate`,
`CalibrationOptions`, ...) are re-exported here, where callers have always imported them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectra.adapt.calib_collect import (
    CalibrationOptions,
    ConvergenceRanks,
    _batches,
    _bound,
    _Collector,
    _eva_done,
    _forward,
    _result,
    calibrate,
    run_calibration,
)
from spectra.adapt.calib_model import (
    PICKLE_SUFFIXES,
    MissingExtraError,
    _refuse_pickle_only,
    load_model,
    require_transformers,
    resolve_modules,
)
from spectra.adapt.stats import CalibrationStats
from spectra.errors import ValidationError

__all__ = [
    "PICKLE_SUFFIXES",
    "CalibrationOptions",
    "ConvergenceRanks",
    "MethodCalibration",
    "MissingExtraError",
    "_Collector",
    "_align",
    "_batches",
    "_bound",
    "_eva_done",
    "_forward",
    "_refuse_pickle_only",
    "_result",
    "calibrate",
    "calibration_for_method",
    "load_model",
    "rekey",
    "require_transformers",
    "resolve_modules",
    "run_calibration",
]


@dataclass(frozen=True)
class MethodCalibration:
    """What `init_adapter` needs from calibration for one method.

    Everything is keyed by the checkpoint's module paths (weight name without ``.weight``, the
    paths PEFT and ``InitContext.module`` use), whatever the transformers model calls them.
    stats: module path -> the whole CalibrationStats (so a skipped module gets an error naming
    why); ranks: weight name -> rank after calibration: EVA's redistributed ranks, for CorDA the
    given ranks; 0 where calibration has no statistics for the module (no adapter there);
    calibration: the statistics themselves (to save with ``save_stats`` / for the manifest).
    """

    stats: dict[str, Any]
    ranks: dict[str, int]
    calibration: CalibrationStats


def calibration_for_method(
    source: str | Path,
    method: str,
    weight_names: Sequence[str],
    ranks: Mapping[str, int],
    *,
    texts: Sequence[str] | None = None,
    saved: CalibrationStats | None = None,
    options: CalibrationOptions | None = None,
    rho: float = 2.0,
    device: str | torch.device = "auto",
    max_ranks: Mapping[str, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MethodCalibration:
    """Collect (or reuse `saved`) the statistics `method` needs and, for EVA, redistribute ranks.

    method: ``corda-ipm``/``corda-kpm`` (covariance) or ``eva`` (activation SVD); ranks: weight
    name -> initial rank; options: samples/max_length/batch_size/tau/max_batches (what to collect
    is set here from the method); max_ranks: weight name -> cap of a redistributed rank
    (``min(out, in)``); progress: ``(batches_done, batches_total)`` after every forward batch.
    Saved statistics are matched to the weight names by module path, or by dotted suffix when
    they were keyed by the transformers model's names (``layers.0...`` for ``model.layers.0...``).
    """
    from spectra.adapt.eva import eva_ranks

    is_eva = method == "eva"
    if not is_eva and not method.startswith("corda"):
        raise ValidationError(f"method {method!r} does not use calibration statistics")
    paths = {w: w.removesuffix(".weight") for w in weight_names}
    if saved is None:
        stats = _fresh_statistics(
            source, is_eva, paths, ranks, texts, options, rho, device, progress
        )
    else:
        stats = _align(saved, list(paths.values()))
    by_path = {paths[w]: int(r) for w, r in ranks.items()}
    if is_eva:
        caps = None if max_ranks is None else {paths[w]: int(c) for w, c in max_ranks.items()}
        moved = eva_ranks(stats, by_path, rho, max_ranks=caps)
    else:
        moved = {p: (r if stats.leader(p) in stats.covariances else 0) for p, r in by_path.items()}
    if ranks and not any(moved.values()):
        raise ValidationError(_nothing_usable(stats, is_eva, saved is not None))
    new_ranks = {w: moved[paths[w]] for w in ranks}
    return MethodCalibration(dict.fromkeys(paths.values(), stats), new_ranks, stats)


def _nothing_usable(stats: CalibrationStats, is_eva: bool, reused: bool) -> str:
    what = "activation SVD (eva)" if is_eva else "input covariance (corda)"
    if reused:
        return (
            f"the saved statistics hold no {what} for these targets: they were computed for "
            "another method or other targets; drop --stats to recompute them"
        )
    reasons = sorted(set(stats.skipped.values()))
    return f"calibration produced no {what} for any target: {reasons[0] if reasons else 'none'}"


def _fresh_statistics(
    source: str | Path,
    is_eva: bool,
    paths: Mapping[str, str],
    ranks: Mapping[str, int],
    texts: Sequence[str] | None,
    options: CalibrationOptions | None,
    rho: float,
    device: str | torch.device,
    progress: Callable[[int, int], None] | None,
) -> CalibrationStats:
    """Forward passes for one method; the result is keyed by the checkpoint's module paths."""
    from dataclasses import replace

    from spectra.adapt.eva import components_per_layer, convergence_ranks

    if texts is None:
        raise ValidationError("calibration needs texts (or saved statistics via --stats)")
    base = options or CalibrationOptions(covariance=True)
    model, tokenizer = load_model(source, device)
    mapping = resolve_modules(model, list(paths))
    by_module = {mapping[w]: int(r) for w, r in ranks.items() if w in mapping}
    opts = replace(
        base,
        covariance=not is_eva,
        svd_components=components_per_layer(by_module, rho) if is_eva else None,
    )
    rule = convergence_ranks(by_module, None, rho) if is_eva else None
    stats = run_calibration(
        model, tokenizer, texts, list(by_module), opts, convergence_ranks=rule, progress=progress
    )
    del model
    missing = {
        paths[w]: "no module of that name in the transformers model"
        for w in paths
        if w not in mapping
    }
    return rekey(stats, {mapping[w]: paths[w] for w in mapping}, extra_skipped=missing)


def rekey(
    stats: CalibrationStats,
    names: Mapping[str, str],
    *,
    extra_skipped: Mapping[str, str] | None = None,
) -> CalibrationStats:
    """The same statistics with module names renamed by `names` (old -> new; others kept)."""

    def ren(name: str) -> str:
        return names.get(name, name)

    return CalibrationStats(
        covariances={ren(k): v for k, v in stats.covariances.items()},
        counts={ren(k): v for k, v in stats.counts.items()},
        svd={ren(k): v for k, v in stats.svd.items()},
        shared={ren(k): ren(v) for k, v in stats.shared.items()},
        skipped={**{ren(k): v for k, v in stats.skipped.items()}, **(extra_skipped or {})},
        info=dict(stats.info),
    )


def _align(saved: CalibrationStats, paths: Sequence[str]) -> CalibrationStats:
    """Rename saved statistics keyed by transformers names to the checkpoint's module paths."""
    known = set(saved.modules()) | set(saved.skipped)
    names: dict[str, str] = {}
    for path in paths:
        if path in known:
            continue
        hits = [k for k in known if path.endswith("." + k) or k.endswith("." + path)]
        if len(hits) == 1:
            names[hits[0]] = path
    return rekey(saved, names) if names else saved
