"""Where PEFT finds an MoE expert's matrix: the 3-D parameter (and the rows in it) that holds it.

transformers 5 (checked: 5.24) keeps the routed experts of Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3,
OLMoE and the other model types its checkpoint conversion maps onto Mixtral's or Qwen2-MoE's
(`FUSED_PER_EXPERT`) as two 3-D parameters of one `experts` module, although their checkpoints
store one 2-D tensor per expert:

- `<block>.mlp.experts.gate_up_proj` (E, 2I, H): expert e's gate (Mixtral `w1`, `gate_proj`) in
  rows [0, I) and its up projection (`w3`, `up_proj`) in rows [I, 2I);
- `<block>.mlp.experts.down_proj` (E, H, I): expert e's down projection (`w2`, `down_proj`);

with Mixtral's `block_sparse_moe.` renamed `mlp.`. Checkpoints that store the 3-D stacks
themselves (gpt-oss `mlp.experts.gate_up_proj` (E, H, 2I), transposed) keep their names. PEFT
(0.21) adapts such a parameter with `target_parameters` (its `lora.ParamWrapper`): one rank R
for all E experts, `lora_A.weight (R E, in)` with expert e's rows at [e R, (e + 1) R),
`lora_B.weight (out, R E)` with expert e's column j at `j E + e`, and the update of expert e is
`scale B_e A_e` in the parameter's (out, in) orientation (transposed back for a stored
(E, in, out) stack, whose module says `is_transposed`).

So a plan that gives expert e's gate rank r_g and its up projection rank r_u fills one
(r_g + r_u)-dimensional block of expert e's R slots of gate_up_proj: `A_e = [A_g; A_u; 0]`,
`B_e = [[B_g, 0, 0], [0, B_u, 0]]`, R = the largest r_g + r_u over the experts. The zero slots
(rows of A and columns of B both zero) have zero gradients and stay zero in training, so each
expert trains exactly the directions planned for it; the off-diagonal zero blocks of B do not
(gate and up then train as one LoRA of the fused matrix). Checkpoints of other model types that
store per-expert 2-D tensors are targeted as per-expert `nn.Linear` modules by module path
(transformers 4 and remote-code layouts).

When several parameters of one module are targeted, PEFT nests one `ParamWrapper` per parameter
in the module's registration order (transformers' experts: gate_up_proj before down_proj), the
first innermost: its factors are saved under `<module>.base_layer.lora_A.weight`, the last
under `<module>.lora_A.weight` (`adapter_key`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from spectra.adapt.plan import AdapterPlan
from spectra.errors import ValidationError
from spectra.formats.peft import StackedFactors, lora_scale

#: Model types whose per-expert checkpoint tensors transformers 5 fuses into 3-D parameters
#: (its conversion_mapping.py: Mixtral's and Qwen2-MoE's converters and the types mapped onto
#: them).
FUSED_PER_EXPERT = frozenset(
    {
        "mixtral",
        "minimax",
        "minimax_m2",
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
        "qwen3_omni_moe",
        "deepseek_v2",
        "deepseek_v3",
        "deepseek_v32",
        "olmoe",
        "flex_olmo",
        "glm4_moe",
        "glm4v_moe",
        "dots1",
        "ernie4_5_moe",
        "hunyuan_v1_moe",
        "longcat_flash",
        "afmoe",
        "exaone_moe",
        "cohere2_moe",
    }
)
#: Parameter names in the registration order of transformers' experts modules (PEFT nests the
#: wrappers in that order).
PARAM_ORDER = ("gate_up_proj", "down_proj")
_PER_EXPERT = re.compile(r"^(?P<block>.*)\.(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d{1,9})\.")
_STACK_KEY = re.compile(r"^(?P<param>.*)\[expert=(?P<e>\d{1,9})\]$")
_PART = {"gate": (0, 2), "up": (1, 2), "down": (0, 1), "gate_up": (0, 1)}


@dataclass(frozen=True)
class ExpertSlot:
    """One expert matrix inside a PEFT target parameter.

    parameter: the parameter's full path (`model.layers.0.mlp.experts.gate_up_proj`); expert:
    its index; part / parts: its place among the matrices stacked along the parameter's output
    rows (gate 0 and up 1 of 2; a whole slice 0 of 1)."""

    parameter: str
    expert: int
    part: int
    parts: int

    @property
    def module(self) -> str:
        return self.parameter.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.parameter.rpartition(".")[2]


class ExpertLike(Protocol):
    """What `expert_slot` reads from a loader's MatrixRef (spectra.sources.roles)."""

    key: str
    role: str
    shape: tuple[int, int]
    expert: int | None
    expert_role: str | None


def expert_slot(mat: ExpertLike, model_type: str | None) -> ExpertSlot | None:
    """The PEFT parameter slot of routed-expert matrix `mat`, or None when PEFT addresses it
    as an `nn.Linear` module (per-expert 2-D tensors of a model type not in FUSED_PER_EXPERT).
    ValidationError for an expert PEFT cannot address (message: why)."""
    stack = _STACK_KEY.match(mat.key)
    if stack is not None:
        param, name = stack.group("param"), stack.group("param").rpartition(".")[2]
        if name not in PARAM_ORDER:
            raise ValidationError(
                f"expert stack {param!r}: transformers models hold routed experts as "
                f"{' and '.join(PARAM_ORDER)} parameters, so PEFT has no parameter named "
                f"{name!r} to target: leave it out of --targets"
            )
        return ExpertSlot(param, int(stack.group("e")), 0, 1)
    if model_type not in FUSED_PER_EXPERT:
        return None
    found = _PER_EXPERT.match(mat.key)
    if found is None or mat.expert_role not in _PART:
        raise ValidationError(
            f"expert matrix {mat.key!r} of a {model_type} model: not a gate, up or down "
            "projection of experts.N, so no PEFT parameter holds it: leave it out of --targets"
        )
    part, parts = _PART[mat.expert_role]
    name = "down_proj" if mat.expert_role == "down" else "gate_up_proj"
    return ExpertSlot(f"{found.group('block')}.mlp.experts.{name}", mat.expert or 0, part, parts)


def adapter_key(parameter: str, targeted: Sequence[str]) -> str:
    """The module path PEFT saves `parameter`'s factors under, given every targeted parameter
    path (`.base_layer` once per wrapper nested around it: see the module docstring)."""
    module, _, name = parameter.rpartition(".")
    siblings = sorted(
        {p.rpartition(".")[2] for p in targeted if p.rpartition(".")[0] == module},
        key=_param_rank,
    )
    depth = len(siblings) - 1 - siblings.index(name)
    return module + ".base_layer" * depth


def _param_rank(name: str) -> tuple[int, str]:
    return (PARAM_ORDER.index(name) if name in PARAM_ORDER else len(PARAM_ORDER), name)


def stacked_rank(slots: Mapping[str, ExpertSlot], ranks: Mapping[str, int]) -> dict[str, int]:
    """R of every parameter: the largest sum of its planned ranks over one expert's parts.

    slots / ranks: by matrix key (ranks: the planned rank of each matrix)."""
    per_expert: dict[tuple[str, int], int] = {}
    for key, slot in slots.items():
        cell = (slot.parameter, slot.expert)
        per_expert[cell] = per_expert.get(cell, 0) + int(ranks[key])
    out: dict[str, int] = {}
    for (param, _), r in per_expert.items():
        out[param] = max(out.get(param, 0), r)
    return out


@dataclass(frozen=True)
class StackShape:
    """A target parameter as PEFT sees it: E experts, the (out, in) of one expert's matrix
    (all parts stacked), and R."""

    experts: int
    out: int
    inp: int
    rank: int


def stack_factors(
    shape: StackShape, parts: Mapping[tuple[int, int], tuple[Tensor, Tensor]], num_parts: int
) -> tuple[Tensor, Tensor]:
    """PEFT's `lora_A.weight (R E, in)` and `lora_B.weight (out, R E)` of one parameter from
    per-(expert, part) factors `A (r, in)`, `B (out / num_parts, r)`; missing experts and
    unused slots are zero (module docstring)."""
    E, R = shape.experts, shape.rank
    rows = shape.out // num_parts
    if rows * num_parts != shape.out:
        raise ValidationError(f"{shape.out} output rows do not split into {num_parts} parts")
    A_all = torch.zeros(E, R, shape.inp, dtype=torch.float32)  # (E, R, in)
    B_all = torch.zeros(shape.out, R, E, dtype=torch.float32)  # (out, R, E): PEFT's order
    used = [0] * E
    for (e, part), (A, B) in sorted(parts.items()):
        r = A.shape[0]
        if not 0 <= e < E or used[e] + r > R or A.shape[1] != shape.inp or B.shape[0] != rows:
            raise ValidationError(
                f"expert {e} part {part}: factors A {tuple(A.shape)}, B {tuple(B.shape)} do not "
                f"fit a stack of {E} experts, rank {R}, (out, in) = ({shape.out}, {shape.inp})"
            )
        A_all[e, used[e] : used[e] + r] = A.float()
        B_all[part * rows : (part + 1) * rows, used[e] : used[e] + r, e] = B.float()
        used[e] += r
    return A_all.reshape(E * R, shape.inp), B_all.reshape(shape.out, R * E)


def expert_delta(A: Tensor, B: Tensor, experts: int, scale: float) -> Tensor:
    """The update PEFT applies to each expert, `(E, out, in)`, from stacked factors (the
    inverse of `stack_factors`; PEFT's ParamWrapper.get_delta_weight for (E, out, in))."""
    A_e = A.reshape(experts, -1, A.shape[-1])  # (E, R, in)
    B_e = B.reshape(B.shape[0], -1, experts)  # (out, R, E)
    return torch.einsum("ore,eri->eoi", B_e, A_e) * scale


def expert_slots(
    matrices: Sequence[ExpertLike], model_type: str | None, *, strict: bool = True
) -> dict[str, ExpertSlot]:
    """The slot of every routed-expert matrix PEFT addresses through a 3-D parameter, by key.
    strict: an expert PEFT cannot address is a ValidationError (else it is left out)."""
    out = {}
    for mat in matrices:
        if mat.role != "expert":
            continue
        try:
            slot = expert_slot(mat, model_type)
        except ValidationError:
            if strict:
                raise
            continue
        if slot is not None:
            out[mat.key] = slot
    return out


def linear_modules(matrices: Sequence[ExpertLike], model_type: str | None) -> list[ExpertLike]:
    """The matrices PEFT sees as modules: all but the routed experts held in 3-D parameters
    (per-expert 2-D tensors of a model type outside FUSED_PER_EXPERT stay: nn.Linear)."""
    return [
        m
        for m in matrices
        if m.role != "expert" or ("[expert=" not in m.key and model_type not in FUSED_PER_EXPERT)
    ]


def plan_experts(
    plan: AdapterPlan, slots: Mapping[str, ExpertSlot], alpha: float | None
) -> AdapterPlan:
    """`plan` with every expert matrix in `slots` scaled as its PEFT parameter will be: rank R
    (`stacked_rank`) and alpha (`alpha`, or R when None: scale 1, PiSSA's convention) shared by
    the parameter; each matrix keeps its own rank (its block of the R slots)."""
    ranks = {m.key: m.rank for m in plan.modules if m.key in slots}
    if not ranks:
        return plan
    planned = {k: slots[k] for k in ranks}
    stacked = stacked_rank(planned, ranks)
    modules = []
    for m in plan.modules:
        slot = planned.get(m.key)
        if slot is None:
            modules.append(m)
            continue
        R = stacked[slot.parameter]
        a = float(R if alpha is None else alpha)
        modules.append(replace(m, alpha=a, scale=lora_scale(a, R, rslora=plan.rslora)))
    return replace(plan, modules=tuple(modules))


def parameter_patterns(
    plan: AdapterPlan, slots: Mapping[str, ExpertSlot]
) -> dict[str, tuple[int, float]]:
    """(R, alpha) of every PEFT target parameter holding a planned expert of `plan` (after
    `plan_experts`)."""
    ranks = {m.key: m.rank for m in plan.modules if m.key in slots}
    stacked = stacked_rank({k: slots[k] for k in ranks}, ranks)
    return {
        slots[m.key].parameter: (stacked[slots[m.key].parameter], m.alpha)
        for m in plan.modules
        if m.key in slots
    }


def stack_shapes(
    universe: Sequence[ExpertLike], slots: Mapping[str, ExpertSlot]
) -> dict[str, tuple[int, int, int]]:
    """(E, out, in) of every parameter holding a slot: E from every expert the checkpoint has
    there, out the rows of one expert's parts together, in their columns."""
    rows: dict[tuple[str, int], int] = {}
    experts: dict[str, set[int]] = {}
    cols: dict[str, int] = {}
    for mat in universe:
        slot = slots.get(mat.key)
        if slot is None:
            continue
        experts.setdefault(slot.parameter, set()).add(slot.expert)
        if slot.expert == 0:
            rows[(slot.parameter, slot.part)] = int(mat.shape[0])
        cols[slot.parameter] = int(mat.shape[1])
    return {
        p: (
            max(found) + 1,
            sum(r for (q, _), r in rows.items() if q == p),
            cols[p],
        )
        for p, found in experts.items()
    }


def stacked_parameters(
    plan: AdapterPlan,
    slots: Mapping[str, ExpertSlot],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    shapes: Mapping[str, tuple[int, int, int]],
) -> dict[str, StackedFactors]:
    """The PEFT `target_parameters` entries of `plan`'s expert matrices: their factors
    (`factors`, by module path) stacked per parameter (`stack_factors`)."""
    by_param: dict[str, dict[tuple[int, int], tuple[Tensor, Tensor]]] = {}
    alphas: dict[str, float] = {}
    ranks = {m.key: m.rank for m in plan.modules if m.key in slots}
    for m in plan.modules:
        slot = slots.get(m.key)
        if slot is None:
            continue
        by_param.setdefault(slot.parameter, {})[(slot.expert, slot.part)] = factors[m.module]
        alphas[slot.parameter] = m.alpha
    stacked = stacked_rank({k: slots[k] for k in ranks}, ranks)
    targeted = sorted(by_param)
    out = {}
    for param, parts in by_param.items():
        E, rows, cols = shapes[param]
        num_parts = max(s.parts for s in slots.values() if s.parameter == param)
        A, B = stack_factors(StackShape(E, rows, cols, stacked[param]), parts, num_parts)
        out[param] = StackedFactors(A, B, E, alphas[param], adapter_key(param, targeted))
    return out
