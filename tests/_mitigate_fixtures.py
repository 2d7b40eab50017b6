"""A real LoRA fine-tune of the bundled MiniLM with planted intruder dimensions (seeded, ~2 s),
and an independent float64 reference of the mitigation (full `torch.linalg.svd`, methods.md
section 3), shared by the mitigate tests."""

from __future__ import annotations

import re
from pathlib import Path

import torch

R, ALPHA = 4, 8.0  # the adapter's rank and alpha (scale 2)
TARGETS = ("query", "value")
LAYERS = [0, 3]  # adapted layers (4 modules: keeps the tests fast)
# module -> planted singular values, in multiples of the base matrix's S_1
PLANTED = {
    "encoder.layer.0.attention.self.query": (3.0, 2.0),
    "encoder.layer.3.attention.self.value": (2.5,),
}


def layer_name(module: str) -> str:
    return f"base_model.model.{module}"


def train_and_plant(minilm: Path, out: Path) -> Path:
    """A PEFT LoRA (r 4, alpha 8 on query/value of layers 0 and 3) trained for 3 Adam steps on
    MiniLM, then intruders planted in two modules: B A gets rank-1 terms along random directions
    with singular values PLANTED x S_1(W). Saved with PEFT's save_pretrained (safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm)
    model = get_peft_model(
        AutoModel.from_pretrained(minilm),
        LoraConfig(
            r=R,
            lora_alpha=ALPHA,
            target_modules=list(TARGETS),
            layers_to_transform=LAYERS,
            lora_dropout=0.0,
        ),
    )
    batch = tok(
        ["a small test sentence", "another one, longer than the first"],
        padding=True,
        return_tensors="pt",
    )
    target = torch.randn(2, 384, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = (model(**batch).last_hidden_state[:, 0] - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(2)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, values in PLANTED.items():
            layer = modules[layer_name(module)]
            w = layer.get_base_layer().weight.double()
            s1 = float(torch.linalg.svdvals(w)[0])
            m, n = w.shape
            x = torch.linalg.qr(torch.randn(m, len(values), generator=g, dtype=torch.float64))[0]
            y = torch.linalg.qr(torch.randn(n, len(values), generator=g, dtype=torch.float64))[0]
            root = (torch.tensor(values, dtype=torch.float64) * s1 / (ALPHA / R)).sqrt()
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            j = len(values)
            a[:j] = (root[:, None] * y.T).float()
            b[:, :j] = (x * root[None, :]).float()
    model.save_pretrained(out)
    return out


def reference(w0: torch.Tensor, w_t: torch.Tensor, k: int, eps: float, lam: float):
    """(W', intruder positions) by the definition: full float64 SVDs of both matrices."""
    u0 = torch.linalg.svd(w0.double(), full_matrices=False)[0]
    u, s, vh = torch.linalg.svd(w_t.double(), full_matrices=False)
    mc = (u[:, :k].T @ u0).abs().amax(dim=1)
    idx = [i for i in range(min(k, len(s))) if mc[i] < eps]
    w_new = w_t.double() + (lam - 1) * (u[:, idx] * s[idx]) @ vh[idx]
    return w_new, idx


def peft_reduced(minilm: Path, adapter: Path, k: int, eps: float, lam: float):
    """PEFT 0.21.2's own reduce_intruder_dimension on the saved adapter: {module: (base W,
    merged delta of the new adapter, intruder count PEFT logged)}, float64."""
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from peft.tuners.lora.layer import LoraLayer
    from transformers import AutoModel

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm), adapter)
    lines: list[str] = []
    reduce_intruder_dimension(
        model, top_k=k, threshold_epsilon=eps, mitigation_lambda=lam, logging_sink=lines.append
    )
    counts = {}
    for line in lines:
        found = re.match(r"base_model\.model\.(.+): (?:Intruders: (\d+)|No intruders)$", line)
        if found:
            counts[found[1]] = int(found[2] or 0)
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            module = name.removeprefix("base_model.model.")
            new = "intruder_reduced"
            a = layer.lora_A[new].weight.double()
            b = layer.lora_B[new].weight.double()
            w = layer.get_base_layer().weight.double()
            out[module] = (w, layer.scaling[new] * (b @ a), counts[module])
    return out
