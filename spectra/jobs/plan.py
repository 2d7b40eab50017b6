"""``plan``: one analysis of a checkpoint -> the fine-tuning or pruning recipe another tool runs.

Kinds (docs/methods.md section "Plans" has every definition and the choices each leaves open):

- ``peft``: a PEFT ``LoraConfig`` (folder with ``adapter_config.json``, loadable with
  ``LoraConfig.from_pretrained(DIR)``) with the ranks ``spectra init`` would give for the same
  options (same targets, allocator, budget; spectra.adapt.ranks), optionally on some layers;
- ``spectrum``: cognitivecomputations/spectrum's SNR per module, top share per module type,
  its ``unfrozen_parameters`` YAML for axolotl (``.json`` out: the same as JSON);
- ``owlore`` / ``lisa``: per-layer sampling probabilities (outlier-weighted / uniform), JSON;
- ``alphapruning``: per-matrix sparsity ratios from alpha, JSON;
- ``kappa``: target modules by condition number as PEFT's ``find_kappa_target_modules``, JSON.

Every output carries the per-module (or per-layer) numbers it was made from, its
``definition`` and ``reference``. Reading order:

1. `PlanOptions` (validated when built, nothing read);
2. `make_plan`: refuse a taken output before any work, open the checkpoint, select the
   matrices the kind needs, their spectra (and outlier ratios) through the spectrum engine and
   its cache (the entries `spectra report` reads and writes: a plan after a report, or a second
   plan, reads no weights), the kind's pure computation (`_KINDS`), then write atomically.

One process; the spectra are what `spectra report` computes, so a cold plan costs at most a
report of the same matrices.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra import __version__
from spectra.adapt.allocate import get_allocator
from spectra.adapt.expert_targets import (
    expert_slots,
    linear_modules,
    parameter_patterns,
    plan_experts,
)
from spectra.adapt.layer_sampling import (
    MatrixRatio,
    check_gamma,
    layer_outlier_ratios,
    lisa_sampling,
    owlore_sampling,
)
from spectra.adapt.peft_config import lora_config
from spectra.adapt.plan import build_plan, module_path, select_targets
from spectra.adapt.ranks import AllocationOptions, check_budget, ranks_from_stats, stats_from_values
from spectra.adapt.sparsity import MAPPINGS, sparsity_ratios
from spectra.adapt.spectrum_select import (
    ALWAYS_UNFROZEN,
    TypeSelection,
    select_by_type,
    top_count,
    unfrozen_yaml,
)
from spectra.analysis.alpha_peak import alpha_peak
from spectra.analysis.condition import condition_number
from spectra.analysis.outliers import DEFAULT_MULTIPLIER, outlier_ratio
from spectra.analysis.powerlaw import fit_powerlaw
from spectra.analysis.results import json_safe
from spectra.analysis.snr import SpectrumSNR, spectrum_snr
from spectra.device import resolve_device
from spectra.distributed.runtime import apply_threads
from spectra.errors import ValidationError
from spectra.fields import check_fields, check_instance, check_value
from spectra.formats.files import check_source
from spectra.formats.peft import is_adapter_tensor
from spectra.formats.safetensors import clip
from spectra.jobs.report import outlier_key
from spectra.linalg.cache import SpectrumCache, resolve_cache
from spectra.linalg.engine import EngineOptions, MatrixExtras, compute_spectra
from spectra.outdir import check_output_dir, write_output_files
from spectra.outfile import check_output_file, write_output_file
from spectra.sources.bundled import bundled_model_path
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub_options import HubOptions
from spectra.sources.roles import MatrixRef, layer_index

KINDS = ("peft", "spectrum", "owlore", "lisa", "alphapruning", "kappa")
METRICS = ("alpha_peak", "alpha")
DEFAULT_FRACTION = {"spectrum": 0.5, "kappa": 0.2}  # the tool's 50 %, PEFT's top_p
PEFT_CONFIG = "adapter_config.json"
PEFT_NUMBERS = "spectra_plan.json"
KAPPA_MOE_SUFFIXES = (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")  # PEFT's defaults
ROLE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
Progress = Callable[[int, int, int], None]
CacheSpec = SpectrumCache | str | Path | bool | None


@dataclass(frozen=True)
class PlanOptions:
    """What `make_plan` writes; checked when built.

    kind: one of KINDS; out: output file (a folder for ``peft``); force: replace it.
    peft: targets (as ``spectra init --targets``), layers (layer indices to adapt; None: all),
    rank, allocator, budget, budget_unit, min_rank, max_rank, alpha (None: alpha = r per
    module), rslora, as ``spectra init``.
    spectrum / kappa: fraction, the top share (spectrum: per module type, highest SNR; kappa:
    lowest condition numbers; None: 0.5 / 0.2); max_dim: kappa skips matrices with a side
    above it (PEFT's ``max_dim_size_to_analyze``).
    owlore / lisa: activated_layers (gamma, layers unfrozen per interval);
    outlier_multiplier (OwLore's M).
    alphapruning: sparsity (target share of pruned entries), epsilon, mapping
    (``block_wise`` | ``layer_wise``), metric (``alpha_peak``: AlphaPruning's Hill estimate;
    ``alpha``: spectra's / WeightWatcher's power-law alpha).
    spectrum: with_vectors, also score 1-D weights (norms) as the tool does (SNR 1 each).
    device: where the spectra are computed.
    """

    kind: str
    out: str | Path
    force: bool = False
    targets: str | Sequence[str] = "q,k,v,o,up,gate,down"
    layers: Sequence[int] | None = None
    rank: int = 16
    allocator: str | None = None
    budget: int | None = None
    budget_unit: str = "rank"
    min_rank: int = 1
    max_rank: int | None = None
    alpha: float | None = None
    rslora: bool = False
    fraction: float | None = None
    max_dim: int = 16384
    activated_layers: int = 2
    outlier_multiplier: float = DEFAULT_MULTIPLIER
    sparsity: float = 0.7
    epsilon: float = 0.3
    mapping: str = "block_wise"
    metric: str = "alpha_peak"
    with_vectors: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        check_fields(self)
        _one_of(self.kind, KINDS, "kind")
        _one_of(self.mapping, MAPPINGS, "mapping")
        _one_of(self.metric, METRICS, "metric")
        if self.fraction is not None:
            top_count(1, self.fraction)  # (0, 1]
        for name in ("rank", "max_dim", "activated_layers"):
            if getattr(self, name) < 1:
                raise ValidationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.outlier_multiplier > 0:
            raise ValidationError(f"outlier multiplier must be > 0, got {self.outlier_multiplier}")
        if not 0 < self.sparsity < 1:
            raise ValidationError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not 0 <= self.epsilon < 1:
            raise ValidationError(f"epsilon must be in [0, 1), got {self.epsilon}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValidationError(f"layers must be non-negative indices, got {list(self.layers)}")
        if self.kind == "peft":
            self._check_allocation()

    def _check_allocation(self) -> None:
        check_budget(self.allocation())
        if self.allocator is not None:
            get_allocator(self.allocator)
        elif self.budget is not None:
            raise ValidationError("--budget needs --allocate (uniform, energy, ...)")

    @property
    def top_fraction(self) -> float:
        return self.fraction if self.fraction is not None else DEFAULT_FRACTION.get(self.kind, 1)

    def allocation(self) -> AllocationOptions:
        return AllocationOptions(
            self.allocator, self.rank, self.budget, self.budget_unit, self.min_rank, self.max_rank
        )


def _one_of(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValidationError(
            f"unknown {what} {str(value)[:40]!r}: choose one of {', '.join(choices)}"
        )


@dataclass(frozen=True)
class PlanResult:
    """The written file(s), the plan as JSON data and the wall time."""

    kind: str
    out: Path
    files: list[Path]
    plan: dict[str, Any]
    seconds: float
    chosen: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Ctx:
    """One run: the open checkpoint, the options, the engine settings and the cache."""

    ckpt: Checkpoint
    options: PlanOptions
    device: torch.device
    cache: SpectrumCache | None
    progress: Progress | None


# ----------------------------------------------------------------------------- the job


def make_plan(
    source: str | Path | None,
    options: PlanOptions,
    *,
    cache: CacheSpec = True,
    progress: Progress | None = None,
    hub: HubOptions | None = None,
    threads: int | None = None,
) -> PlanResult:
    """Compute the ``options.kind`` plan of ``source`` (None: the bundled MiniLM) and write it.

    cache: True (default spectrum cache), False/None, a folder or a SpectrumCache.
    progress: the engine's ``progress(done, total, bytes_read)`` per matrix.
    hub: how a Hub repo id is opened (HubOptions: revision, disk_budget, local_only).
    threads: torch's intra-op threads (or $SPECTRA_NUM_THREADS; None and neither: unchanged), as
      `spectra report` sets them, so a plan's spectra are the bits a report's cache holds.
    """
    started = time.perf_counter()
    check_instance(options, PlanOptions, "options", optional=False)
    check_value(cache, CacheSpec, "cache")
    check_instance(hub, HubOptions, "hub")
    apply_threads(threads)
    src = str(bundled_model_path() if source is None else source)
    check_source(src, "source")
    resolved = resolve_cache(cache)
    protect = (src, None if resolved is None else str(resolved.root))
    if options.kind == "peft":
        check_output_dir(
            Path(options.out).expanduser().absolute(), force=options.force, protect=protect
        )
    else:
        check_output_file(options.out, force=options.force, protect=protect)
    hub = hub or HubOptions()
    with Checkpoint.open(
        src, revision=hub.revision, local_only=hub.local_only, disk_budget=hub.disk_budget
    ) as ckpt:
        _refuse_adapter(ckpt)
        ctx = _Ctx(ckpt, options, resolve_device(options.device), resolved, progress)
        body, chosen = _KINDS[options.kind](ctx)
        commit = ckpt.commit
    plan = {
        "kind": options.kind,
        "checkpoint": src,
        **({"commit": commit} if commit else {}),
        "spectra_version": __version__,
        **body,
    }
    files = _write(options, plan, protect)
    return PlanResult(
        options.kind,
        files[0].parent if options.kind == "peft" else files[0],
        files,
        plan,
        time.perf_counter() - started,
        chosen,
    )


def _refuse_adapter(ckpt: Checkpoint) -> None:
    factors = [t.name for t in ckpt.tensors() if is_adapter_tensor(t.name)]
    if factors:
        raise ValidationError(
            f"{ckpt.source} holds PEFT LoRA factors ({len(factors)} tensors like "
            f"{clip(factors[0])}), not weight matrices: plan on the base model (or merge the "
            "adapter first with PEFT merge_and_unload)"
        )


def _write(options: PlanOptions, plan: dict[str, Any], protect: tuple) -> list[Path]:
    if options.kind == "peft":
        config = plan["lora_config"]
        files = {
            PEFT_CONFIG: json.dumps(config, indent=2, sort_keys=True) + "\n",
            PEFT_NUMBERS: _json(plan),
        }
        return write_output_files(options.out, files, force=options.force, protect=protect)
    is_yaml = options.kind == "spectrum" and Path(options.out).suffix.lower() in (".yaml", ".yml")
    text = _spectrum_yaml(plan) if is_yaml else _json(plan)
    return [write_output_file(options.out, text, force=options.force, protect=protect)]


def _json(plan: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(dict(plan)), indent=2) + "\n"


# ----------------------------------------------------------------------------- spectra


@dataclass(frozen=True)
class _Numbers:
    """What the engine gives per matrix: singular values (descending) and the outlier ratio."""

    S: np.ndarray
    outlier_ratio: float | None


def _spectra(ctx: _Ctx, matrices: Sequence[MatrixRef]) -> dict[str, _Numbers]:
    """Singular values and outlier ratio of every matrix, through the engine and its cache
    (the report's default spectrum and outlier entries, so either warms the other)."""
    mult = ctx.options.outlier_multiplier if ctx.options.kind == "owlore" else DEFAULT_MULTIPLIER
    key = outlier_key(mult)

    def compute(ref: MatrixRef, W: torch.Tensor) -> dict[str, float | None]:
        return {key: outlier_ratio(W, multiplier=mult)}

    out: dict[str, _Numbers] = {}
    for spec in compute_spectra(
        ctx.ckpt,
        matrices,
        engine=EngineOptions(device=ctx.device),
        cache=ctx.cache,
        progress=ctx.progress,
        extras=MatrixExtras((key,), compute),
    ):
        if not spec.ok:
            raise ValidationError(f"no spectrum for {spec.key!r}: {spec.message}")
        S = spec.values.double().cpu().numpy()
        out[str(spec.key)] = _Numbers(S, spec.extras.get(key))
    return out


def _linear(ref: MatrixRef) -> bool:
    """A 2-D ``.weight`` an ``nn.Linear`` holds: not an embedding, a Conv1D or a 3-D stack."""
    return (
        ref.key.endswith(".weight")
        and len(ref.tensor.shape) == 2
        and not ref.transpose
        and ref.role != "embedding"
    )


def _model_order(refs: Sequence[MatrixRef]) -> list[MatrixRef]:
    """Layer by layer, in the order a transformer block defines its linears (q k v o, then
    the MLP), as PyTorch's ``named_modules`` lists them."""

    def rank(ref: MatrixRef) -> tuple[int, int, str]:
        role = ROLE_ORDER.index(ref.role) if ref.role in ROLE_ORDER else len(ROLE_ORDER)
        return (-1 if ref.layer is None else ref.layer, role, ref.key)

    return sorted(refs, key=rank)


# ----------------------------------------------------------------------------- kinds

Body = tuple[dict[str, Any], list[str]]


def _peft(ctx: _Ctx) -> Body:
    opts = ctx.options
    everything = ctx.ckpt.matrices()
    selected = select_targets(everything, opts.targets)
    if opts.layers is not None:
        present = sorted({m.layer for m in selected if m.layer is not None})
        missing = sorted(set(opts.layers) - set(present))
        if missing:
            raise ValidationError(
                f"--layers {missing[:5]} not among the targets' layers {present[:3]}..."
                f"{present[-1:]}: pick layers from 0 to {present[-1] if present else 0}"
            )
        selected = [m for m in selected if m.layer in set(opts.layers)]
    alloc_opts = opts.allocation()
    allocation = None
    numbers: dict[str, _Numbers] = {}
    if opts.allocator is None:
        ranks = {m.key: opts.rank for m in selected}
        needs = None
    else:
        needs = get_allocator(opts.allocator).needs
        numbers = _spectra(ctx, selected) if needs is not None else {}
        values = {k: n.S for k, n in numbers.items()}
        stats = stats_from_values(selected, values, needs)
        ranks, allocation = ranks_from_stats(alloc_opts, stats)
    plan = build_plan(
        selected,
        ranks,
        method="lora",
        targets=opts.targets,
        alpha=opts.alpha,
        rslora=opts.rslora,
        allocation=allocation,
    )
    # routed experts in 3-D parameters: PEFT target_parameters (spectra.adapt.expert_targets)
    model_type = ctx.ckpt.config.get("model_type")
    slots = expert_slots(selected, model_type)  # type: ignore[arg-type]
    plan = plan_experts(plan, slots, opts.alpha)
    modules_plan = replace(plan, modules=tuple(m for m in plan.modules if m.key not in slots))
    config = lora_config(
        modules_plan,
        linear_modules(everything, model_type),  # type: ignore[arg-type]
        base_model=str(ctx.ckpt.source),
        parameters=parameter_patterns(plan, slots),
    )
    modules = []
    for mod in plan.modules:
        row: dict[str, Any] = mod.to_dict()
        if mod.key in numbers:
            S = numbers[mod.key].S
            row["energy_top_r"] = float((S[: mod.rank] ** 2).sum() / (S**2).sum())
            if needs == "alpha":
                fit = fit_powerlaw(S**2)
                row["htsr_alpha"] = fit.alpha if fit.ok else None
        modules.append(row)
    body = {
        "definition": (
            "ranks as `spectra init` gives them for the same targets and allocator "
            f"({allocation.formula if allocation else 'uniform rank r'}); LoraConfig keys as "
            "PEFT resolves them (target_modules suffixes, layers_to_transform, exclude_modules, "
            "rank_pattern/alpha_pattern)"
        ),
        "reference": "PEFT LoraConfig; allocators: docs/methods.md section 5",
        "allocation": None if allocation is None else allocation.to_dict(),
        "lora_config": config,
        "modules": modules,
    }
    return body, [m.module for m in plan.modules]


def _vector_snrs(ctx: _Ctx) -> list[tuple[int, str, SpectrumSNR]]:
    """The tool also scores modules whose weight is 1-D (norms): as a 1 x n matrix, one
    singular value ``||w||``, so its SNR is 1 (inf for a zero vector). Read here (tiny)."""
    out = []
    for ref in ctx.ckpt.tensors():
        if ref.name.endswith(".weight") and len(ref.shape) == 1 and ref.shape[0] > 0:
            w = ctx.ckpt.read(ref, dtype=torch.float64)
            S = np.array([float(torch.linalg.vector_norm(w))])
            layer = layer_index(ref.name)
            order = -1 if layer is None else layer
            out.append((order, module_path(ref.name), spectrum_snr(S, (1, int(ref.shape[0])))))
    return out


def _spectrum(ctx: _Ctx) -> Body:
    refs = [m for m in ctx.ckpt.matrices() if m.key.endswith(".weight") and m.expert is None]
    if not refs:
        raise ValidationError(f"{ctx.ckpt.source} has no 2-D .weight matrices to score")
    numbers = _spectra(ctx, refs)
    scored = [
        (
            -1 if r.layer is None else r.layer,
            module_path(r.key),
            spectrum_snr(numbers[r.key].S, r.shape),
        )
        for r in _model_order(refs)
    ]
    if ctx.options.with_vectors:
        scored = sorted([*scored, *_vector_snrs(ctx)], key=lambda item: item[0])  # stable
    scores = {path: snr.snr for _, path, snr in scored}
    rows = [
        {"module": path, "layer": None if order < 0 else order, **snr.to_dict()}
        for order, path, snr in scored
    ]
    paths = [path for _, path, _ in scored]
    selection = select_by_type(paths, scores, ctx.options.top_fraction)
    chosen = [p for sel in selection for p in sel.chosen]
    for row in rows:
        row["chosen"] = row["module"] in set(chosen)
    body = {
        "definition": (
            "snr = (sum(S > t) / sum(S <= t)) / S[0], t = sigma (1 + sqrt(min/max)), "
            "sigma = IQR(S) / 1.349; per module type the top int(n * percent / 100) by snr"
        ),
        "reference": "cognitivecomputations/spectrum spectrum.py; arXiv 2406.06623",
        "top_percent": ctx.options.top_fraction * 100,
        "unfrozen_parameters": [*ALWAYS_UNFROZEN, *chosen],
        "types": [sel.to_dict() for sel in selection],
        "modules": rows,
    }
    return body, chosen


def _spectrum_yaml(plan: Mapping[str, Any]) -> str:
    """The tool's YAML, then spectra's numbers as comments (the file stays what axolotl reads)."""
    selection = [
        TypeSelection(t["type"], tuple(t["modules"]), tuple(t["chosen"])) for t in plan["types"]
    ]
    lines = unfrozen_yaml(selection).splitlines()
    lines += [
        "# spectra plan --for spectrum: " + plan["definition"],
        f"# reference: {plan['reference']}; top_percent: {plan['top_percent']:g}",
        "# module | snr | sigma | threshold | chosen",
    ]
    for row in plan["modules"]:
        snr = "inf" if row["snr"] is None else f"{row['snr']:.6g}"
        lines.append(
            f"#   {row['module']} | {snr} | {row['sigma']:.6g} | {row['threshold']:.6g} | "
            f"{'yes' if row['chosen'] else 'no'}"
        )
    return "\n".join(lines) + "\n"


def _kappa(ctx: _Ctx) -> Body:
    opts = ctx.options
    refs = [m for m in ctx.ckpt.matrices() if _linear(m) and max(m.shape) <= opts.max_dim]
    stacks = [
        m
        for m in ctx.ckpt.matrices()
        if len(m.tensor.shape) == 3
        and m.tensor.name.endswith(KAPPA_MOE_SUFFIXES)
        and max(m.shape) <= opts.max_dim
    ]
    if not refs and not stacks:
        raise ValidationError(
            f"{ctx.ckpt.source} has no linear weight with both sides <= {opts.max_dim}"
        )
    numbers = _spectra(ctx, [*refs, *stacks])
    kappas = {module_path(r.key): condition_number(numbers[r.key].S) for r in refs}
    per_param: dict[str, list[float]] = {}
    for ref in stacks:
        per_param.setdefault(ref.tensor.name, []).append(condition_number(numbers[ref.key].S))
    param_kappa = {name: float(sum(v) / len(v)) for name, v in per_param.items()}
    chosen = _lowest(kappas, opts.top_fraction)
    chosen_params = _lowest(param_kappa, opts.top_fraction)
    body = {
        "definition": "kappa = S[0] / (S[-1] + 1e-8); the max(1, int(n * top_p)) lowest",
        "reference": "PEFT find_kappa_target_modules (KappaTuneSelector), PEFT 0.21",
        "top_p": opts.top_fraction,
        "target_modules": chosen,
        "target_parameters": chosen_params or None,
        "modules": [{"module": m, "kappa": k, "chosen": m in chosen} for m, k in kappas.items()],
        "parameters": [{"parameter": p, "kappa": k} for p, k in param_kappa.items()],
    }
    return body, chosen


def _lowest(scores: Mapping[str, float], top_p: float) -> list[str]:
    if not scores:
        return []
    ordered = sorted(scores.items(), key=lambda item: item[1])
    return [name for name, _ in ordered[: max(1, int(len(ordered) * top_p))]]


def _layered(ctx: _Ctx) -> list[MatrixRef]:
    refs = [m for m in ctx.ckpt.matrices() if m.layer is not None and m.role != "embedding"]
    if not refs:
        raise ValidationError(
            f"{ctx.ckpt.source} has no numbered layers (names like layers.N. or layer.N.)"
        )
    return refs


def _sampling_body(ctx: _Ctx, sampling: Any, kind: str) -> Body:
    gamma = ctx.options.activated_layers
    check_gamma(gamma, len(sampling.layers))
    nonzero = sum(p > 0 for p in sampling.probabilities)
    if gamma > nonzero:
        raise ValidationError(
            f"only {nonzero} layers have a non-zero probability, fewer than --activated-layers "
            f"{gamma}: lower it"
        )
    body = {
        "activated_layers": gamma,
        "num_layers": len(sampling.layers),
        "probabilities": list(sampling.probabilities),
        "layers": [
            {"layer": layer, "score": s, "probability": p}
            for layer, s, p in zip(
                sampling.layers, sampling.scores, sampling.probabilities, strict=True
            )
        ],
        "always_trained": "embeddings and head"
        if kind == "lisa"
        else "embeddings and head (outside the sampled layers, as OwLore's trainer leaves them)",
    }
    return body, [str(layer) for layer in sampling.layers]


def _owlore(ctx: _Ctx) -> Body:
    refs = _layered(ctx)
    numbers = _spectra(ctx, refs)
    per_matrix = []
    for ref in refs:
        ratio = numbers[ref.key].outlier_ratio
        if ratio is None:
            raise ValidationError(f"{ref.key!r} has no outlier ratio (all zeros or not finite)")
        per_matrix.append(MatrixRatio(ref.key, int(ref.layer), ref.numel, float(ratio)))  # type: ignore[arg-type]
    ratios = layer_outlier_ratios(per_matrix)
    body, chosen = _sampling_body(ctx, owlore_sampling(ratios), "owlore")
    body = {
        "definition": (
            "p_l = D_l / sum D, D_l = share of entries of layer l's matrices with |W_ij| > "
            f"M mean|W| of their matrix, M = {ctx.options.outlier_multiplier:g}"
        ),
        "reference": "OwLore arXiv 2405.18380 (lisa_prob_mode 'owl'); OWL arXiv 2310.05175",
        "outlier_multiplier": ctx.options.outlier_multiplier,
        "ratios": [ratios[layer] for layer in sorted(ratios)],
        **body,
        "matrices": [
            {"key": m.key, "layer": m.layer, "numel": m.numel, "outlier_ratio": m.ratio}
            for m in per_matrix
        ],
    }
    return body, chosen


def _lisa(ctx: _Ctx) -> Body:
    refs = _layered(ctx)
    body, chosen = _sampling_body(ctx, lisa_sampling([int(r.layer) for r in refs]), "lisa")  # type: ignore[arg-type]
    body = {
        "definition": "p_l = 1 / N_L over the N_L numbered layers; gamma drawn per interval",
        "reference": "LISA arXiv 2403.17919",
        **body,
    }
    return body, chosen


def _alphapruning(ctx: _Ctx) -> Body:
    opts = ctx.options
    refs = _model_order([m for m in _layered(ctx) if _linear(m)])
    numbers = _spectra(ctx, refs)
    metrics = []
    for ref in refs:
        evals = numbers[ref.key].S ** 2
        if opts.metric == "alpha_peak":
            metrics.append(alpha_peak(evals).alpha)
        else:
            fit = fit_powerlaw(evals)
            if not fit.ok:
                raise ValidationError(f"no power-law alpha for {ref.key!r}: {fit.status}")
            metrics.append(fit.alpha)
    sizes = [ref.numel for ref in refs]
    blocks = [int(ref.layer) for ref in refs]  # type: ignore[arg-type]
    ratios = sparsity_ratios(
        metrics, sizes, blocks, target=opts.sparsity, eps=opts.epsilon, mapping=opts.mapping
    )
    body = {
        "definition": (
            "r = ((q - min q) / (max q - min q)) (s2 - s1) + s1, s1 = 1 - eps, s2 = 1 + eps, "
            "then r *= sum(P) s / sum(P r); q = mean alpha of the block (block_wise)"
        ),
        "reference": "AlphaPruning arXiv 2410.10912, lib/prune.py ww_sparsity",
        "metric": opts.metric,
        "sparsity_ratio": opts.sparsity,
        "epsilon": opts.epsilon,
        "mapping": opts.mapping,
        "metric_values": metrics,
        "ratios": ratios.tolist(),
        "achieved_sparsity": float(np.dot(ratios, sizes) / sum(sizes)),
        "modules": [
            {
                "module": module_path(ref.key),
                "layer": ref.layer,
                "numel": ref.numel,
                "metric": q,
                "sparsity": r,
            }
            for ref, q, r in zip(refs, metrics, ratios.tolist(), strict=True)
        ],
    }
    return body, [module_path(r.key) for r in refs]


_KINDS: dict[str, Callable[[_Ctx], Body]] = {
    "peft": _peft,
    "spectrum": _spectrum,
    "owlore": _owlore,
    "lisa": _lisa,
    "alphapruning": _alphapruning,
    "kappa": _kappa,
}
