"""A planned set of LoRA modules and ranks as a PEFT ``LoraConfig`` (JSON), in PEFT's own terms.

The plan (spectra.adapt.plan: which modules, rank and alpha each) becomes:

- ``target_modules``: one entry per module *type*: the module path after the layer index
  (``attention.self.query`` for ``encoder.layer.3.attention.self.query``); a module outside the
  numbered layers (``pooler.dense``, ``lm_head``) is listed by its full path. PEFT matches an
  entry against the end of a module's dotted path, so the config also fits a model class that
  prefixes the names (``bert.encoder...``).
- ``layers_to_transform`` + ``layers_pattern``: the chosen layers, when the plan covers only
  some of them and every chosen module sits in a numbered layer (PEFT drops modules without a
  layer index once ``layers_to_transform`` is set).
- ``exclude_modules``: the modules those entries would still match (in the chosen layers) that
  the plan leaves out, by full path.
- ``r`` / ``lora_alpha``: the most common rank and alpha; ``rank_pattern`` / ``alpha_pattern``:
  the modules that differ, keyed so that PEFT's ``get_pattern_key`` resolves each key to that
  module alone (spectra.formats.peft.pattern_keys).

- ``target_parameters``: routed MoE experts held in 3-D parameters (spectra.adapt.expert_targets),
  by full parameter path, each with its stacked rank and alpha in ``rank_pattern`` /
  ``alpha_pattern`` (PEFT 0.21 resolves those keys for parameters, although its check of
  unmatched pattern keys looks at module names only and warns about them).

`resolve_targets` applies PEFT's matching rules to the checkpoint's module paths;
`lora_config` checks that the config resolves to exactly the planned modules and ranks before
returning it (tests/test_plan_peft.py checks the same with PEFT on a real model).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from spectra.adapt.plan import AdapterPlan, MatrixLike, lora_refusal, module_path
from spectra.errors import ValidationError
from spectra.formats.peft import LoraSettings, pattern_keys


def layer_split(path: str, layer: int | None) -> tuple[str, str] | None:
    """``encoder.layer.3.attention.self.query``, 3 -> ``("layer", "attention.self.query")``:
    the name of the layer container and the path after the index; None outside numbered
    layers."""
    if layer is None:
        return None
    parts = path.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i] == str(layer):
            return parts[i - 1], ".".join(parts[i + 1 :])
    return None


def _matches(path: str, entries: Sequence[str]) -> bool:
    # PEFT's list rule for target_modules and exclude_modules: exact, or a dotted suffix
    return any(path == e or path.endswith("." + e) for e in entries)


def _layer_of(path: str, pattern: str | None) -> int | None:
    # PEFT's layer index: `.*\.{layers_pattern}\.(\d+)\.`, or `.*\.[^.]*\.(\d+)\.` without one
    regex = rf".*\.{re.escape(pattern)}\.(\d+)\." if pattern else r".*\.[^.]*\.(\d+)\."
    found = re.match(regex, path)
    return None if found is None else int(found.group(1))


def resolve_targets(config: Mapping[str, Any], paths: Sequence[str]) -> list[str]:
    """The paths (of ``paths``) that PEFT adapts under ``config``'s ``target_modules``,
    ``layers_to_transform`` / ``layers_pattern`` and ``exclude_modules`` (list forms)."""
    targets = list(config.get("target_modules") or [])
    layers = config.get("layers_to_transform")
    pattern = config.get("layers_pattern")
    exclude = list(config.get("exclude_modules") or [])
    out = []
    for path in paths:
        if not _matches(path, targets) or _matches(path, exclude):
            continue
        if layers is not None:
            index = _layer_of(path, pattern)
            if index is None or index not in layers:
                continue
        out.append(path)
    return out


def _most_common(values: Sequence[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _entries(plan: AdapterPlan) -> tuple[list[str], str | None, list[int]]:
    """target_modules entries, the layer container name (when one) and the planned layers."""
    entries: set[str] = set()
    containers: set[str] = set()
    layers: set[int] = set()
    for mod in plan.modules:
        split = layer_split(mod.module, mod.layer)
        if split is None:
            entries.add(mod.module)
            continue
        containers.add(split[0])
        entries.add(split[1])
        layers.add(int(mod.layer))  # type: ignore[arg-type]
    container = containers.pop() if len(containers) == 1 else None
    return sorted(entries), container, sorted(layers)


def lora_config(
    plan: AdapterPlan,
    universe: Sequence[MatrixLike],
    *,
    base_model: str | None = None,
    parameters: Mapping[str, tuple[int, float]] | None = None,
) -> dict[str, Any]:
    """The ``LoraConfig`` JSON object for ``plan`` on a checkpoint whose matrices are
    ``universe`` (every matrix PEFT sees as a module, in checkpoint order), plus
    ``parameters`` (PEFT ``target_parameters``: path -> (rank, alpha)). See the module
    docstring."""
    params = dict(parameters or {})
    paths = [module_path(m.key) for m in universe if lora_refusal(m) is None]
    planned = [m.module for m in plan.modules]
    entries, container, layers = _entries(plan)
    config: dict[str, Any] = {"target_modules": entries}
    every_layer = sorted(
        {int(m.layer) for m in universe if m.layer is not None and lora_refusal(m) is None}
    )
    all_layered = all(layer_split(m.module, m.layer) for m in plan.modules)
    # with target_parameters, no layers_to_transform: whether PEFT filters parameters by it
    # is not part of its documented contract; exclude_modules says the same for modules
    if all_layered and container is not None and layers != every_layer and not params:
        by_layers = {**config, "layers_to_transform": layers, "layers_pattern": container}
        if set(planned) <= set(resolve_targets(by_layers, paths)):
            config = by_layers  # else PEFT cannot read the layer index: exclude_modules only
    matched = resolve_targets(config, paths)
    config["exclude_modules"] = sorted(set(matched) - set(planned)) or None
    ranks = {m.module: m.rank for m in plan.modules}
    alphas = {m.module: m.alpha for m in plan.modules}
    for path, (rank, a) in params.items():
        ranks[path], alphas[path] = rank, a
    every = planned + sorted(params)
    r = int(_most_common([ranks[m] for m in every]))
    alpha = float(_most_common([alphas[m] for m in every]))
    keys = pattern_keys(every)
    if params:
        config["target_parameters"] = sorted(params)
    config.update(
        peft_type="LORA",
        task_type=None,
        base_model_name_or_path=base_model,
        r=r,
        lora_alpha=_num(alpha),
        rank_pattern={keys[m]: ranks[m] for m in every if ranks[m] != r},
        alpha_pattern={keys[m]: _num(alphas[m]) for m in every if alphas[m] != alpha},
        use_rslora=bool(plan.rslora),
        init_lora_weights=True,
        bias="none",
        lora_dropout=0.0,
        fan_in_fan_out=False,
        modules_to_save=None,
        inference_mode=False,
    )
    config.setdefault("layers_to_transform", None)
    config.setdefault("layers_pattern", None)
    _check(config, paths, plan, params)
    return config


def _check(
    config: Mapping[str, Any],
    paths: Sequence[str],
    plan: AdapterPlan,
    params: Mapping[str, tuple[int, float]],
) -> None:
    """The config must give exactly the planned modules (and parameters) their planned rank
    and alpha."""
    got = resolve_targets(config, paths)
    want = [m.module for m in plan.modules]
    if sorted(got) != sorted(want):  # pragma: no cover - a bug in the construction above
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise ValidationError(
            f"the LoraConfig would adapt {extra[:3]} and miss {missing[:3]}: please report"
        )
    settings = LoraSettings.from_config(dict(config), "the planned LoraConfig")
    for path, (rank, a) in params.items():
        if settings.rank(path) != rank or settings.alpha(path) != a:
            raise ValidationError(  # pragma: no cover - a bug in the patterns above
                f"the LoraConfig resolves {path!r} to rank {settings.rank(path)}, not {rank}: "
                "please report"
            )
    for mod in plan.modules:
        if settings.rank(mod.module) != mod.rank or settings.alpha(mod.module) != mod.alpha:
            raise ValidationError(  # pragma: no cover - a bug in the patterns above
                f"the LoraConfig resolves {mod.module!r} to rank {settings.rank(mod.module)}, "
                f"not {mod.rank}: please report"
            )
