"""Calibration for one method: the statistics CorDA or EVA needs, fresh or reused, and EVA's ranks.

The calibration step of init (spectra.jobs.init) asks, in order:

1. `method_statistics`: forward passes over calibration texts (spectra.adapt.calib_collect) that
   collect what the method needs (input covariances for CorDA, the activation SVD for EVA), or
   `align_saved`: statistics saved earlier, matched to the checkpoint's module paths;
2. `method_ranks`: EVA redistributes the initial ranks (spectra.adapt.eva.eva_ranks), CorDA keeps
   them; a module without statistics gets rank 0 (no adapter there).

Everything is keyed by the checkpoint's module paths (weight name without ``.weight``, the paths
PEFT and ``InitContext.module`` use), whatever the transformers model calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from spectra.adapt.calib_collect import CalibrationOptions, run_calibration
from spectra.adapt.calib_model import load_model, resolve_modules
from spectra.adapt.eva import DEFAULT_RHO, components_per_layer, convergence_ranks, eva_ranks
from spectra.adapt.stats import CalibrationStats
from spectra.errors import ValidationError


def is_eva(method: str) -> bool:
    """True for ``eva`` (activation SVD), False for ``corda-*`` (covariance); any other method is
    a ValidationError: it uses no calibration statistics."""
    if method != "eva" and not method.startswith("corda"):
        raise ValidationError(f"method {method!r} does not use calibration statistics")
    return method == "eva"


def method_statistics(
    source: str | Path,
    method: str,
    ranks: Mapping[str, int],
    texts: Sequence[str] | None,
    options: CalibrationOptions | None = None,
    *,
    rho: float = DEFAULT_RHO,
    device: str | torch.device = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationStats:
    """Forward passes over ``texts`` collecting what ``method`` needs for the weights ``ranks``
    names (weight name -> initial rank), keyed by the checkpoint's module paths.

    options: samples/max_length/batch_size/tau/max_batches (what to collect is set here from the
    method: covariance for CorDA, ``round(rho * r)`` SVD components per module for EVA);
    progress: ``(batches_done, batches_total)`` after every forward batch. A weight with no
    module in the transformers model is named in ``skipped``.
    """
    eva = is_eva(method)
    if texts is None:
        raise ValidationError("calibration needs texts (or saved statistics via --stats)")
    paths = {w: w.removesuffix(".weight") for w in ranks}
    base = options or CalibrationOptions(covariance=True)
    model, tokenizer = load_model(source, device)
    mapping = resolve_modules(model, list(paths))
    by_module = {mapping[w]: int(r) for w, r in ranks.items() if w in mapping}
    opts = replace(
        base,
        covariance=not eva,
        svd_components=components_per_layer(by_module, rho) if eva else None,
    )
    rule = convergence_ranks(by_module, None, rho) if eva else None
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


def align_saved(saved: CalibrationStats, paths: Sequence[str]) -> CalibrationStats:
    """Saved statistics with names keyed by the transformers model renamed to the checkpoint's
    module ``paths``, matched by dotted suffix (``layers.0...`` for ``model.layers.0...``)."""
    known = set(saved.modules()) | set(saved.skipped)
    names: dict[str, str] = {}
    for path in paths:
        if path in known:
            continue
        hits = [k for k in known if path.endswith("." + k) or k.endswith("." + path)]
        if len(hits) == 1:
            names[hits[0]] = path
    return rekey(saved, names) if names else saved


def method_ranks(
    stats: CalibrationStats,
    method: str,
    ranks: Mapping[str, int],
    *,
    rho: float = DEFAULT_RHO,
    max_ranks: Mapping[str, int] | None = None,
    reused: bool = False,
) -> dict[str, int]:
    """Weight name -> rank after calibration: EVA's redistributed ranks (capped by
    ``max_ranks``, weight name -> ``min(out, in)``), for CorDA the given ranks; 0 where ``stats``
    has nothing for the module. ``reused``: the statistics were saved earlier (the error for
    statistics usable by no target then says to recompute them)."""
    eva = is_eva(method)
    paths = {w: w.removesuffix(".weight") for w in ranks}
    by_path = {paths[w]: int(r) for w, r in ranks.items()}
    if eva:
        caps = None if max_ranks is None else {paths[w]: int(c) for w, c in max_ranks.items()}
        moved = eva_ranks(stats, by_path, rho, max_ranks=caps)
    else:
        moved = {p: (r if stats.leader(p) in stats.covariances else 0) for p, r in by_path.items()}
    if ranks and not any(moved.values()):
        raise ValidationError(_nothing_usable(stats, eva, reused))
    return {w: moved[paths[w]] for w in ranks}


def _nothing_usable(stats: CalibrationStats, eva: bool, reused: bool) -> str:
    what = "activation SVD (eva)" if eva else "input covariance (corda)"
    if reused:
        return (
            f"the saved statistics hold no {what} for these targets: they were computed for "
            "another method or other targets; drop --stats to recompute them"
        )
    reasons = sorted(set(stats.skipped.values()))
    return f"calibration produced no {what} for any target: {reasons[0] if reasons else 'none'}"


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
