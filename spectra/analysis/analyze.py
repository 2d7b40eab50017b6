"""`analyze()`: HT-SR metrics of every weight matrix of a checkpoint, as an `Analysis`.

One streaming pass over the checkpoint, memory-bounded, plus one more only for the randomized
control:
1. spectra: `compute_spectra(mode="values")` (the engine batches equal shapes, uses the
   spectrum cache; default exact route: float64 Gram eigenvalues, which reproduces
   WeightWatcher's alphas, methods.md section 2), then the pure per-matrix metrics, and the MP
   edge when asked (no extra decomposition). The outlier ratio (on by default) is an engine
   `MatrixExtras`: computed from each matrix while the engine holds it, and cached with its
   spectrum under a key naming the multiplier (a pure function of the same bytes), so neither
   a cold nor a cached run reads the weights twice for it.
2. only with `randomize`: the engine decomposes the entry-shuffled matrices (`ShuffledView`:
   same batching and memory budget, no cache): one extra read and one extra exact spectrum
   per matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from spectra.analysis.htsr import failed_layer, layer_metrics
from spectra.analysis.mp import mp_fit as fit_mp
from spectra.analysis.outliers import DEFAULT_MULTIPLIER, outlier_ratio
from spectra.analysis.randomized import DEFAULT_SEED, ShuffledView, esd_distance
from spectra.analysis.results import Analysis, LayerMetrics, runtime_versions
from spectra.analysis.summary import summarize
from spectra.device import resolve_device
from spectra.errors import ValidationError
from spectra.linalg.cache import resolve_cache

Progress = Callable[..., Any]


@dataclass(frozen=True)
class AnalyzeOptions:
    """What `analyze()` computes; recorded in `Analysis.options`.

    mp_fit: MP bulk edge and spike count (cheap: no extra decomposition).
    randomize: shuffled-entries control (one extra exact spectrum per matrix).
    outliers: weight-magnitude outlier ratio (computed on the spectrum pass's reads, cached).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    device: str = "auto"
    mp_fit: bool = False
    randomize: bool = False
    outliers: bool = True
    outlier_multiplier: float = DEFAULT_MULTIPLIER
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "roles"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            else:
                object.__setattr__(self, name, tuple(value))
        if not self.outlier_multiplier > 0:
            raise ValidationError(
                f"outlier_multiplier must be > 0, got {self.outlier_multiplier!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("include", "exclude", "roles"):
            d[name] = list(d[name])
        return d


def analyze(
    source: Any = None,
    *,
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
    roles: tuple[str, ...] | list[str] = (),
    device: str = "auto",
    mp_fit: bool = False,
    randomize: bool = False,
    outliers: bool = True,
    outlier_multiplier: float = DEFAULT_MULTIPLIER,
    cache: Any = True,
    progress: Progress | None = None,
    seed: int = DEFAULT_SEED,
    max_memory: int | None = None,
) -> Analysis:
    """HT-SR analysis of the weight matrices of `source` (methods.md section 2).

    source: a `.safetensors` file, a sharded folder, a Hub repo id, an open `Checkpoint`, or
        None for the bundled all-MiniLM-L6-v2.
    include/exclude: name globs; roles: e.g. ("q", "k", "v", "o", "up", "down").
    device: "auto" | "cpu" | "cuda[:N]" | "mps" for the decompositions.
    mp_fit, randomize, outliers: optional metrics (see AnalyzeOptions for their cost).
    outlier_multiplier: M of the outlier ratio (share of |W_ij| > M * mean |W|; OwLore's 13).
    cache: True (default spectrum cache), False/None (no cache), or a SpectrumCache.
    progress: passed to the engine: progress(done, total, bytes_read) per matrix.
    seed: seed of the randomized control's shuffles.
    max_memory: working-memory budget in bytes for one engine batch (None: engine default).

    >>> an = analyze(roles=("q",))  # doctest: +SKIP
    >>> [round(lm.alpha, 2) for lm in an.layers][:2]  # doctest: +SKIP
    """
    from spectra.sources.checkpoint import Checkpoint

    options = AnalyzeOptions(
        include=include,
        exclude=exclude,
        roles=roles,
        device=str(device),
        mp_fit=mp_fit,
        randomize=randomize,
        outliers=outliers,
        outlier_multiplier=outlier_multiplier,
        seed=seed,
    )
    run = {"cache": cache, "progress": progress, "max_memory": max_memory}
    if isinstance(source, Checkpoint):
        return _analyze_checkpoint(source, options, **run)
    if source is None:
        from spectra.sources.bundled import bundled_model_path

        source = bundled_model_path()
    with Checkpoint.open(str(source)) as ckpt:
        return _analyze_checkpoint(ckpt, options, **run)


def _analyze_checkpoint(
    ckpt: Any,
    options: AnalyzeOptions,
    *,
    cache: Any,
    progress: Progress | None,
    max_memory: int | None,
) -> Analysis:
    from spectra.linalg.engine import compute_spectra

    matrices = ckpt.matrices(include=options.include, exclude=options.exclude, roles=options.roles)
    if not matrices:
        raise ValidationError(
            f"no weight matrices in {ckpt.source} match include={list(options.include)} "
            f"exclude={list(options.exclude)} roles={list(options.roles)}: "
            "loosen the filters (spectra inspect lists the matrices)"
        )
    dev = resolve_device(options.device)
    by_key = {ref.key: ref for ref in matrices}
    ratio_key = outlier_key(options.outlier_multiplier)
    base: dict[str, LayerMetrics] = {}
    esds: dict[str, np.ndarray] = {}
    # metrics as spectra arrive: the fits overlap the engine's background reads, and only the
    # eigenvalues (not the Spectrum objects) are kept
    for spec in compute_spectra(
        ckpt,
        matrices,
        mode="values",
        device=dev,
        cache=resolve_cache(cache),
        progress=progress,
        max_memory=max_memory,
        extras=_outlier_extras(options) if options.outliers else None,
    ):
        layer = _layer(by_key[spec.key], spec, options)
        if options.outliers:
            layer = replace(layer, outlier_ratio=spec.extras.get(ratio_key))
        base[spec.key] = layer
        if spec.ok:
            esds[spec.key] = spec.values.double().square().cpu().numpy()
    rand = _randomized(ckpt, matrices, esds, options, dev, max_memory)
    layers = [
        replace(base[ref.key], rand_distance=rand[ref.key]) if ref.key in rand else base[ref.key]
        for ref in matrices
    ]
    return Analysis(
        source=str(ckpt.source),
        layers=layers,
        summary=summarize(layers),
        options=options.to_dict(),
        esds=esds,
        versions=runtime_versions(),
    )


def _layer(ref: Any, spec: Any, options: AnalyzeOptions) -> LayerMetrics:
    """Metrics of one matrix from its Spectrum (weight-based extras are added later)."""
    meta = {
        "key": ref.key,
        "name": ref.tensor.name,
        "role": ref.role,
        "layer": ref.layer,
        "dtype": ref.tensor.dtype,
    }
    shape = tuple(ref.shape)
    if spec is None or not spec.ok:
        message = "no spectrum returned" if spec is None else (spec.message or "spectrum failed")
        method = "" if spec is None else spec.method
        return failed_layer(shape=shape, message=message, spectrum_method=method, **meta)
    S = spec.values.double().cpu().numpy()
    mp = fit_mp(S**2, shape) if options.mp_fit else None
    return layer_metrics(
        S,
        shape,
        spectrum_method=spec.method,
        mp=mp,
        **meta,
    )


def outlier_key(multiplier: float) -> str:
    """The `Spectrum.extras` (and cache metadata) key of the outlier ratio at `multiplier`."""
    return f"outlier_ratio@{float(multiplier)!r}"


def _outlier_extras(options: AnalyzeOptions) -> Any:
    """The engine hook that computes the outlier ratio of each matrix as it is read."""
    from spectra.linalg.engine import MatrixExtras

    key, multiplier = outlier_key(options.outlier_multiplier), options.outlier_multiplier

    def compute(ref: Any, W: torch.Tensor) -> dict[str, float | None]:
        return {key: outlier_ratio(W, multiplier=multiplier)}

    return MatrixExtras((key,), compute)


def _randomized(
    ckpt: Any,
    matrices: list[Any],
    esds: dict[str, np.ndarray],
    options: AnalyzeOptions,
    device: torch.device,
    max_memory: int | None,
) -> dict[str, float | None]:
    """`rand_distance` per matrix with a spectrum (empty unless `options.randomize`): the
    engine decomposes a ShuffledView of the checkpoint (same batching and memory budget as the
    real spectra, no cache)."""
    from spectra.linalg.engine import compute_spectra

    if not options.randomize:
        return {}
    out: dict[str, float | None] = {}
    view = ShuffledView(ckpt, seed=options.seed)
    targets = [ref for ref in matrices if ref.key in esds]
    for spec in compute_spectra(
        view, targets, mode="values", device=device, cache=None, max_memory=max_memory
    ):
        if spec.ok:
            shuffled = spec.values.double().square().cpu().numpy()
            out[spec.key] = esd_distance(esds[spec.key], shuffled)
    return out
