"""TEMPORARY stand-in for spectra.sources.adapters.LoraAdapter (issue 2), deleted when it lands.

Reads a PEFT LoRA folder: adapter_config.json (r, lora_alpha, use_rslora, rank_pattern,
alpha_pattern) and adapter_model.safetensors with `base_model.model.<path>.lora_A.weight`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

_A = re.compile(r"^base_model\.model\.(?P<mod>.+)\.lora_A(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    module: str
    base_key: str
    a: str
    b: str
    rank: int
    alpha: float
    scale: float


class LoraAdapter:
    def __init__(self, path: Path, modules: dict[str, LoraModule]) -> None:
        self.path = path
        self.modules = modules

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        path = Path(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        file = path / "adapter_model.safetensors"
        with safe_open(str(file), "pt") as fh:
            names = list(fh.keys())
            shapes = {n: fh.get_slice(n).get_shape() for n in names}
        mods = {}
        for name in names:
            m = _A.match(name)
            if not m:
                continue
            mod = m["mod"]
            r = int(shapes[name][0])
            alpha = float(_pattern(cfg.get("alpha_pattern") or {}, mod, cfg.get("lora_alpha", r)))
            scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            b = name.replace("lora_A", "lora_B")
            mods[mod] = LoraModule(mod, f"{mod}.weight", name, b, r, alpha, scale)
        return cls(path, mods)

    def read_factors(
        self, module: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        m = self.modules[module]
        with safe_open(str(self.path / "adapter_model.safetensors"), "pt") as fh:
            a = fh.get_tensor(m.a).to(device=device, dtype=dtype)
            b = fh.get_tensor(m.b).to(device=device, dtype=dtype)
        return a, b, m.scale


def _pattern(patterns: dict[str, float], module: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\\.)?{key}$", module):
            return value
    return default
