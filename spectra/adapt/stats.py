"""Streaming statistics of layer inputs, and their safetensors file format.

Two accumulators, both fed one batch of token rows ``x (tokens, features)`` at a time, so memory is
bounded by one batch plus a ``(features, features)`` matrix (covariance) or a ``(k, features)``
basis (SVD), never by the calibration set:

- `CovarianceAccumulator`: ``sum x^T x`` and the token count in float64 (CorDA, arXiv 2406.05223,
  normalizes by the number of tokens: ``C = X^T X / count``).
- `IncrementalSVD`: the top right singular vectors of the *mean-centred* inputs, updated batch by
  batch with the mean-corrected merge of Ross, Lim, Lin & Yang (2008, "Incremental learning for
  robust visual tracking", sec. 3.1): stack ``diag(S) Vh`` of the data so far, the centred new
  batch, and one row ``sqrt(n m / (n + m)) (mean_old - mean_new)``; the SVD of that stack is the
  SVD of all data centred on the merged mean, up to the truncation to the kept components. Each
  update records, per component, the absolute cosine between the new and the previous right
  singular vector (sign-invariant); EVA (arXiv 2410.07170) stops when those reach ``tau``.
  The merge needs only the top ``keep`` singular triplets of that stack, so it does not run a
  full SVD of it: `top_right_singular` runs subspace iteration with a Rayleigh-Ritz step
  (Halko, Martinsson & Tropp 2011, "Finding structure with randomness", Alg. 4.4 / 5.1), started
  from the previous basis plus a seeded sketch of the stack, until every kept triplet's residual
  ``||M^T u_j - s_j v_j|| / s_1`` is below ``MERGE_TOL``; past ``MERGE_MAX_ITERS`` iterations, or
  when the stack is too small for iteration to pay, it takes the full SVD (the old route).

`CalibrationStats` bundles the per-layer results; `save_stats` / `load_stats` write and read it as
one safetensors file (``--stats-out`` / ``--stats``) with the bookkeeping in its metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from spectra.errors import SourceError, ValidationError
from spectra.formats.files import check_input

STATS_FORMAT = "spectra.calibration/1"
# Components kept beyond the requested k: the truncation after each merge drops information about
# directions just below the top k; a few spare ones make the top k match a one-shot SVD closely.
DEFAULT_SPARE_COMPONENTS = 8
# The merge's subspace iteration (`top_right_singular`): sketch columns beyond the kept ones, the
# residual every kept triplet must reach (relative to the top singular value; in float64 the
# floor is ~1e-14), and the iterations after which the full SVD is taken instead. A kept
# triplet's angle to the exact one is at most its residual over its relative gap (Davis-Kahan).
MERGE_OVERSAMPLE = 16
MERGE_TOL = 1e-9
MERGE_MAX_ITERS = 30
MERGE_ROUTES = ("iterate", "full")


class CovarianceAccumulator:
    """Running ``X^T X`` (float64 by default) and token count for one layer input.

    >>> acc = CovarianceAccumulator(3)
    >>> acc.update(torch.eye(3))
    >>> acc.covariance().diagonal().tolist()
    [0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
    """

    def __init__(
        self, features: int, *, device: torch.device | str = "cpu", dtype=torch.float64
    ) -> None:
        self.sum = torch.zeros(features, features, device=device, dtype=dtype)  # (in, in)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x (tokens, features)``."""
        x = x.to(device=self.sum.device, dtype=self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.count += int(x.shape[0])

    def covariance(self) -> torch.Tensor:
        """``X^T X / count`` (uncentred second moment, as CorDA uses it), shape (in, in)."""
        if self.count == 0:
            raise ValidationError("no tokens were accumulated: the calibration data is empty")
        return self.sum / self.count


def top_right_singular(
    M: torch.Tensor,
    keep: int,
    *,
    start: torch.Tensor | None = None,
    seed: int = 0,
    converge: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Top ``keep`` singular values ``(q,)`` and right singular vectors ``(q, n)`` of ``M (m, n)``
    (``q = min(keep, m, n)``), and the subspace iterations used (0: the full SVD was taken).

    ``start (s, n)``: rows whose span is expected to be close to the answer (the previous basis of
    an incremental SVD); the rest of the search space is a Gaussian sketch ``M^T Omega`` seeded by
    ``seed`` (the same numbers on every device). Each iteration: ``Y = M Z``, ``Y = U S W^T``,
    Ritz vectors ``V = Z W``, then ``P = M^T U`` gives the residuals ``||P_j - S_j V_j|| / S_1``
    and the next basis ``orth(P)``. Stops when the first ``converge`` (default ``keep``)
    residuals are <= MERGE_TOL. Without ``start`` the search space starts as the top
    eigenvectors of ``M^T M`` (tall ``M``; a wide one takes the full SVD).

    >>> g = torch.Generator().manual_seed(0)
    >>> M = torch.randn(300, 200, dtype=torch.float64, generator=g) * torch.logspace(0, -2, 200)
    >>> S, Vh, iterations = top_right_singular(M, 5, start=torch.linalg.svd(M[:250])[2][:5])
    >>> torch.allclose(S, torch.linalg.svdvals(M)[:5], rtol=1e-12), iterations > 0
    (True, True)
    """
    rows, n = M.shape
    small = min(rows, n)
    q = min(keep, small)
    width = min(q + MERGE_OVERSAMPLE, small)
    if 4 * width > small:  # iterating would cost about as much as the full SVD
        return (*_full_top(M, q), 0)
    if start is not None and start.shape[0]:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        warm = start[: width - 1].mT.to(M)  # (n, s)
        omega = torch.randn(rows, width - warm.shape[1], generator=gen, dtype=torch.float64)
        basis = torch.cat([warm, M.mT @ omega.to(M)], dim=1)  # (n, width)
    elif rows >= n:
        # cold start (first batch): the top eigenvectors of the (n, n) Gram matrix, about half
        # the cost of the full SVD; the iteration below then checks (and polishes) them against
        # M itself, so their squared-condition rounding does not reach the result
        basis = torch.linalg.eigh(M.mT @ M).eigenvectors[:, n - width :]
    else:
        return (*_full_top(M, q), 0)
    Z = torch.linalg.qr(basis).Q
    checked = q if converge is None else min(q, converge)
    for iteration in range(1, MERGE_MAX_ITERS + 1):
        U, S, Wh = torch.linalg.svd(M @ Z, full_matrices=False)
        V = Z @ Wh.mT  # (n, width) Ritz vectors
        P = M.mT @ U  # (n, width) = G V / S
        top = float(S[0])
        if top == 0.0:
            return S[:q], V[:, :q].mT.contiguous(), iteration
        residual = (P[:, :checked] - V[:, :checked] * S[:checked]).norm(dim=0) / top
        if bool((residual <= MERGE_TOL).all()):
            return S[:q], V[:, :q].mT.contiguous(), iteration
        Z = torch.linalg.qr(P).Q
    return (*_full_top(M, q), 0)


def _full_top(M: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, values, vh = torch.linalg.svd(M, full_matrices=False)
    return values[:q], vh[:q]


@dataclass
class SVDState:
    """Result of an `IncrementalSVD`: top components of the centred inputs of one layer.

    ``components (k, in)`` rows are unit right singular vectors, descending by ``values (k,)``;
    ``total_ss`` is the total centred sum of squares (so ``values**2 / total_ss`` is the explained
    variance ratio); ``converged (k,)`` says which components met ``tau`` at the last update.
    """

    components: torch.Tensor
    values: torch.Tensor
    mean: torch.Tensor
    total_ss: float
    count: int
    converged: torch.Tensor
    batches: int

    def explained_variance_ratio(self) -> torch.Tensor:
        """``S_i^2 / total centred sum of squares`` per kept component, float64."""
        if self.total_ss <= 0:
            return torch.zeros_like(self.values, dtype=torch.float64)
        return self.values.double() ** 2 / self.total_ss


class IncrementalSVD:
    """Mean-centred incremental SVD of streamed rows (Ross et al. 2008), top-k with convergence.

    Args:
        k: number of components whose convergence is tracked and that are reported.
        features: row width (the layer's ``in_features``).
        tau: a component has converged when ``|cos(v_new, v_old)| >= tau`` after an update.
        spare: extra components kept internally for accuracy (not reported).
        merge: "iterate" (default): each merge computes only the kept components
            (`top_right_singular`, warm-started from the previous basis, converged on the first
            k); "full": the full SVD of the stack (the reference route, same result to
            MERGE_TOL).

    >>> svd = IncrementalSVD(2, 4, tau=0.99)
    >>> svd.update(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)))
    >>> svd.state().components.shape
    torch.Size([2, 4])
    """

    def __init__(
        self,
        k: int,
        features: int,
        *,
        tau: float = 0.99,
        spare: int = DEFAULT_SPARE_COMPONENTS,
        device: torch.device | str = "cpu",
        dtype=torch.float64,
        merge: str = "iterate",
    ) -> None:
        if merge not in MERGE_ROUTES:
            raise ValidationError(f"merge must be one of {MERGE_ROUTES}, got {merge!r}")
        if not 1 <= k <= features:
            raise ValidationError(f"k must be in [1, {features}] (the input width), got {k}")
        if not 0.0 < tau <= 1.0:
            raise ValidationError(f"tau must be in (0, 1], got {tau}")
        self.k, self.features, self.tau, self.merge = k, features, tau, merge
        self.keep = min(features, k + max(0, spare))
        self.device, self.dtype = torch.device(device), dtype
        self.values = torch.zeros(0, device=self.device, dtype=dtype)  # (q,)
        self.vh = torch.zeros(0, features, device=self.device, dtype=dtype)  # (q, in)
        self.mean = torch.zeros(features, device=self.device, dtype=dtype)
        self.total_ss = 0.0
        self.count = 0
        self.batches = 0
        self.cosines = torch.zeros(k, dtype=torch.float64)
        self.iterations = 0  # subspace iterations of the last merge (0: full SVD)

    def update(self, x: torch.Tensor) -> None:
        """Merge rows ``x (m, features)``; records per-component cosines to the last basis."""
        x = x.to(device=self.device, dtype=self.dtype)
        m = int(x.shape[0])
        if m == 0:
            return
        batch_mean = x.mean(dim=0)
        centred = x - batch_mean  # (m, in)
        n = self.count
        stack = [self.values[:, None] * self.vh, centred]
        batch_ss = float(centred.square().sum())
        if n > 0:
            weight = math.sqrt(n * m / (n + m))
            shift = self.mean - batch_mean
            stack.append(weight * shift[None, :])
            batch_ss += weight**2 * float(shift.square().sum())
        stacked = torch.cat(stack)
        if self.merge == "full":
            values, vh = _full_top(stacked, min(self.keep, *stacked.shape))
            self.iterations = 0
        else:
            values, vh, self.iterations = top_right_singular(
                stacked, self.keep, start=self.vh, seed=self.batches, converge=self.k
            )
        previous = self.vh[: self.k]
        self.values, self.vh = values, vh
        self.mean = (n * self.mean + m * batch_mean) / (n + m)
        self.total_ss += batch_ss
        self.count += m
        self.batches += 1
        self._track(previous)

    def _track(self, previous: torch.Tensor) -> None:
        cos = torch.zeros(self.k, dtype=torch.float64)
        shared = min(previous.shape[0], self.vh.shape[0], self.k)
        if shared:
            dots = (self.vh[:shared] * previous[:shared]).sum(dim=1).abs()
            cos[:shared] = dots.double().cpu()
        self.cosines = cos

    def converged(self, upto: int | None = None) -> bool:
        """True when the first `upto` (default k) components met tau at the last update."""
        upto = self.k if upto is None else min(upto, self.k)
        return bool((self.cosines[:upto] >= self.tau).all()) and self.batches > 1

    def state(self) -> SVDState:
        """Top-k result (fewer rows if fewer than k rows were seen), on cpu."""
        top = min(self.k, self.vh.shape[0])
        return SVDState(
            components=self.vh[:top].cpu(),
            values=self.values[:top].cpu(),
            mean=self.mean.cpu(),
            total_ss=self.total_ss,
            count=self.count,
            converged=(self.cosines[:top] >= self.tau) & (self.batches > 1),
            batches=self.batches,
        )


@dataclass(frozen=True)
class CalibrationStats:
    """Per-layer input statistics from calibration forward passes.

    Keys are module names (``encoder.layer.0.attention.self.query``). Layers that receive the same
    input tensor share one computation: ``shared[member] = leader`` and only the leader has
    entries in `covariances`/`counts`/`svd`. `skipped` maps a module to the reason it has none.
    """

    covariances: Mapping[str, torch.Tensor] = field(default_factory=dict)  # (in, in) float64
    counts: Mapping[str, int] = field(default_factory=dict)
    svd: Mapping[str, SVDState] = field(default_factory=dict)
    shared: Mapping[str, str] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, object] = field(default_factory=dict)

    def leader(self, module: str) -> str:
        """The module whose statistics `module` uses (itself unless it shares an input)."""
        return self.shared.get(module, module)

    def modules(self) -> list[str]:
        """Every module with statistics, members of shared groups included, sorted."""
        leaders = set(self.covariances) | set(self.svd)
        return sorted(leaders | {m for m, lead in self.shared.items() if lead in leaders})

    def covariance(self, module: str) -> torch.Tensor:
        """``C = X^T X / tokens`` of the module's input (float64, (in, in))."""
        lead = self.leader(module)
        if lead not in self.covariances:
            raise ValidationError(self._missing(module, "covariance"))
        return self.covariances[lead]

    def svd_state(self, module: str) -> SVDState:
        """The incremental SVD of the module's centred input."""
        lead = self.leader(module)
        if lead not in self.svd:
            raise ValidationError(self._missing(module, "activation SVD"))
        return self.svd[lead]

    def _missing(self, module: str, what: str) -> str:
        if module in self.skipped:
            return f"no {what} for {module}: skipped during calibration ({self.skipped[module]})"
        return (
            f"no {what} for {module} in these calibration statistics: "
            "recompute them for this method and these targets (drop --stats)"
        )


def save_stats(path: str | Path, stats: CalibrationStats) -> Path:
    """Write `stats` to one safetensors file; bookkeeping (shared, skipped, info) in metadata."""
    tensors: dict[str, torch.Tensor] = {}
    svd_meta: dict[str, dict[str, object]] = {}
    for name, cov in stats.covariances.items():
        tensors[f"cov::{name}"] = cov.detach().cpu().contiguous()
    for name, st in stats.svd.items():
        tensors[f"svd::{name}::components"] = st.components.contiguous()
        tensors[f"svd::{name}::values"] = st.values.contiguous()
        tensors[f"svd::{name}::mean"] = st.mean.contiguous()
        tensors[f"svd::{name}::converged"] = st.converged.to(torch.uint8).contiguous()
        svd_meta[name] = {"total_ss": st.total_ss, "count": st.count, "batches": st.batches}
    meta = {
        "counts": dict(stats.counts),
        "svd": svd_meta,
        "shared": dict(stats.shared),
        "skipped": dict(stats.skipped),
        "info": dict(stats.info),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": STATS_FORMAT, "stats": json.dumps(meta)})
    return path


def load_stats(path: str | Path) -> CalibrationStats:
    """Read a file written by `save_stats`; anything unreadable, damaged or inconsistent in it
    is a ValidationError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ValidationError(f"statistics file {path} does not exist (write one with --stats-out)")
    try:
        check_input(path, "statistics file")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATS_FORMAT:
                raise ValidationError(
                    f"{path} is not a spectra calibration-statistics file "
                    f"(format {metadata.get('format')!r}, expected {STATS_FORMAT!r})"
                )
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, RuntimeError, SafetensorError, SourceError) as exc:
        raise ValidationError(f"cannot read statistics file {path}: {exc}") from exc
    try:
        return _stats_from(metadata, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValidationError(
            f"statistics file {path} is damaged ({type(exc).__name__}: {exc}): "
            "recompute it with --stats-out"
        ) from exc


def _section(meta: dict[str, Any], name: str, value_type: type | tuple[type, ...]) -> dict:
    """``meta[name]``: a dict of str -> ``value_type`` (TypeError/KeyError otherwise)."""
    part = meta[name]
    if not isinstance(part, dict) or not all(
        isinstance(k, str) and isinstance(v, value_type) for k, v in part.items()
    ):
        raise TypeError(f"metadata {name!r} is not a mapping of names to {value_type}")
    return part


def _stats_from(metadata: Mapping[str, str], tensors: dict[str, torch.Tensor]) -> CalibrationStats:
    """The CalibrationStats in a statistics file's metadata and tensors (raises KeyError,
    TypeError or ValueError on anything missing or of the wrong kind)."""
    meta = json.loads(metadata["stats"])
    if not isinstance(meta, dict):
        raise TypeError("metadata 'stats' is not a JSON object")
    covariances = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("cov::")}
    svd = {
        name: SVDState(
            components=tensors[f"svd::{name}::components"],
            values=tensors[f"svd::{name}::values"],
            mean=tensors[f"svd::{name}::mean"],
            total_ss=float(extra["total_ss"]),
            count=int(extra["count"]),
            converged=tensors[f"svd::{name}::converged"].bool(),
            batches=int(extra["batches"]),
        )
        for name, extra in _section(meta, "svd", dict).items()
    }
    return CalibrationStats(
        covariances=covariances,
        counts={k: int(v) for k, v in _section(meta, "counts", (int, float, str)).items()},
        svd=svd,
        shared=_section(meta, "shared", str),
        skipped=_section(meta, "skipped", str),
        info=_section(meta, "info", object),
    )
