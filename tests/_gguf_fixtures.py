"""GGUF test files written by the `gguf` package's own writer (`GGUFWriter`), quantized by its own
quantizer (`gguf.quants.quantize`) where it has one; K-quant blocks (no quantizer in gguf 0.19)
are built from ggml's block layout with random codes and finite float16 scales."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

#: Byte offsets of the float16 scales (d, dmin) inside one block of each K-quant type.
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANTIZABLE = ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def encode(values: np.ndarray, type_name: str) -> np.ndarray:
    """`values` (float32, rows x cols) stored as `type_name` by the gguf package's quantizer."""
    if type_name == "F32":
        return values.astype(np.float32)
    return quantize(values.astype(np.float32), qtype(type_name))


def kquant_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random, valid `type_name` blocks for a (rows, cols) matrix: (rows, cols/256 * type_size)
    uint8, every byte random except the float16 super-block scales (finite, |d| <= 0.01)."""
    block, size = GGML_QUANT_SIZES[qtype(type_name)]
    rng = np.random.default_rng(seed)
    n = rows * cols // block
    data = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for at in K_SCALE_OFFSETS[type_name]:
        scales = rng.uniform(-0.01, 0.01, size=n).astype(np.float16)
        data[:, at : at + 2] = scales.view(np.uint8).reshape(n, 2)
    return data.reshape(rows, cols // block * size)


def hf_to_gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row permutation, written as explicit row indices: row
    h*d + t*(d/2) + j of the Hugging Face matrix goes to row h*d + 2j + t (d = head dim)."""
    rows = w.shape[0]
    d = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for t in range(2):
            for j in range(d // 2):
                out[h * d + 2 * j + t] = w[h * d + t * (d // 2) + j]
    return out


def write_gguf(
    path: Path,
    tensors: Sequence[tuple[str, np.ndarray, str]],
    *,
    arch: str = "llama",
    ints: dict[str, int] | None = None,
    floats: dict[str, float] | None = None,
) -> Path:
    """Write `(gguf name, stored array, GGML type name)` tensors and metadata with GGUFWriter.

    A stored array is float32/float16 for F32/F16, else the uint8 blocks (`encode`,
    `kquant_blocks`) whose logical shape the writer derives from the type.
    """
    writer = GGUFWriter(str(path), arch)
    for key, value in (ints or {}).items():
        writer.add_uint32(key, value)
    for key, value in (floats or {}).items():
        writer.add_float32(key, value)
    for name, data, type_name in tensors:
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype(type_name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_meta(
    *, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int
) -> dict[str, int]:
    """The integer metadata llama.cpp writes for a llama model."""
    return {
        "llama.block_count": layers,
        "llama.embedding_length": hidden,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.feed_forward_length": ffn,
        "llama.context_length": 128,
        "llama.vocab_size": vocab,
    }


def tiny_llama_gguf(
    path: Path,
    hf: dict[str, np.ndarray],
    *,
    heads: int,
    kv_heads: int,
    type_name: str = "Q8_0",
    tied: bool = True,
) -> Path:
    """A llama GGUF file holding the Hugging Face weights `hf` (float32, HF names) the way
    convert_hf_to_gguf.py stores them: llama.cpp names, q/k rows permuted, matrices stored as
    `type_name`, norms as F32."""
    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    out = []
    layers = 0
    for name, value in hf.items():
        if name == "lm_head.weight" and tied:
            continue
        if name in gguf_names:
            gname = gguf_names[name]
        else:
            parts = name.split(".")  # model.layers.N.<module...>.weight
            layer, module = int(parts[2]), ".".join(parts[3:-1])
            layers = max(layers, layer + 1)
            gname = f"blk.{layer}.{block[module]}.weight"
        if name.endswith("q_proj.weight"):
            value = hf_to_gguf_permute(value, heads)
        elif name.endswith("k_proj.weight"):
            value = hf_to_gguf_permute(value, kv_heads)
        if value.ndim == 1:
            out.append((gname, value.astype(np.float32), "F32"))
        else:
            out.append((gname, encode(value, type_name), type_name))
    hidden = hf["model.embed_tokens.weight"].shape[1]
    vocab = hf["model.embed_tokens.weight"].shape[0]
    ffn = hf["model.layers.0.mlp.up_proj.weight"].shape[0]
    meta = llama_meta(
        layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, vocab=vocab
    )
    return write_gguf(path, out, ints=meta, floats={"llama.attention.layer_norm_rms_epsilon": 1e-5})


def llama_weights(
    *, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random float32 weights of a Llama model, Hugging Face names and shapes."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": mat(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = mat(ffn, hidden)
        w[p + "mlp.up_proj.weight"] = mat(ffn, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, ffn)
        w[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
    w["model.norm.weight"] = np.ones(hidden, dtype=np.float32)
    return w
