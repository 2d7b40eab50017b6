"""Reference quantizers for the quantized-checkpoint tests, written from each format's spec and
its reference code (AutoGPTQ's and AutoAWQ's `pack`, DeepSeek-V3's fp8 block scaling), with
plain loops over the packed words: independent of spectra's vectorized unpacking. Each returns
the tensors as the format stores them and the reference dequantization (from the integer codes,
never from the packed words)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def write_checkpoint(
    folder: Path, tensors: dict[str, torch.Tensor], quantization: dict[str, object] | None
) -> Path:
    """`folder/model.safetensors` + a Llama-like config.json with `quantization_config`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config: dict[str, object] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if quantization is not None:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def planted(rows: int, cols: int, seed: int = 0, decay: float = 0.9) -> torch.Tensor:
    """A float32 matrix with singular values 1, decay, decay^2, ... (known spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * s) @ V.T).to(torch.float32)


def fp8_block_quantize(
    W: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 style: per (b0 x b1) block, scale = amax / 448, code = fp8(W / scale);
    returns (weight fp8, weight_scale_inv float32, dequantized float32)."""
    rows, cols = W.shape
    b0, b1 = block
    R, C = math.ceil(rows / b0), math.ceil(cols / b1)
    scale = torch.empty(R, C)
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    deq = torch.empty(rows, cols)
    for i in range(R):
        for j in range(C):
            blk = W[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            s = float(blk.abs().max()) / 448.0 or 1.0
            scale[i, j] = s
            q = (blk / s).to(torch.float8_e4m3fn)
            codes[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = q
            deq[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = q.to(torch.float32) * s
    return codes, scale, deq


def int_quantize(
    W: torch.Tensor, bits: int, group: int, *, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise min/max integer quantization of W (out, in) along `in`: (codes (out, in) in
    [0, 2^bits), zeros (out, groups) ints, scales (out, groups) float16)."""
    out, cols = W.shape
    groups = cols // group
    maxq = (1 << bits) - 1
    Wg = W.reshape(out, groups, group)
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    if sym:
        amax = torch.maximum(lo.abs(), hi)
        scale = (2 * amax / maxq).clamp(min=1e-8)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = ((hi - lo) / maxq).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
    scale = scale.to(torch.float16)
    codes = torch.clamp(torch.round(Wg / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    return codes.reshape(out, cols).to(torch.int64), zero.to(torch.int64), scale


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's qweight packing: word row r holds value rows r*per .. r*per+per-1, value k at
    bit k*bits (loops over rows, as its `pack`)."""
    per = 32 // bits
    rows, cols = values.shape
    out = torch.zeros(rows // per, cols, dtype=torch.int64)
    for r in range(rows // per):
        for k in range(per):
            out[r] |= values[r * per + k] << (bits * k)
    return _as_int32(out)


def _pack_cols(
    values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None
) -> torch.Tensor:
    per = 32 // bits
    order = order or tuple(range(per))
    rows, cols = values.shape
    out = torch.zeros(rows, cols // per, dtype=torch.int64)
    for c in range(cols // per):
        for k in range(per):
            out[:, c] |= values[:, c * per + order[k]] << (bits * k)
    return _as_int32(out)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(
    W: torch.Tensor, bits: int, group: int, *, v1: bool = True, act_order: bool = False, sym=True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(qweight, qzeros, scales, g_idx) as AutoGPTQ stores them, and the dequantized (out, in)."""
    out, cols = W.shape
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(1)) if act_order else None
    Wp = W[:, perm] if perm is not None else W
    codes_p, zeros, scales = int_quantize(Wp, bits, group, sym=sym)
    g_idx_p = torch.arange(cols) // group  # group of each permuted column
    codes = torch.empty_like(codes_p)
    g_idx = torch.empty_like(g_idx_p)
    if perm is not None:
        codes[:, perm] = codes_p
        g_idx[perm] = g_idx_p
    else:
        codes, g_idx = codes_p, g_idx_p
    deq = (codes - zeros[:, g_idx]).to(torch.float32) * scales.float()[:, g_idx]
    stored_zeros = (zeros - 1) & ((1 << bits) - 1) if v1 else zeros  # v1 stores z - 1
    tensors = {
        "qweight": _pack_rows(codes.T.contiguous(), bits),
        "qzeros": _pack_cols(stored_zeros.T.contiguous(), bits),
        "scales": scales.T.contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, deq


def awq_tensors(W: torch.Tensor, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(qweight, qzeros, scales) as AutoAWQ's GEMM `pack` stores them, and the dequantized."""
    codes, zeros, scales = int_quantize(W, 4, group, sym=False)
    cols = W.shape[1]
    g = torch.arange(cols) // group
    deq = (codes - zeros[:, g]).to(torch.float32) * scales.float()[:, g]
    tensors = {
        "qweight": _pack_cols(codes.T.contiguous(), 4, AWQ_ORDER),
        "qzeros": _pack_cols(zeros.T.contiguous(), 4, AWQ_ORDER),
        "scales": scales.T.contiguous(),
    }
    return tensors, deq


E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def mxfp4_quantize(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX quantization of W (rows, 32 G) (the spec's recipe): per block of 32 the shared
    exponent is floor(log2(amax)) - 2 (e2m1's largest value is 1.5 * 2^2), each value rounds to
    the nearest e2m1; returns (blocks uint8 (rows, G, 16), low nibble first; scales uint8)."""
    rows, cols = W.shape
    blocks = W.reshape(rows, cols // 32, 32)
    amax = blocks.abs().amax(-1).clamp(min=2.0**-120)
    exponent = torch.floor(torch.log2(amax)) - 2
    scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
    mags = torch.tensor(E2M1_MAGNITUDES)
    index = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(-1)  # nearest magnitude
    codes = index + 8 * (scaled < 0).to(torch.int64)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)
