"""`mitigate(base, finetuned, out)`: the mitigate job. Scale the intruder dimensions of a
fine-tune (arXiv 2410.21228; docs/methods.md section 3) and write the mitigated model in the
form it came in.

1. `open_adapter` (compare's) says whether FINETUNED is a PEFT LoRA adapter folder;
2. `plan_pairs` (compare's, with the same k, epsilon, --map and selection) pairs its matrices
   with the base's, so the matrices and directions are exactly those `spectra compare` counts;
3. per pair (pure, spectra.adapt.mitigate): the float64 top-k left vectors of W_t, their max |cos|
   against the base's, the intruders below epsilon, ``W' = W_t - (1 - lambda) U_I U_I^T W_t``, and
   the intruders of the result (what compare will count on it);
4. written atomically (spectra.outdir) with ``mitigation.json``:
   - a checkpoint: streamed shard by shard through the residual writer
     (spectra.export.residual): same shard files, tensor order, dtypes, index and side files;
     only matrices with an intruder are replaced (W' rounded to the stored dtype), every other
     tensor is copied byte for byte; one matrix in memory at a time;
   - a PEFT adapter: an adapter for the same base. ``rank_policy="extend"`` (default): a mitigated
     module's rank grows by its number of directions (``rank_pattern``/``alpha_pattern`` keep its
     scale) and BASE + adapter is W' exactly; ``rank_policy="peft"``: PEFT 0.21.2's
     ``reduce_intruder_dimension`` (same rank r, the best rank-r fit of W' - W_0).
Under torchrun (`_each`) the ranks examine shares of the matrices and rank 0 gathers the rows and
directions and writes, with the same per-matrix calls: the outputs are a single process's.
No intruder at all: nothing is written and the result says so (`Mitigation.out` is None; the CLI
prints a note and exits 0): a copy of the fine-tune would only look like a mitigated model.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from spectra.adapt.mitigate import (
    Detection,
    Direction,
    check_lambda,
    detect_intruders,
    extend_factors,
    moved_directions,
    new_alpha,
    refit_factors,
    scale_directions,
)
from spectra.analysis.compare_inputs import ResidualBaseWarning, open_adapter
from spectra.analysis.comparison import CompareOptions
from spectra.analysis.drift import left_singular
from spectra.analysis.intruders import DEFAULT_K, validate_epsilons
from spectra.analysis.results import json_safe, runtime_versions
from spectra.device import resolve_device
from spectra.distributed.failures import RERUN, RESUME_FROM_CACHE, Tracker, guarded, settle
from spectra.distributed.gather import gather_results
from spectra.distributed.hub import open_checkpoint
from spectra.distributed.partition import matrix_cost, shard_items
from spectra.distributed.runtime import (
    Session,
    apply_threads,
    distributed_session,
    is_distributed,
)
from spectra.errors import ValidationError
from spectra.export.residual import (
    RESIDUAL_DTYPES,
    is_side_file,
    storage_dtype,
    write_residual_checkpoint,
)
from spectra.fields import check_fields, check_instance, check_value
from spectra.formats.files import check_source
from spectra.formats.peft import AdapterContent, PeftAdapter, read_peft_adapter, write_peft_adapter
from spectra.formats.safetensors import clip
from spectra.jobs.compare import CacheSpec, base_svd, plan_pairs
from spectra.linalg.cache import SpectrumCache, resolve_cache
from spectra.linalg.engine import content_key_of
from spectra.outdir import atomic_output_dir, check_output_dir
from spectra.sources.adapters import LoraAdapter
from spectra.sources.checkpoint import Checkpoint, is_hub_source
from spectra.sources.hub_options import HubOptions
from spectra.sources.roles import MatrixRef

Progress = Callable[[int, int, str], None]  # (done, total, key of the matrix just finished)
Opener = Callable[[str | Path, HubOptions | None], Checkpoint]
T = TypeVar("T")
REPORT_NAME = "mitigation.json"
RANK_POLICIES = ("extend", "peft")
PEFT_DEFAULT_LAMBDA = 0.75  # PEFT's reduce_intruder_dimension default
# Settings of the input adapter that stay true for the mitigated one.
CARRIED_KEYS = (
    "modules_to_save",
    "task_type",
    "bias",
    "lora_bias",
    "fan_in_fan_out",
    "lora_dropout",
    "revision",
)


@dataclass(frozen=True)
class MitigateOptions:
    """Knobs of a mitigation (validated).

    lam: the factor each intruder's singular value is multiplied by, in (0, 1] (PEFT's default
    0.75; the paper's tables use 0.5-0.7); k, epsilon: compare's top-k and threshold (one epsilon);
    rank_policy: for an adapter, "extend" (rank r + directions, W' exactly) or "peft" (rank r,
    PEFT's reduce_intruder_dimension); map/include/exclude/roles/allow_missing/device: as in
    CompareOptions; check_base_name: refuse an adapter whose base_model_name_or_path names a
    different Hub repo or a different local folder than BASE; base_hub, hub: how BASE and a
    FINETUNED checkpoint given as Hub repo ids are opened (HubOptions: revision, disk budget,
    offline; None: the defaults). Under a disk budget both sides are on disk at once: give each
    its share. Not written into mitigation.json: the commits each side resolved to are.
    """

    lam: float = PEFT_DEFAULT_LAMBDA
    k: int = DEFAULT_K
    epsilon: float = 0.5
    rank_policy: str = "extend"
    map: tuple[tuple[str, str], ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    allow_missing: bool = False
    device: str = "auto"
    check_base_name: bool = True
    base_hub: HubOptions | None = None
    hub: HubOptions | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", check_lambda(self.lam))
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ValidationError(f"epsilon must be a number in (0, 1], got {eps!r}")
        object.__setattr__(self, "epsilon", validate_epsilons((eps,))[0])
        if self.rank_policy not in RANK_POLICIES:
            raise ValidationError(
                f"rank_policy must be one of {', '.join(RANK_POLICIES)}, "
                f"got {clip(self.rank_policy)}"
            )
        compare = self.compare_options()  # k, map, selection and device checked as compare does
        for name in ("map", "include", "exclude", "roles", "device"):
            object.__setattr__(self, name, getattr(compare, name))
        check_fields(self)

    def compare_options(self) -> CompareOptions:
        """The CompareOptions that select the same matrices and directions."""
        return CompareOptions(
            k=self.k,
            epsilons=(self.epsilon,),
            map=self.map,
            include=self.include,
            exclude=self.exclude,
            roles=self.roles,
            allow_missing=self.allow_missing,
            device=self.device,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "k": self.k,
            "epsilon": self.epsilon,
            "rank_policy": self.rank_policy,
            "map": [f"{p}=>{r}" for p, r in self.map],
            "include": list(self.include),
            "exclude": list(self.exclude),
            "roles": list(self.roles),
            "allow_missing": self.allow_missing,
            "device": self.device,
            "check_base_name": self.check_base_name,
        }


@dataclass(frozen=True)
class MatrixMitigation:
    """What was done to one matrix: its top-k max |cos|, the directions scaled (empty: left as
    it is), and the intruder count at epsilon among the top-k of the result (what `spectra
    compare` counts on it). rank/alpha before and after: adapter modules only."""

    key: str
    ft_key: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    max_cos: tuple[float, ...]
    directions: tuple[Direction, ...]
    intruders_after: int
    rank: tuple[int, int] | None = None
    alpha: tuple[float, float] | None = None

    @property
    def changed(self) -> bool:
        return bool(self.directions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "ft_key": self.ft_key,
            "role": self.role,
            "layer": self.layer,
            "shape": list(self.shape),
            "max_cos": list(self.max_cos),
            "intruders_before": len(self.directions),
            "intruders_after": self.intruders_after,
            "directions": [d.to_dict() for d in self.directions],
            "rank_before": None if self.rank is None else self.rank[0],
            "rank_after": None if self.rank is None else self.rank[1],
            "alpha_before": None if self.alpha is None else self.alpha[0],
            "alpha_after": None if self.alpha is None else self.alpha[1],
        }


@dataclass(frozen=True)
class Mitigation:
    """What `mitigate()` returns: every examined matrix, and where the result was written
    (`out` None: no intruder anywhere, nothing written)."""

    base: str
    finetuned: str
    mode: str  # 'checkpoint' | 'lora'
    options: MitigateOptions
    matrices: tuple[MatrixMitigation, ...]
    out: Path | None
    versions: dict[str, str] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)  # side -> Hub commit (Hub ids only)

    @property
    def changed(self) -> tuple[MatrixMitigation, ...]:
        return tuple(m for m in self.matrices if m.changed)

    @property
    def directions(self) -> int:
        return sum(len(m.directions) for m in self.matrices)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "kind": "mitigate",
                "method": "intruder dimensions scaled by lambda (arXiv 2410.21228)",
                "base": self.base,
                "finetuned": self.finetuned,
                "mode": self.mode,
                "options": self.options.to_dict(),
                "versions": dict(self.versions),
                **({"commits": dict(self.commits)} if self.commits else {}),
                "matrices_examined": len(self.matrices),
                "matrices_changed": len(self.changed),
                "directions": self.directions,
                "matrices": [m.to_dict() for m in self.matrices],
            }
        )

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def mitigate(
    base: str | Path,
    finetuned: str | Path,
    out: str | Path,
    options: MitigateOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
    cache: CacheSpec = None,
) -> Mitigation | None:
    """Scale the intruder dimensions of `finetuned` (a checkpoint or a PEFT LoRA adapter folder)
    against `base` by `options.lam` and write the result to `out` (atomically; an existing
    folder is refused without `force`). Returns the Mitigation (its `out` is None when no matrix
    had an intruder: then nothing is written).

    Under torchrun every rank examines its share of the matrices (shard-affine, balanced by
    cost) on its own device; rank 0 gathers the rows and the intruder directions (small: k
    vectors per matrix at most), writes the output exactly as one process does and returns the
    Mitigation; the other ranks return None.

    cache: compare's cache of the base's float64 left singular vectors (a SpectrumCache, a
    folder, True or None: no cache); a base already compared with the same cache is not
    decomposed again (one of the three decompositions per matrix), with the same bits.

    >>> res = mitigate("base/", "adapter/", "out/", MitigateOptions(lam=0.5))  # doctest: +SKIP
    >>> [(m.key, len(m.directions)) for m in res.changed]                    # doctest: +SKIP
    [('encoder.layer.0.attention.self.query.weight', 2)]
    """
    check_source(base, "base")
    check_source(finetuned, "finetuned")
    check_source(out, "out")
    check_instance(options, MitigateOptions, "options")
    check_value(progress, Progress | None, "progress")
    check_value(cache, CacheSpec, "cache")
    opts = MitigateOptions() if options is None else options
    spectra_cache = resolve_cache(cache)
    protect = (base, finetuned, *(() if spectra_cache is None else (spectra_cache.root,)))
    check_output_dir(Path(out).expanduser().absolute(), force=force, protect=protect)
    if not is_distributed():
        apply_threads(threads)
        job = _Job(opts, resolve_device(opts.device), progress, Path(out), force, spectra_cache)
        return _run(job, base, finetuned, _open)
    with distributed_session(device=opts.device, threads=threads) as s:
        job = _Job(opts, s.device, progress, Path(out), force, spectra_cache, session=s)
        return _run(job, base, finetuned, partial(open_checkpoint, s))


def _run(
    job: _Job, base: str | Path, finetuned: str | Path, open_ckpt: Opener
) -> Mitigation | None:
    """Open both sides, mitigate (`_mitigate_adapter` or `_mitigate_checkpoint`), and say what
    was done (None on a torchrun rank other than 0)."""
    opts = job.options
    adapter = _open_adapter(finetuned)
    with open_ckpt(base, opts.base_hub) as base_ckpt:
        if adapter is not None:
            _refuse_adapter_revision(finetuned, opts.hub)
            job = _with_commits(job, base=base_ckpt.commit)
            with adapter:
                rows, written = _mitigate_adapter(job, base_ckpt, adapter, (base, finetuned))
        else:
            with open_ckpt(finetuned, opts.hub) as ft_ckpt:
                job = _with_commits(job, base=base_ckpt.commit, finetuned=ft_ckpt.commit)
                rows, written = _mitigate_checkpoint(job, base_ckpt, ft_ckpt, (base, finetuned))
    if rows is None:  # a torchrun rank other than 0
        return None
    return Mitigation(
        base=str(base),
        finetuned=str(finetuned),
        mode="lora" if adapter is not None else "checkpoint",
        options=opts,
        matrices=tuple(rows),
        out=written,
        versions=runtime_versions(),
        commits=job.commits,
    )


def _open(source: str | Path, hub: HubOptions | None) -> Checkpoint:  # one process
    """`Checkpoint.open` with a side's Hub options (a revision for a local path is refused)."""
    hub = hub or HubOptions()
    return Checkpoint.open(
        source, revision=hub.revision, local_only=hub.local_only, disk_budget=hub.disk_budget
    )


def _refuse_adapter_revision(finetuned: str | Path, hub: HubOptions | None) -> None:
    """A revision names a commit of a Hub repo; a local adapter folder has none."""
    if hub is not None and hub.revision is not None:
        raise ValidationError(
            f"revision={clip(hub.revision)} applies to a Hub repo, but {clip(str(finetuned))} is "
            "a local adapter folder: drop the revision"
        )


def _with_commits(job: _Job, **sides: str | None) -> _Job:
    """The job with the Hub commit of each side that has one (recorded in mitigation.json)."""
    return replace(job, commits={side: sha for side, sha in sides.items() if sha})


@dataclass(frozen=True)
class _Job:
    options: MitigateOptions
    device: torch.device
    progress: Progress | None
    out: Path
    force: bool
    cache: SpectrumCache | None = None
    session: Session | None = None  # None: one process, every matrix here
    commits: dict[str, str] = field(default_factory=dict)  # side -> Hub commit, for the report


class _NothingToWrite(Exception):
    """Raised inside the atomic output folder when no matrix changed: the folder is dropped."""


# ------------------------------------------------------------------ inputs


def _open_adapter(finetuned: str | Path) -> LoraAdapter | None:
    """compare's adapter detection; an adapter whose init changed the base is refused (BASE +
    adapter is not the fine-tuned model, so its directions would be the wrong ones)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResidualBaseWarning)
        try:
            adapter = open_adapter(finetuned)
        except ResidualBaseWarning as exc:
            raise ValidationError(f"cannot mitigate: {exc}") from None
    if adapter is not None and adapter.initial is not None:
        adapter.close()
        raise ValidationError(
            f"{finetuned} was trained on a spectra init residual base: run `spectra convert` "
            "first and mitigate the plain LoRA it writes"
        )
    return adapter


def check_base_name(base: str | Path, config: dict[str, Any]) -> None:
    """ValidationError when the adapter's ``base_model_name_or_path`` names another model than
    `base`: two different Hub repo ids, or two different existing local folders. A Hub id against
    a local folder cannot be told apart offline and passes (the shapes are checked anyway)."""
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named or len(named) > 4096:
        return
    given = str(base)
    if is_hub_source(given) and is_hub_source(named):
        same = given.partition("@")[0].lower() == named.lower()
    else:
        a, b = Path(given).expanduser(), Path(named).expanduser()
        if not (a.exists() and b.exists()):
            return
        same = a.resolve() == b.resolve() or (a.is_file() and a.resolve().parent == b.resolve())
    if not same:
        raise ValidationError(
            f"the adapter was trained on {clip(named)} (its base_model_name_or_path), not on "
            f"{clip(given)}: pass that base, or --skip-base-check if {clip(given)} is a copy of it"
        )


def _check_shapes(
    base: Checkpoint, adapter: LoraAdapter, pairs: tuple[tuple[str, str], ...]
) -> None:
    refs = {m.key: m for m in base.matrices()}
    for b_key, module in pairs:
        mod = adapter.modules[module]
        want = (mod.b.shape[0], mod.a.shape[1])
        if refs[b_key].shape != want:
            raise ValidationError(
                f"{clip(b_key)} is {refs[b_key].shape} in {base.source} but the adapter's "
                f"B @ A is {want}: this adapter is for another base model"
            )


# ------------------------------------------------------------------ one matrix


Svd = tuple[torch.Tensor, torch.Tensor]


def _read_base(job: _Job, base: Checkpoint, ref: MatrixRef) -> tuple[torch.Tensor, Svd]:
    """The base matrix in the working dtype on the job's device, and its (U, S): from the cache
    (compare's entries, keyed by content taken before the read) or computed."""
    key = content_key_of(base, ref, job.cache) if job.cache is not None else None
    w0 = base.read(ref, dtype=_work_dtype(job), device=str(job.device))
    cached = base_svd(key, w0, job.cache)
    return w0, cached if cached is not None else left_singular(w0)


def _examine(job: _Job, w0: torch.Tensor, w1: torch.Tensor, svd0: Svd) -> Detection:
    """Detection on (W_0, W_t) with the base's (U, S)."""
    return detect_intruders(w0, w1, job.options.k, job.options.epsilon, svd0)


def _count_after(job: _Job, w0: torch.Tensor, w_after: torch.Tensor, svd0: Svd) -> int:
    after = detect_intruders(w0, w_after, job.options.k, job.options.epsilon, svd0)
    return len(after.indices)


def _row(ref: MatrixRef, ft_key: str, det: Detection, **extra: Any) -> MatrixMitigation:
    return MatrixMitigation(
        key=ref.key,
        ft_key=ft_key,
        role=ref.role,
        layer=ref.layer,
        shape=ref.shape,
        max_cos=det.max_cos,
        **extra,
    )


def _tick(job: _Job, done: int, total: int, key: str) -> None:
    if job.progress is not None:
        job.progress(done, total, key)


# ------------------------------------------------------------------ a PEFT adapter


def _mitigate_adapter(
    job: _Job, base: Checkpoint, adapter: LoraAdapter, inputs: tuple[str | Path, str | Path]
) -> tuple[list[MatrixMitigation] | None, Path | None]:
    opts = job.options
    if opts.check_base_name:
        check_base_name(inputs[0], adapter.config)
    pairing, b_refs = plan_pairs(base, adapter, opts.compare_options())
    _check_shapes(base, adapter, pairing.pairs)
    peft = read_peft_adapter(inputs[1])
    factors = dict(peft.factors)
    alphas = {m: peft.alpha(m) for m in factors}
    refs = [b_refs[b_key] for b_key, _ in pairing.pairs]
    found = _each(
        job, refs, lambda i: _adapter_module(job, base, refs[i], peft, pairing.pairs[i][1])
    )
    if found is None:  # a torchrun rank other than 0
        return None, None
    rows = []
    for (_, module), (row, new) in zip(pairing.pairs, found, strict=True):
        rows.append(row)
        if new is not None:
            factors[module], alphas[module] = new
    if not any(r.changed for r in rows):
        return rows, None
    content = AdapterContent(
        factors,
        alphas,
        rslora=peft.settings.use_rslora,
        base_model_name_or_path=peft.config.get("base_model_name_or_path"),
        dtype=next(iter(peft.factors.values()))[0].dtype,
        other=peft.other,
        config_extra={k: peft.config[k] for k in CARRIED_KEYS if peft.config.get(k) is not None},
    )
    with atomic_output_dir(job.out, force=job.force, protect=inputs) as tmp:
        write_peft_adapter(tmp, content)
        (tmp / REPORT_NAME).write_text(_report_text(job, rows, inputs, "lora"), encoding="utf-8")
    return rows, job.out.expanduser().absolute()


def _each(job: _Job, refs: list[MatrixRef], one: Callable[[int], T]) -> list[T] | None:
    """``one(i)`` for every matrix ``refs[i]``, in order: here (one process), or under torchrun
    this rank's share (shard-affine, balanced by cost: three decompositions per matrix) with
    every result gathered on rank 0 in the same order (None on the other ranks). A failure on
    any rank stops every rank with one error naming the rank and the matrix."""
    if job.session is None:
        out = []
        for i, ref in enumerate(refs):
            out.append(one(i))
            _tick(job, i + 1, len(refs), ref.key)
        return out
    session = job.session
    env = session.env
    mine = shard_items(refs, env.rank, env.world_size, cost=lambda r: 3 * matrix_cost(r))

    def work(tracker: Tracker) -> list[tuple[int, T]]:
        out = []
        for done, i in enumerate(mine):
            tracker.step(refs[i].key)
            out.append((i, one(i)))
            _tick(job, done + 1, len(mine), refs[i].key)
        return out

    status, part = guarded(session, work)
    settle(session, status, RERUN if job.cache is None else RESUME_FROM_CACHE)
    return gather_results(session, part or [], len(refs))


def _adapter_module(
    job: _Job, base: Checkpoint, ref: MatrixRef, peft: PeftAdapter, module: str
) -> tuple[MatrixMitigation, tuple[tuple[torch.Tensor, torch.Tensor], float] | None]:
    """One adapted module: its row and, when it has intruders, its new (A, B) and alpha."""
    opts = job.options
    w0, svd0 = _read_base(job, base, ref)
    a, b = (t.to(w0) for t in peft.factors[module])
    scale, rank, alpha = peft.scale(module), peft.rank(module), peft.alpha(module)
    w1 = w0 + scale * (b @ a)
    det = _examine(job, w0, w1, svd0)
    if not det.indices:
        return _row(
            ref,
            module,
            det,
            directions=(),
            intruders_after=0,
            rank=(rank, rank),
            alpha=(alpha, alpha),
        ), None
    u = det.u_top[:, list(det.indices)]
    if opts.rank_policy == "extend":
        a2, b2 = extend_factors(a, b, scale, (u, w1, opts.lam))
        alpha2 = new_alpha(scale, a2.shape[0], rslora=peft.settings.use_rslora)
        w_after = w0 + lora_scale_of(alpha2, a2.shape[0], peft) * (b2 @ a2)
    else:
        b2, a2 = refit_factors(w0, scale_directions(w1, u, opts.lam), rank, scale)
        alpha2 = alpha
        w_after = w0 + scale * (b2 @ a2)
    row = _row(
        ref,
        module,
        det,
        directions=moved_directions(det, opts.lam),
        intruders_after=_count_after(job, w0, w_after, svd0),
        rank=(rank, int(a2.shape[0])),
        alpha=(alpha, alpha2),
    )
    stored = peft.factors[module][0].dtype
    return row, ((a2.to("cpu", stored), b2.to("cpu", stored)), alpha2)


def lora_scale_of(alpha: float, rank: int, peft: PeftAdapter) -> float:
    """The scale PEFT gives a module of this alpha and rank under the adapter's rsLoRA flag."""
    return alpha / (math.sqrt(rank) if peft.settings.use_rslora else rank)


# ------------------------------------------------------------------ a checkpoint


def _mitigate_checkpoint(
    job: _Job, base: Checkpoint, ft: Checkpoint, inputs: tuple[str | Path, str | Path]
) -> tuple[list[MatrixMitigation] | None, Path | None]:
    """One process: every matrix examined and rewritten while its shard is written (one read
    each). Under torchrun: the ranks examine their shares (`_each`), rank 0 gathers each
    matrix's row and intruder directions and rewrites the intruder matrices while it writes,
    with the same `_rewrite` on the same bits, so the files are the one-process files."""
    pairing, b_refs = plan_pairs(base, ft, job.options.compare_options())
    f_refs = {m.key: m for m in ft.matrices()}
    todo = {f_refs[f].tensor.name: (b_refs[b], f_refs[f]) for b, f in pairing.pairs}
    _check_writable([f_refs[f] for _, f in pairing.pairs], list(ft.files))
    rows: list[MatrixMitigation] = []
    if job.session is None:

        def swap(name: str) -> torch.Tensor | None:
            if name not in todo:
                return None
            b_ref, f_ref = todo[name]
            row, new, _ = _checkpoint_matrix(job, _read_base(job, base, b_ref), ft, f_ref)
            rows.append(_with_key(row, b_ref))
            _tick(job, len(rows), len(todo), b_ref.key)
            return new

    else:
        pairs = list(todo.values())
        found = _each(
            job,
            [b for b, _ in pairs],
            lambda i: _examine_share(job, base, ft, pairs[i]),
        )
        if found is None:  # a torchrun rank other than 0
            return None, None
        rows = [_with_key(row, b_ref) for (row, _), (b_ref, _) in zip(found, pairs, strict=True)]
        if not any(r.changed for r in rows):
            return rows, None
        moved = {
            f.tensor.name: (f, u)
            for (_, u), (_, f) in zip(found, pairs, strict=True)
            if u is not None
        }

        def swap(name: str) -> torch.Tensor | None:
            if name not in moved:
                return None
            f_ref, u = moved[name]
            w1 = ft.read(f_ref, dtype=_work_dtype(job), device=str(job.device))
            return _layout(f_ref, _rewrite(job, f_ref, w1, u.to(w1.device)))

    order = [b.key for b, _ in todo.values()]
    return rows, _write_checkpoint(job, ft, rows, order, inputs, swap)


def _write_checkpoint(
    job: _Job,
    ft: Checkpoint,
    rows: list[MatrixMitigation],
    order: list[str],
    inputs: tuple[str | Path, str | Path],
    swap: Callable[[str], torch.Tensor | None],
) -> Path | None:
    """Stream FINETUNED's shards into the output folder through `swap`, with mitigation.json
    (rows in pairing order); None, and nothing left behind, when no matrix changed."""
    single_file = Path(str(inputs[1])).expanduser().is_file()
    if not single_file:  # a streamed Hub repo: its config and tokenizer files, beside
        ft.fetch_side_files(is_side_file)
    protect = (*inputs, *ft.files)
    try:
        with atomic_output_dir(job.out, force=job.force, protect=protect) as tmp:
            write_residual_checkpoint(
                list(ft.files), tmp, swap, copy_files=not single_file, opener=ft.open_shard
            )
            if not any(r.changed for r in rows):
                raise _NothingToWrite
            position = {key: i for i, key in enumerate(order)}
            rows.sort(key=lambda r: position[r.key])
            text = _report_text(job, rows, inputs, "checkpoint")
            (tmp / REPORT_NAME).write_text(text, encoding="utf-8")
    except _NothingToWrite:
        return None
    return job.out.expanduser().absolute()


def _examine_share(
    job: _Job, base: Checkpoint, ft: Checkpoint, pair: tuple[MatrixRef, MatrixRef]
) -> tuple[MatrixMitigation, torch.Tensor | None]:
    """A torchrun rank's work on one matrix: its row and its intruder directions (U_I, on the
    CPU; None: unchanged). The rewritten matrix is left to rank 0's writer."""
    b_ref, f_ref = pair
    row, _, u = _checkpoint_matrix(job, _read_base(job, base, b_ref), ft, f_ref)
    return row, None if u is None else u.cpu()


def _with_key(row: MatrixMitigation, b_ref: MatrixRef) -> MatrixMitigation:
    return MatrixMitigation(**{**row.__dict__, "key": b_ref.key})


def _check_writable(refs: list[MatrixRef], files: list[Path]) -> None:
    """Refuse before anything is written what the safetensors residual writer cannot rewrite."""
    for f in files:
        if not f.name.endswith(".safetensors"):
            raise ValidationError(
                f"FINETUNED file {clip(f.name)} is not safetensors: mitigate rewrites safetensors "
                "checkpoints (and PEFT adapters) only"
            )
    for ref in refs:
        if ref.encoded is not None:
            raise ValidationError(
                f"{clip(ref.key)} is stored quantized ({ref.storage}): spectra cannot "
                "re-quantize a mitigated matrix; dequantize the checkpoint first, or leave it "
                "out with --exclude"
            )
        if ref.key != ref.tensor.name:
            raise ValidationError(
                f"{clip(ref.key)} is one slice of the 3-D tensor {clip(ref.tensor.name)}: "
                "mitigating expert stacks is not supported; leave them out with --exclude"
            )
        if ref.tensor.dtype not in RESIDUAL_DTYPES or not ref.tensor.dtype.startswith(("F", "B")):
            raise ValidationError(
                f"{clip(ref.key)} is stored as {ref.tensor.dtype}: spectra can only rewrite "
                "float32/float16/bfloat16/float64 matrices; leave it out with --exclude"
            )


def _checkpoint_matrix(
    job: _Job, base: tuple[torch.Tensor, Svd], ft: Checkpoint, ref: MatrixRef
) -> tuple[MatrixMitigation, torch.Tensor | None, torch.Tensor | None]:
    """One fine-tuned matrix: its row, W' in the stored dtype and layout, and the intruder
    directions U_I (both None: unchanged)."""
    w0, svd0 = base
    w1 = ft.read(ref, dtype=w0.dtype, device=str(w0.device))
    det = _examine(job, w0, w1, svd0)
    if not det.indices:
        return _row(ref, ref.key, det, directions=(), intruders_after=0), None, None
    u = det.u_top[:, list(det.indices)]  # a copy: contiguous, as when it comes from a rank
    stored = _rewrite(job, ref, w1, u)
    row = _row(
        ref,
        ref.key,
        det,
        directions=moved_directions(det, job.options.lam),
        intruders_after=_count_after(job, w0, stored.to(w0.dtype), svd0),
    )
    return row, _layout(ref, stored), u


def _rewrite(job: _Job, ref: MatrixRef, w1: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """W' = W_t - (1 - lambda) U_I U_I^T W_t, rounded to the dtype ``ref`` is stored in."""
    return scale_directions(w1, u, job.options.lam).to(storage_dtype(ref.tensor.dtype))


def _layout(ref: MatrixRef, stored: torch.Tensor) -> torch.Tensor:
    """A rewritten (out, in) matrix as the file stores it (GPT-2 Conv1D: transposed), on the CPU."""
    out = stored.mT if ref.transpose else stored
    return out.contiguous().cpu()


def _work_dtype(job: _Job) -> torch.dtype:
    """The working dtype of every decomposition: float64 (float32 on mps, which has none)."""
    return torch.float32 if job.device.type == "mps" else torch.float64


def _report_text(
    job: _Job, rows: list[MatrixMitigation], inputs: tuple[str | Path, str | Path], mode: str
) -> str:
    result = Mitigation(
        base=str(inputs[0]),
        finetuned=str(inputs[1]),
        mode=mode,
        options=job.options,
        matrices=tuple(rows),
        out=job.out.expanduser().absolute(),
        versions=runtime_versions(),
        commits=job.commits,
    )
    return result.to_json() + "\n"


def nothing_message(result: Mitigation) -> str:
    """The note for a run that found no intruder (nothing written)."""
    opts = result.options
    return (
        f"no intruder dimensions: none of the top-{opts.k} left singular vectors of the "
        f"{len(result.matrices)} matrices compared has max |cos| < {opts.epsilon:g} against "
        "the base; nothing to mitigate, nothing written (a larger --epsilon or --k finds more)"
    )
