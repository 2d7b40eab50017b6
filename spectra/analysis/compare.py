"""`compare(base, finetuned)`: intruder dimensions, update statistics, subspace drift and HT-SR
change for every matrix pair of a fine-tune against its base, plus model-level forensics.

Layers: `pairing.pair_matrices` (pure name pairing with `--map` renames), `pair.compare_pair`
(pure tensor function over one matrix pair), `compare` (IO: opens checkpoints or a PEFT LoRA
adapter, streams one pair at a time so memory is bounded by the largest pair). Definitions:
methods.md section 3, and the docstrings of spectra.analysis.intruders / drift / forensics.

Per pair the base gets one float64 Gram eigendecomposition (its full thin U is needed by the
intruder test; cached by compare_inputs.base_svd), the fine-tune one (all values for alpha, top-k
vectors only), and dW its Gram eigenvalues; a LoRA update dW = s B A is decomposed from its
factors (QR + r x r SVD), never formed. Inputs (adapter detection, the base cache):
compare_inputs.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.analysis.compare_inputs import ResidualBaseWarning, base_svd, open_adapter
from spectra.analysis.csvsafe import write_csv
from spectra.analysis.forensics import UNCHANGED_TOL, Forensics, summarize
from spectra.analysis.intruders import DEFAULT_EPSILONS, DEFAULT_K, validate_epsilons
from spectra.analysis.pair import LoraFactors, PairMeta, PairResult, compare_pair
from spectra.analysis.pairing import Pairing, _clip, map_key, pair_matrices, parse_map
from spectra.analysis.results import json_safe, runtime_versions
from spectra.device import resolve_device
from spectra.errors import ValidationError
from spectra.linalg.cache import SpectrumCache, resolve_cache
from spectra.sources.adapters import LoraAdapter
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.roles import MatrixRef

# Re-exported: callers (spectra.distributed, tests) import these from here.
__all__ = [
    "CompareOptions",
    "Comparison",
    "LoraFactors",
    "PairMeta",
    "PairResult",
    "Pairing",
    "ResidualBaseWarning",
    "base_svd",
    "compare",
    "compare_pair",
    "map_key",
    "pair_matrices",
    "parse_map",
]

Progress = Callable[[int, int, str], None]  # (done, total, key of the pair just finished)


@dataclass(frozen=True)
class CompareOptions:
    """Knobs of a comparison (validated).

    k: top singular vectors tested for intrusion (paper: 10); epsilons: thresholds (paper: 0.5);
    map: (regex, replacement) rules applied in order to fine-tuned keys to get base keys;
    allow_missing: proceed when keys are one-sided (they are listed in the result);
    unchanged_tol: relative Frobenius change at or below which a matrix did not move.
    """

    k: int = DEFAULT_K
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    map: tuple[tuple[str, str], ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    allow_missing: bool = False
    unchanged_tol: float = UNCHANGED_TOL
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValidationError(f"k must be a positive integer, got {self.k!r}")
        object.__setattr__(self, "epsilons", validate_epsilons(self.epsilons))
        object.__setattr__(self, "map", parse_map(self.map))
        if not self.unchanged_tol >= 0:
            raise ValidationError(f"unchanged_tol must be >= 0, got {self.unchanged_tol!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "epsilons": list(self.epsilons),
            "map": [f"{p}=>{r}" for p, r in self.map],
            "include": list(self.include),
            "exclude": list(self.exclude),
            "roles": list(self.roles),
            "allow_missing": self.allow_missing,
            "unchanged_tol": self.unchanged_tol,
            "device": self.device,
        }


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class Comparison:
    """What `compare()` returns: one PairResult per matrix pair plus model-level forensics.

    mode: 'checkpoint' (two full checkpoints) or 'lora' (a PEFT adapter on the base);
    pairing: how keys matched (one-sided keys are listed when allow_missing was set; in LoRA
    mode base matrices without an adapter are in `pairing.base_only`).
    """

    base: str
    finetuned: str
    mode: str
    options: CompareOptions
    pairs: tuple[PairResult, ...]
    pairing: Pairing
    forensics: Forensics
    versions: dict[str, str] = field(default_factory=dict)

    def pair(self, key: str) -> PairResult:
        """The result of base key `key` (ValidationError naming close keys when absent)."""
        for p in self.pairs:
            if p.key == key:
                return p
        close = [p.key for p in self.pairs if key in p.key][:5]
        raise ValidationError(f"no pair {key!r} in this comparison; similar keys: {close}")

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "base": self.base,
                "finetuned": self.finetuned,
                "mode": self.mode,
                "options": self.options.to_dict(),
                "versions": dict(self.versions),
                "pairing": self.pairing.to_dict(),
                "forensics": self.forensics.to_dict(),
                "pairs": [p.to_dict() for p in self.pairs],
            }
        )

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """Strict JSON text (no NaN tokens) of `to_dict()`; also written to `path` if given
        (same signature as `Analysis.to_json`)."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per pair (the CSV rows)."""
        return [_json_safe(p.row()) for p in self.pairs]

    def to_csv(self) -> str:
        """CSV text, one row per pair (columns of `rows()`), empty cells for None. Names are
        written inert (`csvsafe`: no control characters, no cell a spreadsheet runs as a
        formula); numbers stay numbers."""
        rows = self.rows()
        return write_csv(rows, list(rows[0])) if rows else ""

    def to_pandas(self) -> Any:
        """A pandas DataFrame of `rows()` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ValidationError("to_pandas() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.rows())


def _json_safe(value: Any) -> Any:
    return json_safe(value)


# --------------------------------------------------------------------------- IO layer


def compare(
    base: str | Path,
    finetuned: str | Path,
    *,
    k: int = DEFAULT_K,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    map: Sequence[str | tuple[str, str]] = (),  # noqa: A002 - the CLI's --map
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    roles: Sequence[str] = (),
    allow_missing: bool = False,
    unchanged_tol: float = UNCHANGED_TOL,
    device: str = "auto",
    cache: SpectrumCache | str | Path | bool | None = None,
    progress: Progress | None = None,
) -> Comparison:
    """Compare a fine-tuned checkpoint (or PEFT LoRA adapter folder) with its base.

    base, finetuned: anything `Checkpoint.open` accepts; `finetuned` may be a PEFT LoRA adapter
    folder (adapter_config.json + adapter_model.safetensors): then only adapted matrices are
    compared and dW = scale * B @ A comes from the factors.
    Raises ValidationError listing shape mismatches and one-sided keys unless `allow_missing`.
    cache: reuse the base's float64 left singular vectors and values (full thin U and S) across
    comparisons: a SpectrumCache, a folder, True (the default cache folder) or None/False
    (default: no cache; an entry holds U in float64, about twice the base matrix's float32 size;
    6.6 GB for a 1B base). A second adapter of a cached base compares 1.8x faster.
    progress: called as progress(done, total, key) after each pair.

    >>> cmp = compare("base/", "finetuned/", epsilons=(0.5, 0.9))     # doctest: +SKIP
    >>> cmp.forensics.update_kind, cmp.forensics.intruders_total        # doctest: +SKIP
    ('low-rank', {'0.5': 12, '0.9': 40})
    """
    opts = CompareOptions(
        k=k,
        epsilons=tuple(epsilons),
        map=tuple(map),
        include=tuple(include),
        exclude=tuple(exclude),
        roles=tuple(roles),
        allow_missing=allow_missing,
        unchanged_tol=unchanged_tol,
        device=device,
    )
    dev = resolve_device(device)
    run = _Run(opts, dev, resolve_cache(cache), progress)
    adapter = open_adapter(finetuned)
    with Checkpoint.open(base) as base_ckpt:
        if adapter is not None:
            mode = "lora"
            with adapter:
                pairing, results = _run(base_ckpt, adapter, run)
        else:
            mode = "checkpoint"
            with Checkpoint.open(finetuned) as ft_ckpt:
                pairing, results = _run(base_ckpt, ft_ckpt, run)
    return assemble(base, finetuned, mode, opts, pairing, results)


def assemble(
    base: str | Path,
    finetuned: str | Path,
    mode: str,
    opts: CompareOptions,
    pairing: Pairing,
    results: Sequence[PairResult],
) -> Comparison:
    """The Comparison of `results` (in pairing order): forensics computed over all of them. Shared
    by compare() and rank 0 of its torchrun split."""
    return Comparison(
        base=str(base),
        finetuned=str(finetuned),
        mode=mode,
        options=opts,
        pairs=tuple(results),
        pairing=pairing,
        forensics=summarize(results, opts.epsilons, unchanged_tol=opts.unchanged_tol),
        versions=runtime_versions(),
    )


def _check_pairing(pairing: Pairing, opts: CompareOptions, base: str, ft: str) -> None:
    problems = pairing.problems()
    if pairing.mismatched or (problems and not opts.allow_missing):
        raise ValidationError(
            f"{base} and {ft} do not pair up: {problems}. Rename keys with --map "
            "'regex=>replacement', narrow with --include/--exclude/--roles"
            + ("" if pairing.mismatched else ", or pass --allow-missing to compare the rest")
        )
    if not pairing.pairs:
        raise ValidationError(f"no matrix of {ft} pairs with one of {base}: nothing to compare")


def _select(ckpt: Checkpoint, opts: CompareOptions) -> dict[str, MatrixRef]:
    refs = ckpt.matrices(include=opts.include, exclude=opts.exclude, roles=opts.roles)
    return {m.key: m for m in refs}


def _compute_dtype(dev: torch.device) -> torch.dtype:
    return torch.float32 if dev.type == "mps" else torch.float64


@dataclass(frozen=True)
class _Run:
    """What every pair of one compare() call shares."""

    opts: CompareOptions
    dev: torch.device
    cache: SpectrumCache | None
    progress: Progress | None

    def tick(self, done: int, total: int, key: str) -> None:
        if self.progress is not None:
            self.progress(done, total, key)


def plan_pairs(
    base: Checkpoint, finetuned: Checkpoint | LoraAdapter, opts: CompareOptions
) -> tuple[Pairing, dict[str, MatrixRef]]:
    """The pairs compare() computes and the selected base matrices by key, with its checks and
    errors. Shared by compare() and its torchrun split, so both pair and fail identically."""
    b_refs = _select(base, opts)
    if isinstance(finetuned, LoraAdapter):
        return pair_lora(b_refs, finetuned, opts.map, str(base.source)), b_refs
    f_refs = _select(finetuned, opts)
    pairing = pair_matrices(
        {k: m.shape for k, m in b_refs.items()}, {k: m.shape for k, m in f_refs.items()}, opts.map
    )
    _check_pairing(pairing, opts, base.source, finetuned.source)
    return pairing, b_refs


def compare_one(
    base: Checkpoint,
    ref: MatrixRef,
    finetuned: Checkpoint | LoraAdapter,
    ft_key: str,
    opts: CompareOptions,
    dev: torch.device,
    cache: SpectrumCache | None,
) -> PairResult:
    """Read one pair (the fine-tuned matrix, or the adapter's factors for `ft_key`) and compare
    it; the base's U comes from the cache when there is one. The one per-pair step of compare()
    and its torchrun split, so both give the same bits."""
    dtype = _compute_dtype(dev)
    w0 = base.read(ref, dtype=dtype, device=str(dev))
    w1, lora = None, None
    if isinstance(finetuned, LoraAdapter):
        a, b, scale = finetuned.read_factors(ft_key, dtype=dtype, device=str(dev))
        lora = (a, b, float(scale))
    else:
        w1 = finetuned.read(ft_key, dtype=dtype, device=str(dev))
    svd0 = base_svd(base, ref, w0, cache)
    return compare_pair(
        w0,
        w1,
        lora=lora,
        meta=PairMeta(key=ref.key, ft_key=ft_key, role=ref.role, layer=ref.layer),
        k=opts.k,
        epsilons=opts.epsilons,
        unchanged_tol=opts.unchanged_tol,
        base_svd=svd0,
    )


def _run(
    base: Checkpoint, finetuned: Checkpoint | LoraAdapter, run: _Run
) -> tuple[Pairing, list[PairResult]]:
    pairing, b_refs = plan_pairs(base, finetuned, run.opts)
    results = []
    for i, (b_key, f_key) in enumerate(pairing.pairs):
        ref = b_refs[b_key]
        results.append(compare_one(base, ref, finetuned, f_key, run.opts, run.dev, run.cache))
        run.tick(i + 1, len(pairing.pairs), b_key)
    return pairing, results


def pair_lora(
    b_refs: dict[str, MatrixRef], adapter: LoraAdapter, rules: Sequence[tuple[str, str]], base: str
) -> Pairing:
    """Pair the adapter's modules with the selected base matrices (after `--map` renames).

    Raises ValidationError when the adapter targets matrices the base lacks, or none of them.
    Shared by compare() and its torchrun split, so both pair and fail identically.
    """
    modules = {map_key(m.base_key, rules): name for name, m in adapter.modules.items()}
    missing = [k for k in modules if k not in b_refs]
    if missing:
        raise ValidationError(
            f"the adapter targets {len(missing)} matrices the base {base} does not have "
            f"(after --include/--exclude/--roles): {_clip(', '.join(missing))}; check the base "
            "model, or rename with --map"
        )
    pairs = tuple((k, modules[k]) for k in b_refs if k in modules)
    if not pairs:
        raise ValidationError(f"the adapter adapts none of the selected matrices of {base}")
    return Pairing(pairs=pairs, base_only=tuple(k for k in b_refs if k not in modules))
