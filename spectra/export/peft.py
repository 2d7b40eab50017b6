"""PEFT LoRA adapter folders: written so ``PeftModel.from_pretrained`` loads them as they are.

Format (docs/methods.md section 6): ``adapter_config.json`` (``peft_type`` LORA, ``r``,
``lora_alpha``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
``init_lora_weights: true``, ``base_model_name_or_path``, ``bias: "none"``) and
``adapter_model.safetensors`` with ``<prefix><module>.lora_A.weight (r, in)`` and
``<prefix><module>.lora_B.weight (out, r)``, prefix ``base_model.model.``.

``init_lora_weights`` is always ``true``: "pissa"/"olora"/"corda" would make PEFT redo its own
decomposition on load and overwrite the stored factors. ``target_modules``, ``rank_pattern`` and
``alpha_pattern`` list every adapted module by its full path; PEFT resolves pattern keys with
``re.match(rf"(.*\\.)?({key})$", module)`` and takes the first hit, so the writer checks that no
key matches another module and escapes the keys where one would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from spectra.errors import SourceError, ValidationError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?P<name>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass(frozen=True)
class PeftAdapter:
    """A LoRA adapter in memory: ``factors[module] = (A (r, in), B (out, r))``; ``other``: any
    further tensors of the file (kept as they are, e.g. modules_to_save)."""

    config: dict[str, Any]
    factors: dict[str, tuple[Tensor, Tensor]]
    other: dict[str, Tensor] = field(default_factory=dict)
    prefix: str = PREFIX

    def rank(self, module: str) -> int:
        return int(self.factors[module][0].shape[0])

    def alpha(self, module: str) -> float:
        """The module's lora_alpha, resolved as PEFT does (alpha_pattern first hit, else global)."""
        return float(
            _resolve_pattern(
                self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)
            )
        )

    def scale(self, module: str) -> float:
        from spectra.adapt.factorize import lora_scale

        return lora_scale(
            self.alpha(module), self.rank(module), rslora=bool(self.config.get("use_rslora", False))
        )


def _resolve_pattern(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _clashes(key: str, module: str, modules: list[str]) -> bool:
    return any(o != module and re.match(rf"(.*\.)?({key})$", o) for o in modules)


def pattern_keys(modules: list[str]) -> dict[str, str]:
    """Map each module path to a pattern key that matches it and no other module in ``modules``
    under PEFT's rule: the plain path where that already holds, else ``^`` + ``re.escape`` of
    it (``^`` inside PEFT's group only matches at the start, so no prefix can sneak in)."""
    out = {}
    for module in modules:
        key = module
        if _clashes(key, module, modules):
            key = "^" + re.escape(module)
            if _clashes(key, module, modules):  # pragma: no cover - cannot happen for paths
                raise ValidationError(f"module path {module!r} cannot be told apart from others")
        out[module] = key
    return out


def adapter_config(
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    *,
    rslora: bool,
    base_model_name_or_path: str | None,
    r: int | None = None,
    lora_alpha: float | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` content for per-module ``ranks`` and ``alphas``.

    ``r``/``lora_alpha`` (PEFT's defaults for modules outside the patterns) are the most common
    values unless given; every module is still listed in both patterns by full path.
    """
    from spectra.adapt.plan import most_common

    modules = sorted(ranks)
    if set(alphas) != set(modules):
        raise ValidationError("ranks and alphas must name the same modules")
    keys = pattern_keys(modules)
    r = int(most_common([ranks[m] for m in modules])) if r is None else r
    lora_alpha = most_common([alphas[m] for m in modules]) if lora_alpha is None else lora_alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _num(lora_alpha),
        "target_modules": modules,
        "rank_pattern": {keys[m]: int(ranks[m]) for m in modules},
        "alpha_pattern": {keys[m]: _num(alphas[m]) for m in modules},
        "use_rslora": bool(rslora),
        "init_lora_weights": True,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
        "use_dora": False,
    }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def write_peft_adapter(
    out_dir: str | Path,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    alphas: Mapping[str, float],
    *,
    rslora: bool = False,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    prefix: str = PREFIX,
    other: Mapping[str, Tensor] | None = None,
    config_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``factors[module] = (A (r, in), B (out, r))`` as a PEFT adapter folder.

    The folder is created if needed (callers make it atomic with
    ``spectra.outdir.atomic_output_dir``). Tensors are stored in ``dtype``.
    """
    out = Path(out_dir)
    if not factors:
        raise ValidationError("no adapter factors to write")
    ranks = {}
    tensors: dict[str, Tensor] = {}
    for module, (A, B) in factors.items():
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValidationError(
                f"factors of {module!r} do not form a LoRA: A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        ranks[module] = int(A.shape[0])
        tensors[f"{prefix}{module}.lora_A.weight"] = A.detach().to("cpu", dtype).contiguous()
        tensors[f"{prefix}{module}.lora_B.weight"] = B.detach().to("cpu", dtype).contiguous()
    for name, t in (other or {}).items():
        tensors[name] = t.detach().cpu().contiguous()
    config = adapter_config(
        ranks, dict(alphas), rslora=rslora, base_model_name_or_path=base_model_name_or_path
    )
    config.update(config_extra or {})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read a PEFT LoRA adapter folder (ours or one PEFT saved after training)."""
    folder = Path(path)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise SourceError(
            f"{str(folder)!r} is not a PEFT adapter folder: it needs {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {cfg_path}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise SourceError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    halves: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    prefix = PREFIX
    with safe_open(str(w_path), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = _LORA_KEY.match(name)
            if match is None:
                other[name] = fh.get_tensor(name)
                continue
            module = match["name"]
            if module.startswith(PREFIX):
                module = module[len(PREFIX) :]
            else:
                prefix = ""
            halves.setdefault(module, {})[match["which"]] = fh.get_tensor(name)
    factors = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise SourceError(f"{w_path}: module {module!r} has lora_{set(pair)} but not both")
        factors[module] = (pair["A"], pair["B"])
    return PeftAdapter(config, factors, other, prefix)
