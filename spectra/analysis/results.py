"""Result dataclasses of the HT-SR analysis: one fit, one matrix, one model.

Every class is frozen and has `to_dict()` returning JSON-safe values (NaN and +-inf become
None, tuples become lists). `Analysis` adds JSON/CSV/pandas export and a JSON round trip; its
`esds` (eigenvalues per matrix, for plots) stay out of the JSON.

Field definitions: docs/methods.md section 2 (WeightWatcher 0.7.x conventions).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from spectra.analysis.csvsafe import write_csv
from spectra.errors import OutputError, ValidationError
from spectra.formats.files import MAX_JSON_BYTES, read_text_input

FIT_STATUSES = ("ok", "failed", "skipped")

# Warning codes a LayerMetrics may carry (stable strings: reports and users filter on them).
WARNING_CODES = {
    "under-trained": "alpha > 6: heavy-tailed structure is weak (Martin & Mahoney)",
    "over-trained": "alpha < 2: very heavy tail, possible over-fitting or dominant directions",
    "fit-failed": "the power-law fit failed (see fit_message)",
    "non-finite": "the matrix has NaN or Inf entries; metrics are not computed",
    "rank-deficient": "numerical rank below half of min(m, n)",
}


def json_safe(value: Any) -> Any:
    """`value` with NaN/inf -> None, tuples -> lists, numpy scalars -> Python (recursive)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _none_to_nan(value: Any) -> Any:
    return float("nan") if value is None else value


@dataclass(frozen=True)
class PowerLawFit:
    """Clauset-Shalizi-Newman continuous power-law fit of an ESD tail.

    alpha: exponent of p(lambda) ~ lambda^-alpha on [xmin, xmax]; xmin chosen by minimum KS
    distance D; sigma = (alpha - 1) / sqrt(num_spikes) (standard error); num_spikes: tail size.
    status "ok" | "failed" | "skipped" (too few eigenvalues); numbers are None unless "ok".
    """

    alpha: float | None
    xmin: float | None
    xmax: float | None
    D: float | None
    sigma: float | None
    num_spikes: int
    status: str
    message: str = ""

    def __post_init__(self) -> None:
        if self.status not in FIT_STATUSES:
            raise ValidationError(f"fit status {self.status!r} is not one of {FIT_STATUSES}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class LayerMetrics:
    """HT-SR metrics of one weight matrix W (m, n) = (out, in); lambda = S^2 (not normalized).

    See methods.md section 2 for every definition. Numbers that could not be computed are None
    (never a made-up value); `warnings` holds codes from WARNING_CODES.
    """

    key: str
    name: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    dtype: str
    num_evals: int
    alpha: float | None
    alpha_weighted: float | None
    xmin: float | None
    xmax: float | None
    D: float | None
    sigma: float | None
    num_pl_spikes: int
    fit_status: str
    fit_message: str
    log_norm: float | None
    log_spectral_norm: float | None
    stable_rank: float | None
    log_alpha_norm: float | None
    entropy: float | None
    numerical_rank: int | None
    mp_bulk_max: float | None = None
    mp_num_spikes: int | None = None
    rand_distance: float | None = None
    outlier_ratio: float | None = None
    warnings: tuple[str, ...] = ()
    spectrum_method: str = ""
    # WeightWatcher 0.7.7 columns (methods.md section 2, "WeightWatcher columns")
    rank_loss: int | None = None
    weak_rank_loss: int | None = None
    sv_max: float | None = None
    sv_min: float | None = None
    sigma_mp: float | None = None
    mp_softrank: float | None = None
    rand_num_spikes: int | None = None
    ww_softrank: float | None = None
    num_fingers: int | None = None
    raw_alpha: float | None = None
    detX_num: int | None = None  # WeightWatcher's column names
    detX_val: float | None = None
    alpha_ci_low: float | None = None
    alpha_ci_high: float | None = None
    bulk_mean_vec_entropy: float | None = None
    bulk_var_vec_entropy: float | None = None
    tail_mean_vec_entropy: float | None = None
    tail_var_vec_entropy: float | None = None
    bulk_mean_loc_ratio: float | None = None
    bulk_var_loc_ratio: float | None = None
    tail_mean_loc_ratio: float | None = None
    tail_var_loc_ratio: float | None = None
    bulk_mean_part_ratio: float | None = None
    bulk_var_part_ratio: float | None = None
    tail_mean_part_ratio: float | None = None
    tail_var_part_ratio: float | None = None
    num_traps: int | None = None
    traps: tuple[dict[str, Any], ...] = ()
    # fit options (methods.md section 2g): the TPL's cutoff (WeightWatcher's column name),
    # the entropy of the KS distances over xmin, the likelihood-ratio choice of distribution
    Lambda: float | None = None
    fit_entropy: float | None = None
    best_fit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerMetrics:
        """Inverse of `to_dict` (None stays None; shape and warnings become tuples)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["shape"] = tuple(kwargs["shape"])
        kwargs["warnings"] = tuple(kwargs.get("warnings") or ())
        kwargs["traps"] = tuple(kwargs.get("traps") or ())
        return cls(**kwargs)


@dataclass(frozen=True)
class GroupSummary:
    """Aggregate over a group of matrices (one role, or one depth). Means skip failed fits."""

    count: int
    mean_alpha: float | None
    median_alpha: float | None
    warned: int

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class ModelSummary:
    """Model-level view: counts, warned share, per-role and per-depth groups, standouts.

    standouts: list of {"key", "metric", "value", "reason"} dicts, most notable first.
    means: WeightWatcher's get_summary(): the mean of each of SUMMARY_METRICS over the matrices
    that have a value (a metric no matrix has is left out).
    """

    num_matrices: int
    num_warned: int
    warned_share: float | None
    mean_alpha: float | None
    by_role: dict[str, GroupSummary] = field(default_factory=dict)
    by_depth: dict[int, GroupSummary] = field(default_factory=dict)
    standouts: list[dict[str, Any]] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_matrices": self.num_matrices,
            "num_warned": self.num_warned,
            "warned_share": json_safe(self.warned_share),
            "mean_alpha": json_safe(self.mean_alpha),
            "by_role": {k: v.to_dict() for k, v in self.by_role.items()},
            "by_depth": {str(k): v.to_dict() for k, v in self.by_depth.items()},
            "standouts": json_safe(self.standouts),
            "means": json_safe(self.means),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSummary:
        return cls(
            num_matrices=int(data["num_matrices"]),
            num_warned=int(data["num_warned"]),
            warned_share=data.get("warned_share"),
            mean_alpha=data.get("mean_alpha"),
            by_role={k: GroupSummary(**v) for k, v in data.get("by_role", {}).items()},
            by_depth={int(k): GroupSummary(**v) for k, v in data.get("by_depth", {}).items()},
            standouts=list(data.get("standouts", [])),
            means=dict(data.get("means", {})),
        )


#: Order of the roles inside an MoE expert in tables (an unknown one, None, last).
EXPERT_ROLE_ORDER = ("gate", "up", "gate_up", "down")


def expert_role_rank(role: str | None) -> int:
    """Position of a role inside an expert in EXPERT_ROLE_ORDER (unknown: after all)."""
    return EXPERT_ROLE_ORDER.index(role) if role in EXPERT_ROLE_ORDER else len(EXPERT_ROLE_ORDER)


@dataclass(frozen=True)
class ExpertOverlap:
    """The pairwise overlaps of the routed experts of one layer and one role inside them.

    side: "in" or "out" (module docstring); dim: d; k: the basis size used; baseline: k / d,
    the expectation for independent random subspaces; experts: expert indices (the rows and
    columns of `overlap`); redundant: (i, j, overlap) for i < j with overlap >= REDUNDANT
    (spectra.analysis.expert_overlap), largest first.
    """

    layer: int | None
    expert_role: str | None
    side: str
    dim: int
    k: int
    baseline: float
    experts: tuple[int, ...]
    overlap: tuple[tuple[float, ...], ...]
    redundant: tuple[tuple[int, int, float], ...]

    @property
    def mean_offdiag(self) -> float | None:
        """Mean overlap over the pairs i != j (None for a single expert)."""
        mat = np.asarray(self.overlap, dtype=np.float64)
        n = mat.shape[0]
        if n < 2:
            return None
        return float((mat.sum() - np.trace(mat)) / (n * (n - 1)))

    def to_dict(self) -> dict[str, Any]:
        out = json_safe(asdict(self))
        out["mean_offdiag"] = json_safe(self.mean_offdiag)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertOverlap:
        return cls(
            layer=data.get("layer"),
            expert_role=data.get("expert_role"),
            side=data["side"],
            dim=int(data["dim"]),
            k=int(data["k"]),
            baseline=float(data["baseline"]),
            experts=tuple(int(e) for e in data["experts"]),
            overlap=tuple(tuple(float(v) for v in row) for row in data["overlap"]),
            redundant=tuple((int(i), int(j), float(v)) for i, j, v in data["redundant"]),
        )


@dataclass(frozen=True)
class ExpertGroup:
    """The routed experts of one layer and one role inside the expert (one per expert index).

    keys / alphas are parallel to `experts` (ascending); alpha None: no fit; summary: count,
    mean / median alpha and warned count over the group; overlap: the expert similarity of
    the group when computed (None otherwise).
    """

    layer: int | None
    expert_role: str | None
    experts: tuple[int, ...]
    keys: tuple[str, ...]
    alphas: tuple[float | None, ...]
    summary: GroupSummary
    overlap: ExpertOverlap | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "expert_role": self.expert_role,
            "experts": list(self.experts),
            "keys": list(self.keys),
            "alphas": json_safe(self.alphas),
            "summary": self.summary.to_dict(),
            "overlap": None if self.overlap is None else self.overlap.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertGroup:
        overlap = data.get("overlap")
        return cls(
            layer=data.get("layer"),
            expert_role=data.get("expert_role"),
            experts=tuple(int(e) for e in data["experts"]),
            keys=tuple(data["keys"]),
            alphas=tuple(data["alphas"]),
            summary=GroupSummary(**data["summary"]),
            overlap=None if overlap is None else ExpertOverlap.from_dict(overlap),
        )


@dataclass(frozen=True)
class MoeSummary:
    """Routed experts grouped by layer and role, aggregates over them, router and shared
    experts listed apart.

    num_experts: layer -> number of distinct routed experts analysed there; groups: one
    ExpertGroup per (layer, role inside the expert), by layer then role; by_expert_role /
    by_layer: aggregates over routed experts only; routers / shared: the keys of the router
    and shared-expert matrices analysed (their metrics are in `Analysis.layers`).
    """

    num_experts: dict[int | None, int]
    groups: tuple[ExpertGroup, ...]
    by_expert_role: dict[str, GroupSummary] = field(default_factory=dict)
    by_layer: dict[int, GroupSummary] = field(default_factory=dict)
    routers: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_experts": {str(k): v for k, v in self.num_experts.items()},
            "groups": [g.to_dict() for g in self.groups],
            "by_expert_role": {k: v.to_dict() for k, v in self.by_expert_role.items()},
            "by_layer": {str(k): v.to_dict() for k, v in self.by_layer.items()},
            "routers": list(self.routers),
            "shared": list(self.shared),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoeSummary:
        return cls(
            num_experts={_layer_key(k): int(v) for k, v in data["num_experts"].items()},
            groups=tuple(ExpertGroup.from_dict(g) for g in data["groups"]),
            by_expert_role={k: GroupSummary(**v) for k, v in data["by_expert_role"].items()},
            by_layer={int(k): GroupSummary(**v) for k, v in data["by_layer"].items()},
            routers=tuple(data.get("routers", ())),
            shared=tuple(data.get("shared", ())),
        )

    def with_overlaps(
        self, overlaps: dict[tuple[int | None, str | None], ExpertOverlap]
    ) -> MoeSummary:
        """A copy whose groups carry the overlap computed for their (layer, expert_role)."""
        groups = tuple(
            replace(g, overlap=overlaps.get((g.layer, g.expert_role), g.overlap))
            for g in self.groups
        )
        return replace(self, groups=groups)


def _layer_key(text: str) -> int | None:
    return None if text == "None" else int(text)


@dataclass(frozen=True)
class SkippedMatrix:
    """A matrix the size filters (min_evals, max_evals, max_n) left out, and why."""

    key: str
    shape: tuple[int, int]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


# Column order of the CSV / DataFrame: one row per matrix.
CSV_COLUMNS = tuple(f.name for f in fields(LayerMetrics))


@dataclass(frozen=True)
class Analysis:
    """What `spectra.analyze()` returns: per-matrix metrics, a summary, and the ESDs for plots.

    source: what was opened; options: the analyze() options used (JSON-safe); esds: eigenvalues
    lambda = S^2 per key (float64, descending), not written to JSON; versions: package versions;
    moe: the mixture-of-experts view (routed experts by layer and role, their similarity, the
    router and shared experts apart), None for a model without routed experts.
    """

    source: str
    layers: list[LayerMetrics]
    summary: ModelSummary
    options: dict[str, Any] = field(default_factory=dict)
    esds: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    versions: dict[str, str] = field(default_factory=dict)
    skipped: list[SkippedMatrix] = field(default_factory=list)
    commit: str | None = None  # a Hub source's resolved commit (absent from JSON for local)
    moe: MoeSummary | None = None  # mixture-of-experts view (absent from JSON without experts)

    def layer(self, key: str) -> LayerMetrics:
        """The metrics of matrix `key` (raises ValidationError naming close keys if absent)."""
        for lm in self.layers:
            if lm.key == key:
                return lm
        close = [lm.key for lm in self.layers if key in lm.key][:5]
        raise ValidationError(f"no matrix {key!r} in this analysis; similar keys: {close}")

    def to_dict(self) -> dict[str, Any]:
        commit = {} if self.commit is None else {"commit": self.commit}
        moe = {} if self.moe is None else {"moe": self.moe.to_dict()}
        return {
            "source": self.source,
            **commit,
            "options": json_safe(self.options),
            "versions": json_safe(self.versions),
            "summary": self.summary.to_dict(),
            **moe,
            "layers": [lm.to_dict() for lm in self.layers],
            "skipped": [sk.to_dict() for sk in self.skipped],
        }

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """JSON text (strict: no NaN tokens); also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            _write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Analysis:
        """Rebuild an Analysis from `to_json()` output (a JSON string or a file path); no esds."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = read_text_input(Path(text_or_path), MAX_JSON_BYTES, "analysis JSON")
        data = json.loads(text)
        return cls(
            source=data["source"],
            layers=[LayerMetrics.from_dict(d) for d in data["layers"]],
            summary=ModelSummary.from_dict(data["summary"]),
            options=data.get("options", {}),
            versions=data.get("versions", {}),
            skipped=[
                SkippedMatrix(d["key"], tuple(d["shape"]), d["reason"])
                for d in data.get("skipped", [])
            ],
            commit=data.get("commit"),
            moe=None if data.get("moe") is None else MoeSummary.from_dict(data["moe"]),
        )

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per matrix (shape as "m x n", warnings joined by ';')."""
        out = []
        for lm in self.layers:
            row = lm.to_dict()
            row["shape"] = f"{lm.shape[0]}x{lm.shape[1]}"
            row["warnings"] = ";".join(lm.warnings)
            row["traps"] = ";".join(f"{t['row']},{t['col']}" for t in lm.traps)
            out.append(row)
        return out

    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV text, one row per matrix, columns CSV_COLUMNS; empty cells for None. Names are
        written inert (`csvsafe`: no control characters, no cell a spreadsheet runs as a
        formula); numbers stay numbers."""
        text = write_csv(self.rows(), CSV_COLUMNS)
        if path is not None:
            _write_text(path, text)
        return text

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per matrix (None -> NaN). Needs pandas installed."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ValidationError(
                "to_pandas() needs pandas: pip install pandas (or use to_csv()/to_dict())"
            ) from exc
        rows = [{k: _none_to_nan(v) for k, v in row.items()} for row in self.rows()]
        return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def _write_text(path: str | Path, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def runtime_versions() -> dict[str, str]:
    """Versions recorded with every analysis and comparison (spectra, numpy, torch, python)."""
    import platform

    import torch

    import spectra

    return {
        "spectra": spectra.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
