"""Pairing of fine-tuned tensors with base tensors by name, with `--map` regex renames (pure).

One-sided keys and shape mismatches are listed, never silently dropped; `Pairing.problems()`
says what does not pair in one line.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spectra.errors import ValidationError


def parse_map(rules: Iterable[str | tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """'regex=>replacement' strings (or pairs) -> validated (pattern, replacement) tuples."""
    out = []
    for rule in rules:
        if isinstance(rule, str):
            if "=>" not in rule:
                raise ValidationError(
                    f"--map rule {rule!r} has no '=>': write it as 'regex=>replacement', "
                    r"e.g. 'model\.decoder\.=>model.'"
                )
            pattern, repl = rule.split("=>", 1)
        else:
            pattern, repl = rule
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValidationError(f"--map pattern {pattern!r} is not a valid regex: {exc}") from exc
        try:  # sub() parses the replacement template up front, even when nothing matches
            compiled.sub(repl, "")
        except (re.error, IndexError) as exc:
            raise ValidationError(
                f"--map replacement {repl!r} is not valid for {pattern!r}: {exc}"
            ) from exc
        out.append((pattern, repl))
    return tuple(out)


@dataclass(frozen=True)
class Pairing:
    """Result of matching fine-tuned keys to base keys.

    pairs: (base_key, ft_key) in base order; base_only / ft_only: one-sided keys;
    mismatched: (base_key, ft_key, base_shape, ft_shape) for pairs whose shapes differ.
    """

    pairs: tuple[tuple[str, str], ...]
    base_only: tuple[str, ...] = ()
    ft_only: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, str, tuple[int, ...], tuple[int, ...]], ...] = ()

    def problems(self) -> str:
        """One-line description of what does not pair ('' when everything pairs)."""
        parts = []
        if self.mismatched:
            shown = ", ".join(f"{b} {tuple(sb)} vs {tuple(sf)}" for b, _, sb, sf in self.mismatched)
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {clip(shown)}")
        if self.base_only:
            parts.append(f"{len(self.base_only)} only in base: {clip(', '.join(self.base_only))}")
        if self.ft_only:
            parts.append(f"{len(self.ft_only)} only in fine-tune: {clip(', '.join(self.ft_only))}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_pairs": len(self.pairs),
            "base_only": list(self.base_only),
            "ft_only": list(self.ft_only),
            "mismatched": [
                {"base": b, "finetuned": f, "base_shape": list(sb), "ft_shape": list(sf)}
                for b, f, sb, sf in self.mismatched
            ],
        }


def clip(text: str, limit: int = 400) -> str:
    """`text`, cut to `limit` characters with '...' (lists of keys in one-line errors)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def map_key(key: str, rules: Sequence[tuple[str, str]]) -> str:
    """Apply every (regex, replacement) rule in order to a fine-tuned key."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def pair_matrices(
    base: Mapping[str, tuple[int, ...]],
    finetuned: Mapping[str, tuple[int, ...]],
    rules: Sequence[tuple[str, str]] = (),
) -> Pairing:
    """Pair keys by name after mapping fine-tuned keys through `rules` (pure).

    base, finetuned: {key: shape}. Two fine-tuned keys mapping to one base key is an error.
    """
    mapped: dict[str, str] = {}
    for ft_key in finetuned:
        target = map_key(ft_key, rules)
        if target in mapped:
            raise ValidationError(
                f"fine-tuned keys {mapped[target]!r} and {ft_key!r} both map to {target!r}: "
                "make the --map rules more specific"
            )
        mapped[target] = ft_key
    pairs, mismatched = [], []
    for b_key, b_shape in base.items():
        f_key = mapped.get(b_key)
        if f_key is None:
            continue
        f_shape = tuple(finetuned[f_key])
        if tuple(b_shape) != f_shape:
            mismatched.append((b_key, f_key, tuple(b_shape), f_shape))
        else:
            pairs.append((b_key, f_key))
    return Pairing(
        pairs=tuple(pairs),
        base_only=tuple(k for k in base if k not in mapped),
        ft_only=tuple(f for t, f in mapped.items() if t not in base),
        mismatched=tuple(mismatched),
    )


def pair_adapter(
    base_keys: Sequence[str],
    targets: Mapping[str, str],
    rules: Sequence[tuple[str, str]],
    base: str,
    *,
    all_keys: Collection[str] | None = None,
) -> Pairing:
    """Pair an adapter's modules with the selected base matrices (after `--map` renames).

    base_keys: the selected base matrices, in base order; targets: {adapter module: the base key
    it adapts}; base: the base's name, for errors; all_keys: every matrix of the base (None: the
    selected ones). The selection (--include/--exclude/--roles) applies to the adapter's modules
    too: a module whose matrix the base has but the selection left out is not compared. Raises
    ValidationError when the adapter targets matrices the base lacks, or none selected.
    """
    modules = {map_key(key, rules): name for name, key in targets.items()}
    selected = set(base_keys)
    known = selected if all_keys is None else selected | set(all_keys)
    missing = [k for k in modules if k not in known]
    if missing:
        raise ValidationError(
            f"the adapter targets {len(missing)} matrices the base {base} does not have: "
            f"{clip(', '.join(missing))}; check the base model, or rename with --map"
        )
    pairs = tuple((k, modules[k]) for k in base_keys if k in modules)
    if not pairs:
        raise ValidationError(
            f"the adapter adapts none of the selected matrices of {base} "
            "(check --include/--exclude/--roles)"
        )
    return Pairing(pairs=pairs, base_only=tuple(k for k in base_keys if k not in modules))
