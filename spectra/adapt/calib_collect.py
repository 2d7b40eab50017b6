"""Calibration forward passes: hooks on target linear layers collect input statistics.

The model (loaded by spectra.adapt.calib_model) runs in eval mode under ``torch.no_grad`` and is
put back in the train/eval mode it was in; the texts are tokenized in padded batches.

What a forward hook sees for a target module is its input ``x (batch, tokens, features)``. The
attention mask of the batch selects the real tokens, ``x[mask] (n_tokens, features)``, so padded
positions never enter a statistic and any batch size gives the same covariance (up to float
rounding of the model's own forward). Inputs of another shape (the BERT pooler gets
``(batch, features)``) are skipped with a note in ``CalibrationStats.skipped``.

Shared inputs: modules called one after the other on the *same tensor object* (q, k and v on the
hidden states; gate and up on the MLP input) are detected on the first batch by identity with the
previous hooked input (the collector holds a reference to that tensor, so its memory cannot be
reused by another tensor in between and identity is reliable); the first is the leader, the others
share its statistics. Later batches check that the grouping holds.

Statistics (only those asked for): covariance ``X^T X`` + token count (CorDA) and the incremental
SVD of centred inputs with per-component convergence (EVA); see spectra.adapt.stats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.adapt.calib_model import load_model, resolve_modules
from spectra.adapt.stats import CalibrationStats, CovarianceAccumulator, IncrementalSVD
from spectra.errors import SpectraError, ValidationError

# Maps module -> explained-variance ratios (descending; members of a shared group get their
# leader's) to module -> number of leading components that must have converged (EVA's current
# rank of that module); a leader must converge up to the largest rank in its group.
ConvergenceRanks = Callable[[Mapping[str, torch.Tensor]], Mapping[str, int]]


@dataclass(frozen=True)
class CalibrationOptions:
    """Knobs of one calibration run.

    samples: texts used (first N); max_length: tokens per sample (truncation);
    batch_size: texts per forward (any value; padding is masked out);
    covariance: collect ``X^T X`` and counts (CorDA);
    svd_components: module -> components of the centred-input SVD to compute (EVA's
    ``round(rho * r)``); None or empty: no SVD;
    tau: EVA convergence threshold on |cos| of successive estimates (paper default 0.99);
    max_batches: cap on forward batches (None: all data). EVA stops earlier once every layer has
    converged; CorDA uses all batches up to the cap.
    """

    samples: int | None = 128
    max_length: int = 128
    batch_size: int = 8
    covariance: bool = False
    svd_components: Mapping[str, int] | None = field(default=None, hash=False)
    tau: float = 0.99
    max_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValidationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples is not None and self.samples < 1:
            raise ValidationError(f"samples must be >= 1, got {self.samples}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValidationError(f"max_batches must be >= 1, got {self.max_batches}")
        if not 0.0 < self.tau <= 1.0:
            raise ValidationError(f"tau must be in (0, 1], got {self.tau}")
        if not self.covariance and not self.svd_components:
            raise ValidationError("nothing to collect: ask for covariance and/or svd_components")


class _Collector:
    """Forward-hook state of one calibration run (see module docstring)."""

    def __init__(self, targets: Sequence[str], options: CalibrationOptions, device) -> None:
        self.targets = list(targets)
        self.options = options
        self.device = device
        self.mask: torch.Tensor | None = None
        self.first = True
        self.batch = 0
        self.last_input: torch.Tensor | None = None
        self.last_leader: str | None = None
        self.shared: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.cov: dict[str, CovarianceAccumulator] = {}
        self.svd: dict[str, IncrementalSVD] = {}
        self.frozen: set[str] = set()  # EVA leaders that converged: no more updates

    def hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if name in self.skipped:
            return
        x = args[0] if args else None
        reason = self._shape_problem(x)
        if reason is not None:
            self._skip(name, reason)
            return
        if self._is_member(name, x):
            return
        self.last_input, self.last_leader = x, name
        if name in self.frozen:
            return
        rows = x[self.mask]  # (n_tokens, features)
        self._accumulate(name, rows)

    def _shape_problem(self, x: Any) -> str | None:
        if not isinstance(x, torch.Tensor):
            return f"input is {type(x).__name__}, not a tensor"
        if x.ndim != 3 or self.mask is None or tuple(x.shape[:2]) != tuple(self.mask.shape):
            return f"input shape {tuple(x.shape)} is not (batch, tokens, features)"
        return None

    def _is_member(self, name: str, x: torch.Tensor) -> bool:
        same = self.last_input is not None and x is self.last_input
        if self.first:
            if same and self.last_leader is not None:
                self.shared[name] = self.last_leader
            return same
        if name in self.shared:
            if not same or self.last_leader != self.shared[name]:
                raise SpectraError(
                    f"{name} shared its input with {self.shared[name]} on the first batch but "
                    f"not on batch {self.batch}: this model's layer inputs vary between batches"
                )
            return True
        return False

    def _skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        self.cov.pop(name, None)
        self.svd.pop(name, None)
        for member, lead in list(self.shared.items()):
            if lead == name:
                self.skipped[member] = f"shares its input with {name}: {reason}"
                del self.shared[member]

    def _accumulate(self, name: str, rows: torch.Tensor) -> None:
        features = int(rows.shape[-1])
        if self.options.covariance:
            if name not in self.cov:
                self.cov[name] = CovarianceAccumulator(features, device=rows.device)
            self.cov[name].update(rows)
        if self.options.svd_components:
            if name not in self.svd:
                k = self._components(name, features)
                self.svd[name] = IncrementalSVD(
                    k, features, tau=self.options.tau, device=rows.device
                )
            self.svd[name].update(rows)

    def _components(self, name: str, features: int) -> int:
        wanted = self.options.svd_components or {}
        members = [name] + [m for m, lead in self.shared.items() if lead == name]
        k = max((int(wanted.get(m, 0)) for m in members), default=0)
        return max(1, min(k, features))


def run_calibration(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    targets: Sequence[str],
    options: CalibrationOptions,
    *,
    convergence_ranks: ConvergenceRanks | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationStats:
    """Run `texts` through `model` in batches and collect input statistics of `targets`.

    Args:
        targets: module names (``encoder.layer.0.attention.self.query``); see `resolve_modules`.
        convergence_ranks: EVA only; given leader -> explained-variance ratios, how many leading
            components of each leader must converge (default: all requested components).
        progress: called ``(batches_done, batches_total)`` after every batch.

    Returns:
        CalibrationStats with per-leader covariances/counts and/or SVD states, the shared-input
        map, skipped modules with reasons, and run info (samples, tokens, batches, stop reason).
    """
    texts = list(texts if options.samples is None else texts[: options.samples])
    if not texts:
        raise ValidationError("no calibration text: give a file with at least one sample")
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValidationError(f"target modules not in the model: {missing[:5]}")
    device = next(model.parameters()).device
    collector = _Collector(targets, options, device)
    batches = _batches(tokenizer, texts, options)
    if options.max_batches is not None:
        batches = batches[: options.max_batches]
    handles = [
        modules[t].register_forward_hook(_bound(collector, t)) for t in dict.fromkeys(targets)
    ]
    was_training = model.training
    stop = "data"
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(batches):
                _forward(model, collector, batch, device)
                collector.first = False
                collector.batch = index + 1
                if progress is not None:
                    progress(index + 1, len(batches))
                if options.svd_components and _eva_done(collector, convergence_ranks):
                    stop = "converged"
                    break
            else:
                stop = "cap" if options.max_batches is not None else "data"
    finally:
        for handle in handles:
            handle.remove()
        collector.last_input = None
        model.train(was_training)
    return _result(collector, targets, options, len(texts), stop)


def _bound(collector: _Collector, name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        collector.hook(name, module, args, output)

    return hook


def _batches(tokenizer: Any, texts: list[str], options: CalibrationOptions) -> list[dict]:
    if getattr(tokenizer, "pad_token", None) is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None and options.batch_size > 1:
            raise ValidationError(
                "the tokenizer has no pad or eos token, so batches cannot be padded: "
                "use --batch-size 1"
            )
        tokenizer.pad_token = eos
    out = []
    for start in range(0, len(texts), options.batch_size):
        chunk = texts[start : start + options.batch_size]
        enc = tokenizer(
            chunk,
            padding=True,
            truncation=True,
            max_length=options.max_length,
            return_tensors="pt",
        )
        out.append(dict(enc))
    return out


def _forward(model: nn.Module, collector: _Collector, batch: dict, device: torch.device) -> None:
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    collector.mask = mask.bool()
    try:
        model(**batch)
    finally:
        collector.last_input = None
        collector.last_leader = None


def _eva_done(collector: _Collector, convergence_ranks: ConvergenceRanks | None) -> bool:
    if not collector.svd:
        return False
    evr = {name: s.state().explained_variance_ratio() for name, s in collector.svd.items()}
    # Members of a shared group compete with their own copy of the leader's ratios; a leader
    # must converge up to the largest rank any of its members currently gets.
    evr.update({m: evr[lead] for m, lead in collector.shared.items() if lead in evr})
    needed: dict[str, int] = {}
    if convergence_ranks is not None:
        for name, rank in convergence_ranks(evr).items():
            lead = collector.shared.get(name, name)
            needed[lead] = max(needed.get(lead, 0), int(rank))
    collector.frozen.clear()
    for name, svd in collector.svd.items():
        if svd.converged(needed.get(name, svd.k)):
            collector.frozen.add(name)
    return len(collector.frozen) == len(collector.svd)


def _result(
    collector: _Collector,
    targets: Sequence[str],
    options: CalibrationOptions,
    samples: int,
    stop: str,
) -> CalibrationStats:
    seen = set(collector.cov) | set(collector.svd) | set(collector.shared) | set(collector.skipped)
    skipped = dict(collector.skipped)
    for name in targets:
        if name not in seen:
            skipped[name] = "never called during the forward pass"
    tokens = max((acc.count for acc in collector.cov.values()), default=0)
    tokens = max([tokens] + [s.count for s in collector.svd.values()])
    info = {
        "samples": samples,
        "max_length": options.max_length,
        "batch_size": options.batch_size,
        "batches": collector.batch,
        "tokens": int(tokens),
        "stop": stop,
        "tau": options.tau,
        "max_batches": options.max_batches,
    }
    return CalibrationStats(
        covariances={n: acc.covariance() for n, acc in collector.cov.items()},
        counts={n: acc.count for n, acc in collector.cov.items()},
        svd={n: s.state() for n, s in collector.svd.items()},
        shared=dict(collector.shared),
        skipped=skipped,
        info=info,
    )


def calibrate(
    source: str | Path,
    texts: Sequence[str],
    weight_names: Sequence[str],
    options: CalibrationOptions,
    *,
    device: str | torch.device = "auto",
    convergence_ranks: ConvergenceRanks | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[CalibrationStats, dict[str, str]]:
    """Load the model at `source`, calibrate the modules of `weight_names`, free the model.

    Returns the statistics (keyed by module name) and the map weight name -> module name. Weight
    names with no module in the model are reported in ``stats.skipped`` under the weight name.
    """
    model, tokenizer = load_model(source, device)
    mapping = resolve_modules(model, weight_names)
    stats = run_calibration(
        model,
        tokenizer,
        texts,
        list(dict.fromkeys(mapping.values())),
        options,
        convergence_ranks=convergence_ranks,
        progress=progress,
    )
    unmatched = {w: "no module of that name in the transformers model" for w in weight_names}
    for w in mapping:
        unmatched.pop(w)
    if unmatched:
        stats = CalibrationStats(
            stats.covariances,
            stats.counts,
            stats.svd,
            stats.shared,
            {**stats.skipped, **unmatched},
            stats.info,
        )
    del model
    return stats, mapping
