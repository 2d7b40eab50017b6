"""Model-level verdicts of a comparison: what changed, how (low-rank or full-rank), where the
intruders are. Pure functions over per-pair results; every verdict carries its evidence.

Rules (stated in the output):
- a matrix *did not move* when ||dW||_F / ||W_base||_F <= `unchanged_tol` (default 1e-6: below
  float32 rounding of a re-saved checkpoint, far below any training step);
- a changed matrix is *low-rank* when the numerical rank of dW is <= LOW_RANK_FRACTION * min(m, n)
  (LoRA updates have rank r << min(m, n)); otherwise *full-rank*;
- a full-rank update whose 99% energy rank is <= NOISY_LOW_RANK is flagged as "effectively
  low-rank" (a LoRA merged and stored in bf16/fp16 is full rank only through rounding; a short
  full fine-tune can concentrate its update in a few directions);
- the model is LoRA-like when at least MAJORITY of the changed matrices are low-rank, full-rank
  when at least MAJORITY are full-rank, mixed otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from spectra.analysis.drift import UpdateStats
from spectra.analysis.intruders import IntruderResult, epsilon_key

UNCHANGED_TOL = 1e-6
LOW_RANK_FRACTION = 0.5
NOISY_LOW_RANK = 64
MAJORITY = 0.9
TOP_LAYERS = 10

KINDS = ("unchanged", "low-rank", "full-rank")


class PairLike(Protocol):
    """What forensics needs from one compared matrix pair."""

    key: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    intruders: IntruderResult
    update: UpdateStats


def classify_update(update: UpdateStats, *, unchanged_tol: float = UNCHANGED_TOL) -> str:
    """'unchanged', 'low-rank' or 'full-rank' for one dW (rules in the module docstring)."""
    rel = update.rel_change
    moved = update.fro_norm > 0 and (rel is None or rel > unchanged_tol)
    if not moved:
        return "unchanged"
    if update.numerical_rank <= LOW_RANK_FRACTION * min(update.shape):
        return "low-rank"
    return "full-rank"


@dataclass(frozen=True)
class Verdict:
    """One finding: a stable code, a sentence, and the numbers behind it."""

    code: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "evidence": self.evidence}


@dataclass(frozen=True)
class Forensics:
    """Model-level summary of a comparison.

    kinds: {key: 'unchanged' | 'low-rank' | 'full-rank'}; update_kind: 'none' | 'low-rank' |
    'full-rank' | 'mixed'; apparent_rank: most common numerical rank of the low-rank matrices
    (None if there are none); rank_counts: {rank: matrices} over changed matrices;
    intruders_*: counts per epsilon (keys as in IntruderResult.to_dict); top_layers: (key,
    count) at the first (smallest) epsilon, most intruders first.
    """

    num_pairs: int
    num_changed: int
    kinds: dict[str, str]
    update_kind: str
    apparent_rank: int | None
    max_low_rank: int | None
    rank_counts: dict[int, int]
    intruders_total: dict[str, int]
    intruders_by_role: dict[str, dict[str, int]]
    intruders_by_depth: dict[str, dict[str, int]]
    top_layers: tuple[tuple[str, int], ...]
    verdicts: tuple[Verdict, ...]
    rules: dict[str, Any] = field(default_factory=dict)

    @property
    def unchanged(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.kinds.items() if v == "unchanged")

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_pairs": self.num_pairs,
            "num_changed": self.num_changed,
            "unchanged": list(self.unchanged),
            "kinds": dict(self.kinds),
            "update_kind": self.update_kind,
            "apparent_rank": self.apparent_rank,
            "max_low_rank": self.max_low_rank,
            "rank_counts": {str(r): n for r, n in self.rank_counts.items()},
            "intruders_total": dict(self.intruders_total),
            "intruders_by_role": {r: dict(c) for r, c in self.intruders_by_role.items()},
            "intruders_by_depth": {d: dict(c) for d, c in self.intruders_by_depth.items()},
            "top_layers": [list(t) for t in self.top_layers],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "rules": dict(self.rules),
        }


def _intruder_tables(
    pairs: Sequence[PairLike], epsilons: Sequence[float]
) -> tuple[dict[str, int], dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    keys = [epsilon_key(e) for e in epsilons]
    total = dict.fromkeys(keys, 0)
    by_role: dict[str, dict[str, int]] = {}
    by_depth: dict[str, dict[str, int]] = {}
    for p in pairs:
        depth = "none" if p.layer is None else str(p.layer)
        role_row = by_role.setdefault(p.role, dict.fromkeys(keys, 0))
        depth_row = by_depth.setdefault(depth, dict.fromkeys(keys, 0))
        for eps, key in zip(epsilons, keys, strict=True):
            n = p.intruders.count(eps)
            total[key] += n
            role_row[key] += n
            depth_row[key] += n
    return total, by_role, by_depth


def _overall_kind(kinds: Sequence[str]) -> str:
    changed = [k for k in kinds if k != "unchanged"]
    if not changed:
        return "none"
    for kind in ("low-rank", "full-rank"):
        if changed.count(kind) >= MAJORITY * len(changed):
            return kind
    return "mixed"


def comparison_forensics(
    pairs: Sequence[PairLike],
    epsilons: Sequence[float],
    *,
    unchanged_tol: float = UNCHANGED_TOL,
) -> Forensics:
    """Forensics over compared pairs; `epsilons` as computed for every pair (sorted)."""
    kinds = {p.key: classify_update(p.update, unchanged_tol=unchanged_tol) for p in pairs}
    changed = [p for p in pairs if kinds[p.key] != "unchanged"]
    low = [p.update.numerical_rank for p in changed if kinds[p.key] == "low-rank"]
    total, by_role, by_depth = _intruder_tables(pairs, epsilons)
    first = epsilons[0] if epsilons else 0.5
    ranked = sorted(
        ((p.key, p.intruders.count(first)) for p in pairs if epsilons), key=lambda t: -t[1]
    )
    top = tuple((k, n) for k, n in ranked if n > 0)[:TOP_LAYERS]
    forensics = Forensics(
        num_pairs=len(pairs),
        num_changed=len(changed),
        kinds=kinds,
        update_kind=_overall_kind(list(kinds.values())),
        apparent_rank=Counter(low).most_common(1)[0][0] if low else None,
        max_low_rank=max(low) if low else None,
        rank_counts=dict(sorted(Counter(p.update.numerical_rank for p in changed).items())),
        intruders_total=total,
        intruders_by_role=by_role,
        intruders_by_depth=by_depth,
        top_layers=top,
        verdicts=(),
        rules={
            "unchanged_tol": unchanged_tol,
            "low_rank_fraction": LOW_RANK_FRACTION,
            "majority": MAJORITY,
            "noisy_low_rank": NOISY_LOW_RANK,
        },
    )
    return _with_verdicts(forensics, pairs, changed, epsilons)


def _with_verdicts(
    f: Forensics,
    pairs: Sequence[PairLike],
    changed: Sequence[PairLike],
    epsilons: Sequence[float],
) -> Forensics:
    verdicts = _verdicts(f, changed)
    if epsilons:
        with_any = sum(1 for p in pairs if p.intruders.count(epsilons[0]) > 0)
        verdicts.append(_intruder_verdict(f, epsilons[0], with_any))
    return replace(f, verdicts=tuple(verdicts))


def _verdicts(f: Forensics, changed: Sequence[PairLike]) -> list[Verdict]:
    out = [_moved_verdict(f)]
    if f.update_kind != "none":
        out.append(_kind_verdict(f))
        noisy = [
            p.key
            for p in changed
            if f.kinds[p.key] == "full-rank" and p.update.energy_rank <= NOISY_LOW_RANK
        ]
        if noisy:
            out.append(
                Verdict(
                    "effectively-low-rank",
                    f"{len(noisy)} full-rank update(s) hold 99% of their energy in at most "
                    f"{NOISY_LOW_RANK} directions (effectively low-rank: few training steps, "
                    "or a low-rank update stored in low precision)",
                    {"keys": noisy[:20]},
                )
            )
    return out


def _moved_verdict(f: Forensics) -> Verdict:
    still = f.unchanged
    if f.num_changed == 0:
        msg = f"no matrix moved: all {f.num_pairs} are identical to the base (within tolerance)"
    else:
        msg = f"{f.num_changed} of {f.num_pairs} matrices changed; {len(still)} did not move"
    return Verdict("changed", msg, {"changed": f.num_changed, "unchanged": list(still)[:50]})


def _kind_verdict(f: Forensics) -> Verdict:
    counts = Counter(v for v in f.kinds.values() if v != "unchanged")
    if f.update_kind == "low-rank":
        msg = (
            f"the update looks low-rank (LoRA-like): apparent rank {f.apparent_rank} "
            f"(largest {f.max_low_rank})"
        )
    elif f.update_kind == "full-rank":
        msg = "the update is full-rank in most changed matrices (full fine-tuning-like)"
    else:
        msg = f"mixed update: {counts['low-rank']} low-rank and {counts['full-rank']} full-rank"
    return Verdict(
        f"update-{f.update_kind}",
        msg,
        {"kinds": dict(counts), "rank_counts": {str(k): v for k, v in f.rank_counts.items()}},
    )


def _intruder_verdict(f: Forensics, eps: float, with_any: int) -> Verdict:
    key = epsilon_key(eps)
    n = f.intruders_total.get(key, 0)
    if n == 0:
        msg = f"no intruder dimensions at epsilon {key}: the top singular vectors stay in the base"
    else:
        where = "matrix" if with_any == 1 else "matrices"
        msg = (
            f"{n} intruder dimension(s) at epsilon {key} in {with_any} {where}; most in "
            f"{f.top_layers[0][0]} ({f.top_layers[0][1]})"
        )
    by_role = {r: c.get(key, 0) for r, c in f.intruders_by_role.items()}
    return Verdict("intruders", msg, {"epsilon": eps, "total": n, "by_role": by_role})
