"""What each tensor is, from its name and header alone: weight matrix or not, role, layer, layout.

Roles: q k v o qkv up gate down gate_up expert shared_expert router embedding lm_head other.
Conventions covered:
Llama/Mistral/Qwen/Gemma (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj/up_proj/down_proj`),
Meta originals (`wq wk wv wo`, `feed_forward.w1/w2/w3`), GPT-2 (`h.N.attn.c_attn` fused qkv,
`attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`, all `Conv1D` stored (in, out) and presented transposed),
BERT (`attention.self.query/key/value`, `attention.output.dense`, `intermediate.dense`,
`output.dense`), GPT-NeoX/Falcon fused `query_key_value`, Mixtral (`block_sparse_moe.experts.E.w1`
gate, `w3` up, `w2` down), Qwen-MoE (`mlp.experts.E.gate_proj`...), and 3-D expert stacks
(`mlp.experts.gate_up_proj` of shape (E, ...), split into one matrix per expert).

Mixture-of-experts parts besides the routed experts (role "expert", with `expert` and
`expert_role`): the router, role "router" (Mixtral/Phi-MoE `block_sparse_moe.gate`, Qwen-MoE,
OLMoE and DeepSeek `mlp.gate` (not `gate_proj`), gpt-oss `mlp.router`, DBRX/JetMoE/Granite
`router.layer`, and Qwen2-MoE's scalar gate of its shared expert `mlp.shared_expert_gate`);
shared experts, role "shared_expert" with `expert` None and `expert_role` up/gate/down (Qwen-MoE
`mlp.shared_expert.*`, DeepSeek `mlp.shared_experts.*`): always active, so never part of a
per-expert comparison.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spectra.errors import SourceError
from spectra.formats.codec import Encoded
from spectra.formats.safetensors import DTYPES, TensorRef, clip

#: Most experts one 3-D stack may hold (real MoE models have up to a few hundred). Each expert
#: becomes a MatrixRef, so a tiny hostile stack of (10**8, 1, 1) would otherwise cost gigabytes.
MAX_EXPERTS = 1 << 16

ROLES: tuple[str, ...] = (
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "up",
    "gate",
    "down",
    "gate_up",
    "expert",
    "shared_expert",
    "router",
    "embedding",
    "lm_head",
    "other",
)


@dataclass(frozen=True)
class MatrixRef:
    """One weight matrix as analyses see it: (out, in), whatever the storage layout.

    `key` is the tensor name, or `name[expert=E]` for slice E of a 3-D expert stack. `transpose`
    says the stored matrix is (in, out) (GPT-2 Conv1D). `expert`/`expert_role` are set for MoE
    experts (role "expert"); `expert_role` is up/gate/down/gate_up inside the expert.
    `encoded` is set for a matrix whose stored tensors need decoding (quantized checkpoints,
    GGUF): then `key` is the logical weight name, `tensor` the primary stored part, and reads
    decode every part (`spectra.formats.codec`).
    """

    key: str
    tensor: TensorRef
    role: str
    layer: int | None
    shape: tuple[int, int]
    transpose: bool = False
    expert: int | None = None
    expert_role: str | None = None
    encoded: Encoded | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Stored bytes (every part of an encoded matrix)."""
        if self.encoded is not None:
            return self.encoded.nbytes
        return self.numel * DTYPES[self.tensor.dtype].itemsize

    @property
    def storage(self) -> str:
        """How the matrix is stored: the codec's label, or the safetensors dtype."""
        if self.encoded is not None:
            return self.encoded.codec.storage.label()
        return self.tensor.dtype

    @property
    def offset(self) -> int:
        """Absolute byte offset of this matrix's data (an expert slice starts inside its stack)."""
        if self.encoded is not None:
            return self.encoded.primary.offset
        if self.expert is None or len(self.tensor.shape) != 3:
            return self.tensor.offset
        return self.tensor.offset + self.expert * self.nbytes


# Ordered: the first rule whose regex matches the name (without `.weight`) gives the role.
_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(lm_head|embed_out)$", "lm_head"),
    (
        r"(^|\.)(embed_tokens|tok_embeddings|wte|wpe|word_embeddings|position_embeddings"
        r"|token_type_embeddings|embed_positions|shared)$",
        "embedding",
    ),
    # the MoE router: a (num_experts, hidden) Linear; before the gate rules (it is no gate_proj)
    (
        r"(^|\.)(block_sparse_moe|mlp|moe)\.gate$|(^|\.)router(\.layer)?$"
        r"|(^|\.)shared_expert_gate$",
        "router",
    ),
    (r"(^|\.)(qkv_proj|c_attn|query_key_value|Wqkv|W_pack|qkv)$", "qkv"),
    (r"(^|\.)(q_proj|query|wq|q_lin)$|(SelfAttention|EncDecAttention)\.q$", "q"),
    (r"(^|\.)(k_proj|key|wk|k_lin)$|(SelfAttention|EncDecAttention)\.k$", "k"),
    (r"(^|\.)(v_proj|value|wv|v_lin)$|(SelfAttention|EncDecAttention)\.v$", "v"),
    (r"DenseReluDense\.wo$", "down"),
    (r"DenseReluDense\.wi_0$", "gate"),
    (r"DenseReluDense\.wi(_1)?$", "up"),
    (
        r"(^|\.)(o_proj|out_proj|wo|out_lin)$|attention\.output\.dense$|attn\.c_proj$"
        r"|(attention|self_attn)\.dense$|(SelfAttention|EncDecAttention)\.o$",
        "o",
    ),
    (r"(^|\.)gate_up_proj$", "gate_up"),
    (r"(^|\.)(gate_proj|w1)$", "gate"),
    (r"(^|\.)(up_proj|c_fc|fc1|w3|dense_h_to_4h|lin1)$|intermediate\.dense$", "up"),
    (r"(^|\.)(down_proj|fc2|w2|dense_4h_to_h|lin2)$|mlp\.c_proj$|output\.dense$", "down"),
)
_COMPILED = tuple((re.compile(pattern), role) for pattern, role in _RULES)
# at most 9 digits: a "layer" of thousands of digits is no layer (int() would refuse it past
# Python's 4300-digit limit with a ValueError; issue 14), and it is read as a name without one
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d{1,9})\.")
_EXPERT = re.compile(r"(?:^|\.)experts\.(\d{1,9})\.")
_SHARED = re.compile(r"(?:^|\.)shared_experts?\.")
_EXPERT_ROLES = ("up", "gate", "down", "gate_up")
_CONV1D = re.compile(
    r"(?:^|\.)h\.\d+\.(?:attn\.c_attn|attn\.q_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"
)
_NOT_WEIGHT = re.compile(r"(norm|_scale|_scale_inv|\.scales|qzeros|g_idx)", re.IGNORECASE)
_STACK_NAMES = re.compile(r"(^|\.)experts\.(gate_up_proj|gate_proj|up_proj|down_proj|w1|w2|w3)$")


def name_role(stem: str) -> str:
    """Role of a module path such as `model.layers.3.self_attn.q_proj` (no `.weight`)."""
    for pattern, role in _COMPILED:
        if pattern.search(stem):
            return role
    return "other"


def layer_index(name: str) -> int | None:
    """Block index from `layers.N.` / `layer.N.` / `h.N.` / `blocks.N.`, else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


_STACK_KEY = re.compile(r"^(.*)\[expert=(\d{1,9})\]$")


def expert_slot(key: str) -> tuple[int | None, str | None]:
    """(expert index, role inside the expert) of a matrix key, as `classify` sets them on its
    MatrixRef: `...experts.3.w1.weight` -> (3, "gate"), `...experts.down_proj[expert=2]` ->
    (2, "down"), `...shared_expert.up_proj.weight` -> (None, "up"); (None, None) for a matrix
    of no expert. For results that keep only the key (an `Analysis` read back from JSON)."""
    stack = _STACK_KEY.match(key)
    if stack is not None:
        role = name_role(stack.group(1))
        return int(stack.group(2)), role if role in _EXPERT_ROLES else None
    stem = key.removesuffix(".weight")
    match = _EXPERT.search(key)
    if match is None and not _SHARED.search(key):
        return None, None
    role = name_role(stem)
    return (None if match is None else int(match.group(1))), (
        role if role in _EXPERT_ROLES else None
    )


def classify(ref: TensorRef, *, hidden_size: int | None = None) -> list[MatrixRef]:
    """The weight matrices inside `ref`: none (norms, biases, 1-D, integer), one, or one per expert.

    `hidden_size` (from config.json, optional) resolves the layout of 3-D expert stacks: without
    it a stack is read as stored, (E, out, in), the transformers layout; with it a stack whose
    `in` side is not the model width is presented transposed.
    """
    dtype = DTYPES[ref.dtype]
    if not dtype.is_float or 0 in ref.shape or _NOT_WEIGHT.search(ref.name):
        return []
    if ref.name.endswith(".weight") and len(ref.shape) == 2:
        rows, cols = ref.shape
        return [_matrix_2d(ref.name, ref, (rows, cols))]
    if len(ref.shape) == 3 and _STACK_NAMES.search(ref.name):
        n_experts, rows, cols = ref.shape
        return _expert_stack(ref.name, ref, (n_experts, rows, cols), hidden_size)
    return []


def classify_encoded(
    name: str, encoded: Encoded, *, hidden_size: int | None = None, linear: bool = False
) -> list[MatrixRef]:
    """The weight matrices of the logical tensor `name` stored as `encoded`: one for a 2-D
    matrix, one per expert for a 3-D expert stack, none for anything else (an encoded embedding
    is still a matrix). `linear`: the decoded matrix is always (out, in), whatever a GPT-2
    Conv1D name says (GPTQ/AWQ pack the Linear layout)."""
    if 0 in encoded.shape:
        return []
    if name.endswith(".weight") and len(encoded.shape) == 2:
        rows, cols = encoded.shape
        return [_matrix_2d(name, encoded.primary, (rows, cols), encoded, linear=linear)]
    if len(encoded.shape) == 3 and _STACK_NAMES.search(name):
        n_experts, rows, cols = encoded.shape
        return _expert_stack(name, encoded.primary, (n_experts, rows, cols), hidden_size, encoded)
    return []


def _matrix_2d(
    name: str,
    ref: TensorRef,
    stored: tuple[int, int],
    encoded: Encoded | None = None,
    *,
    linear: bool = False,
) -> MatrixRef:
    stem = name[: -len(".weight")]
    role = name_role(stem)
    transpose = not linear and bool(_CONV1D.search(stem))
    rows, cols = stored
    shape = (cols, rows) if transpose else (rows, cols)
    layer = layer_index(name)
    expert_match = _EXPERT.search(name)
    expert_role = role if role in _EXPERT_ROLES else None
    if expert_match is None and _SHARED.search(name):
        return MatrixRef(
            name, ref, "shared_expert", layer, shape, transpose, None, expert_role, encoded=encoded
        )
    if expert_match is None:
        return MatrixRef(name, ref, role, layer, shape, transpose, encoded=encoded)
    expert = int(expert_match.group(1))
    return MatrixRef(
        name, ref, "expert", layer, shape, transpose, expert, expert_role, encoded=encoded
    )


def _expert_stack(
    name: str,
    ref: TensorRef,
    stored: tuple[int, int, int],
    hidden_size: int | None,
    encoded: Encoded | None = None,
) -> list[MatrixRef]:
    n_experts, rows, cols = stored
    if n_experts > MAX_EXPERTS:
        raise SourceError(
            f"{ref.shard}: tensor {clip(name)} stacks {n_experts} experts, more than "
            f"{MAX_EXPERTS}: not a real MoE layer"
        )
    expert_role = name_role(name)
    transpose = _stack_transposed(expert_role, rows, cols, hidden_size)
    shape = (cols, rows) if transpose else (rows, cols)
    layer = layer_index(name)
    return [
        MatrixRef(
            f"{name}[expert={e}]",
            ref,
            "expert",
            layer,
            shape,
            transpose,
            e,
            expert_role if expert_role != "other" else None,
            None if encoded is None else encoded.expert(e),
        )
        for e in range(n_experts)
    ]


def _stack_transposed(role: str, rows: int, cols: int, hidden: int | None) -> bool:
    """gate/up/gate_up read the model width (in = hidden); down writes it (out = hidden)."""
    if hidden is None or rows == cols:
        return False
    if role == "down":
        return cols == hidden and rows != hidden
    return rows == hidden and cols != hidden
