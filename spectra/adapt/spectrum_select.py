"""Spectrum's layer selection: module types, the top fraction by SNR per type, the axolotl YAML.

cognitivecomputations/spectrum (``spectrum.py``) groups modules by *type*, ranks each type's
modules by SNR (spectra.analysis.snr) and leaves the top share of every type trainable, written
as the ``unfrozen_parameters`` list axolotl reads. Its rules, reproduced here:

- type of a module path: the components after the first all-digit component
  (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``), else the whole path
  (``lm_head``, ``model.embed_tokens``);
- types are processed in its order: grouped by their first component, groups and the types in
  them sorted by name;
- a type scans every module whose path *contains* it as a substring, and a module scanned
  under several types keeps the last one (``output.dense`` takes BERT's
  ``attention.output.dense`` from ``attention.output.dense``); a type left with no module is
  not written. Groups appear in the order their first module was first scanned;
- per type, ``int(n * top_percent / 100)`` modules with the highest SNR (stable order for
  ties: scan order), so a type with fewer modules than ``100 / top_percent`` gets none;
- the YAML: ``unfrozen_parameters:``, the two fixed lines ``- ^lm_head.weight$`` and
  ``- ^model.embed_tokens.weight$`` (the tool writes them for every model), then per type a
  ``# <type> layers`` comment and one ``- <module path>`` line per chosen module (axolotl
  reads each line as a regular expression matched at the start of a parameter name).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spectra.errors import ValidationError

ALWAYS_UNFROZEN = ("^lm_head.weight$", "^model.embed_tokens.weight$")


def module_type(path: str) -> str:
    """The tool's type of a module path (see the module docstring)."""
    parts = path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), -1)
    return ".".join(parts[index + 1 :]) if index != -1 else path


def sort_types(types: Sequence[str]) -> list[str]:
    """The tool's processing order: by first component, then by name within it."""
    groups: dict[str, list[str]] = {}
    for t in types:
        groups.setdefault(t.split(".")[0], []).append(t)
    return [t for _, group in sorted(groups.items()) for t in sorted(group)]


@dataclass(frozen=True)
class TypeSelection:
    """One type: its scanned modules in scan order and the chosen ones (highest SNR first)."""

    type: str
    modules: tuple[str, ...]
    chosen: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "modules": list(self.modules), "chosen": list(self.chosen)}


def top_count(n: int, fraction: float) -> int:
    """``int(n * top_percent / 100)`` for ``fraction = top_percent / 100`` (exact for integer
    percents, as the tool takes them)."""
    if not 0 < fraction <= 1:
        raise ValidationError(f"fraction must be in (0, 1], got {fraction!r}")
    percent = fraction * 100
    if math.isclose(percent, round(percent), abs_tol=1e-9):
        return int(n * round(percent) / 100)
    return int(n * fraction)


def select_by_type(
    paths: Sequence[str], snr: Mapping[str, float], fraction: float
) -> list[TypeSelection]:
    """Types in YAML order with their chosen modules: ``paths`` are the scanned module paths
    in module order, ``snr`` the score of each (NaN sorts last)."""
    if not paths:
        raise ValidationError("no modules to select from")
    order = sort_types(sorted({module_type(p) for p in paths}))
    final: dict[str, str] = {}
    first_seen: dict[str, tuple[int, int]] = {}
    for step, t in enumerate(order):
        for pos, path in enumerate(paths):
            if t in path:
                final[path] = t
                first_seen.setdefault(path, (step, pos))
    scanned: dict[str, list[str]] = {t: [] for t in order}
    for path in sorted(final, key=lambda p: first_seen[p]):
        scanned[final[path]].append(path)
    groups = sorted((t for t in order if scanned[t]), key=lambda t: first_seen[scanned[t][0]])
    out = []
    for t in groups:
        members = scanned[t]
        ranked = sorted(members, key=lambda p: _desc(snr[p]))
        chosen = tuple(ranked[: top_count(len(members), fraction)])
        out.append(TypeSelection(t, tuple(members), chosen))
    return out


def _desc(value: float) -> float:
    return math.inf if math.isnan(value) else -value


def unfrozen_yaml(selection: Sequence[TypeSelection]) -> str:
    """The tool's ``unfrozen_parameters`` YAML text for ``selection``."""
    lines = ["unfrozen_parameters:", *(f"- {line}" for line in ALWAYS_UNFROZEN)]
    for sel in selection:
        lines.append(f"# {sel.type} layers")
        lines.extend(f"- {path}" for path in sel.chosen)
    return "\n".join(lines) + "\n"
