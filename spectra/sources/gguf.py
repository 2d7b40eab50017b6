"""A GGUF file (llama.cpp) as a checkpoint: Hugging Face names, un-permuted q/k, decoded blocks.

`gguf_layout(path)` turns the validated header (`spectra.formats.gguf.read_gguf`) into what
`spectra.sources.checkpoint.Checkpoint` lists:

- every weight matrix (2-D, or a 3-D expert stack) as an `Encoded` of one uint8 part, the
  tensor's byte range shaped `(*rows, row_bytes)`, decoded by `GgufCodec` (any GGML type);
- every other tensor (norms, biases: unquantized) as a plain `TensorRef`;
- names mapped from llama.cpp's to Hugging Face's (`blk.N.attn_q.weight` ->
  `model.layers.N.self_attn.q_proj.weight`, `token_embd` -> `model.embed_tokens`, `output` ->
  `lm_head`, ...), so roles, `compare` pairing and PEFT target modules are those of the
  transformers model; names without a mapping keep their GGUF name;
- for architectures whose converter permutes q/k rows (llama), the permutation undone with the
  head counts of the metadata (`{arch}.attention.head_count`, `head_count_kv` for k);
- a transformers-style config (`hidden_size`, heads, layers, `tie_word_embeddings`, ...) built
  from the metadata.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectra.errors import SourceError
from spectra.formats.codec import Encoded
from spectra.formats.gguf import GgufCodec, GGUFFile, GGUFTensor, read_gguf
from spectra.formats.safetensors import ShardHeader, TensorRef

#: llama.cpp block tensor names -> Hugging Face module paths inside `model.layers.N.`.
BLOCK_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
#: llama.cpp top-level tensor names -> Hugging Face names.
TOP_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
#: Architectures whose convert_hf_to_gguf.py permutes the q and k rows (`LlamaModel.permute`).
PERMUTED_QK = frozenset({"llama"})
#: Architectures converted without that permutation (rotary embedding in the NeoX layout).
UNPERMUTED_QK = frozenset(
    {"qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "phi3", "starcoder2"}
)
_BLOCK = re.compile(r"^blk\.(\d{1,9})\.([A-Za-z0-9_]+)\.(weight|bias)$")
_TOP = re.compile(r"^([A-Za-z0-9_]+)\.(weight|bias)$")


class GgufPermutationWarning(UserWarning):
    """A GGUF file of an architecture for which spectra does not know whether llama.cpp's
    converter permuted the q/k rows: they are read as stored."""


@dataclass(frozen=True)
class GgufLayout:
    """What a Checkpoint lists for a GGUF file: the plain tensors (as one header), the encoded
    matrices by Hugging Face name, and a transformers-style config."""

    header: ShardHeader
    encoded: dict[str, Encoded]
    config: dict[str, object]
    names: dict[str, str]  # Hugging Face name -> GGUF name


def hf_name(name: str) -> str:
    """The Hugging Face name of llama.cpp tensor `name` (itself when there is no mapping)."""
    block = _BLOCK.match(name)
    if block is not None:
        layer, part, kind = block.groups()
        mapped = BLOCK_NAMES.get(part)
        if mapped is None:
            return name
        if part.endswith("_exps") and kind == "weight":  # a 3-D stack: a parameter, no .weight
            return f"model.layers.{int(layer)}.{mapped}"
        return f"model.layers.{int(layer)}.{mapped}.{kind}"
    top = _TOP.match(name)
    if top is not None and top.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[top.group(1)]}.{top.group(2)}"
    return name


def gguf_layout(path: Path) -> GgufLayout:
    """Read the header of the GGUF file `path` and map it (see the module docstring)."""
    parsed = read_gguf(path)
    heads = _head_counts(parsed)
    plain: list[TensorRef] = []
    encoded: dict[str, Encoded] = {}
    names: dict[str, str] = {}
    for t in parsed.tensors:
        name = hf_name(t.name)
        if name in names:
            raise SourceError(
                f"{path}: tensors {names[name]!r} and {t.name!r} both map to {name!r}: "
                "not a valid GGUF file"
            )
        names[name] = t.name
        if t.name.endswith(".weight") and len(t.ne) in (2, 3):
            encoded[name] = _encoded(t, path, heads.get(_qk(name)))
        elif not t.quantized:
            plain.append(_plain(t, name, path))
    metadata = {k: str(v) for k, v in parsed.metadata.items() if isinstance(v, (str, int, float))}
    header = ShardHeader(path, parsed.size, parsed.data_start, tuple(plain), metadata)
    return GgufLayout(header, encoded, gguf_config(parsed), names)


def _qk(name: str) -> str | None:
    if name.endswith("self_attn.q_proj.weight"):
        return "q"
    if name.endswith("self_attn.k_proj.weight"):
        return "k"
    return None


def _head_counts(parsed: GGUFFile) -> dict[str | None, int]:
    """Head counts to undo the q/k permutation with, or {} when the architecture has none."""
    arch = parsed.architecture
    if arch in UNPERMUTED_QK:
        return {}
    if arch not in PERMUTED_QK:
        warnings.warn(
            f"{parsed.path}: GGUF architecture {str(arch)[:40]!r}: spectra does not know whether "
            "llama.cpp permuted its q/k rows, so they are read as stored (singular values are "
            "unaffected; q/k singular vectors and adapters may not match the Hugging Face model)",
            GgufPermutationWarning,
            stacklevel=3,
        )
        return {}
    n_head = _int_meta(parsed, f"{arch}.attention.head_count")
    n_kv = _int_meta(parsed, f"{arch}.attention.head_count_kv", default=n_head)
    return {"q": n_head, "k": n_kv}


def _int_meta(parsed: GGUFFile, key: str, default: int | None = None) -> int:
    value = parsed.metadata.get(key, default)
    if isinstance(value, tuple) and value:  # per-layer head counts: all equal or refused
        if len(set(value)) != 1:
            raise SourceError(f"{parsed.path}: {key} varies by layer ({value[:4]}...): unsupported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SourceError(
            f"{parsed.path}: metadata {key} is {str(value)[:40]}, not a positive integer: "
            "the head count is needed to undo llama.cpp's q/k row permutation"
        )
    return value


def _encoded(t: GGUFTensor, path: Path, heads: int | None) -> Encoded:
    row_bytes = t.ne[0] // t.block_size * t.type_size
    rows = t.shape[:-1]
    part = TensorRef(t.name, (*rows, row_bytes), "U8", path, t.offset, t.nbytes)
    codec = GgufCodec(t.type_name, t.block_size, t.type_size, heads)
    return Encoded((part,), t.shape, codec)


def _plain(t: GGUFTensor, name: str, path: Path) -> TensorRef:
    # the unquantized GGML type names are the safetensors dtype names (F32, F16, BF16, I8, ...)
    return TensorRef(name, t.shape, t.type_name, path, t.offset, t.nbytes)


def gguf_config(parsed: GGUFFile) -> dict[str, object]:
    """A transformers-style config from the GGUF metadata (the fields present; for llama the
    `LlamaConfig` fields, so `LlamaForCausalLM(LlamaConfig(**config))` has these weights)."""
    arch = parsed.architecture or "unknown"
    meta = parsed.metadata
    fields = {
        "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_hidden_layers": f"{arch}.block_count",
        "num_attention_heads": f"{arch}.attention.head_count",
        "num_key_value_heads": f"{arch}.attention.head_count_kv",
        "max_position_embeddings": f"{arch}.context_length",
        "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
        "rope_theta": f"{arch}.rope.freq_base",
        "vocab_size": f"{arch}.vocab_size",
        "head_dim": f"{arch}.attention.key_length",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
    }
    config: dict[str, Any] = {"model_type": arch}
    if arch == "llama":
        config["architectures"] = ["LlamaForCausalLM"]
    for field, key in fields.items():
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            config[field] = value
    names = {t.name for t in parsed.tensors}
    embd = next((t for t in parsed.tensors if t.name == "token_embd.weight"), None)
    if "vocab_size" not in config and embd is not None and len(embd.ne) == 2:
        config["vocab_size"] = embd.ne[1]
    config["tie_word_embeddings"] = "output.weight" not in names
    return config
