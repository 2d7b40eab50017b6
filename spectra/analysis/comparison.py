"""What `compare()` returns: `Comparison` (one PairResult per matrix pair plus model-level
forensics) and the `CompareOptions` it was computed with, which it records.

The job that computes it is spectra.jobs.compare; reports render it (spectra.reports.compare).
Definitions: docs/methods.md section 3.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.analysis.csvsafe import write_csv
from spectra.analysis.forensics import UNCHANGED_TOL, Forensics
from spectra.analysis.intruders import DEFAULT_EPSILONS, DEFAULT_K, validate_epsilons
from spectra.analysis.pair import PairResult
from spectra.analysis.pairing import Pairing, parse_map
from spectra.analysis.results import json_safe
from spectra.errors import ValidationError
from spectra.fields import check_fields, check_value, str_tuple


@dataclass(frozen=True)
class CompareOptions:
    """Knobs of a comparison (validated).

    k: top singular vectors tested for intrusion (paper: 10); epsilons: thresholds (paper: 0.5);
    map: (regex, replacement) rules, or 'regex=>replacement' strings, applied in order to
    fine-tuned keys to get base keys; include/exclude: name globs; roles: e.g. ("q", "v");
    device: "auto" | "cpu" | "cuda[:N]" | "mps";
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
        object.__setattr__(self, "map", parse_map(_map_rules(self.map)))
        for name in ("include", "exclude", "roles"):
            object.__setattr__(self, name, str_tuple(getattr(self, name), f"CompareOptions.{name}"))
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        check_fields(self)
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


def _map_rules(value: object) -> tuple[str | tuple[str, str], ...]:
    """`map` as rules: a 'regex=>replacement' string, or a sequence of such strings or of
    (regex, replacement) pairs (ValidationError for anything else)."""
    rules = (value,) if isinstance(value, str) else value
    check_value(rules, Sequence[str | tuple[str, str] | list[str]], "CompareOptions.map")
    for rule in rules:  # type: ignore[union-attr]
        if not isinstance(rule, str) and len(rule) != 2:
            raise ValidationError(f"CompareOptions.map rule {rule!r} is not a (regex, repl) pair")
    return tuple(r if isinstance(r, str) else (r[0], r[1]) for r in rules)  # type: ignore[union-attr]


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
    commits: dict[str, str] = field(default_factory=dict)  # side -> resolved Hub commit

    def pair(self, key: str) -> PairResult:
        """The result of base key `key` (ValidationError naming close keys when absent)."""
        for p in self.pairs:
            if p.key == key:
                return p
        close = [p.key for p in self.pairs if key in p.key][:5]
        raise ValidationError(f"no pair {key!r} in this comparison; similar keys: {close}")

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "base": self.base,
                "finetuned": self.finetuned,
                "mode": self.mode,
                **({"commits": dict(self.commits)} if self.commits else {}),
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
        return [json_safe(p.row()) for p in self.pairs]

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
