"""GGML block formats: quantized blocks (bytes) to float32 values, one pure function per type.

A quantized GGUF tensor is a sequence of equal blocks; each block of `type_size` bytes holds
`block_size` consecutive values of a row (rows never share a block). The layouts follow ggml's
`ggml-common.h` block structs (`block_q4_0` ... `block_q6_K`, all little-endian, f16 scales),
and the arithmetic follows ggml's reference `dequantize_row_*` in `ggml-quants.c`, in the same
order of float32 operations, so the values equal the reference dequantizer's (the `gguf`
package's `gguf.quants.dequantize`, which tests compare against) bit for bit.

`decode_blocks(type_name, blocks)` takes a `(n, type_size)` uint8 tensor and returns the
`(n, block_size)` float32 values; `NATIVE` lists the types decoded here. Other types known to
the `gguf` package (IQ*, TQ*, MXFP4, ...) are decoded by that package (`spectra.formats.gguf`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

QK_K = 256  # values per K-quant super-block


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The little-endian float16 at byte `start` of each block, as an (n, 1) float32 column."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: Tensor) -> Tensor:
    """(n, g, k) bytes -> (n, g, 2, k) 4-bit values: low nibbles first, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(packed: Tensor, width: int) -> Tensor:
    """(n, k) bytes -> (n, 8 // width, k) fields of `width` bits, lowest field first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).view(1, -1, 1)
    return (packed.unsqueeze(1) >> shifts) & ((1 << width) - 1)


def _q4_0(b: Tensor) -> Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18]).reshape(-1, 32).to(torch.float32) - 8.0
    return d * q


def _q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20]).reshape(-1, 32).to(torch.float32)
    return d * q + m


def _high_bits_32(qh: Tensor) -> Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j for value j."""
    return _bits(qh, 1).permute(0, 2, 1).reshape(-1, 32)


def _q5_0(b: Tensor) -> Tensor:
    d = _f16(b, 0)
    low = _nibbles(b[:, 6:22]).reshape(-1, 32)
    q = (low | (_high_bits_32(b[:, 2:6]) << 4)).to(torch.float32) - 16.0
    return d * q


def _q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    low = _nibbles(b[:, 8:24]).reshape(-1, 32)
    q = (low | (_high_bits_32(b[:, 4:8]) << 4)).to(torch.float32)
    return d * q + m


def _q8_0(b: Tensor) -> Tensor:
    d = _f16(b, 0)
    q = b[:, 2:34].contiguous().view(torch.int8).to(torch.float32)
    return q * d


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    # value h*128 + s*32 + l is bits 2s..2s+1 of byte 32h + l
    q = _bits(qs.reshape(n * 2, 32), 2).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, packed = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    # 16 six-bit scales: low nibbles in bytes 0-7 (sub-block i: byte i % 8, nibble i // 8),
    # high two bits in bytes 8-11 (sub-block i: byte i % 4, bits 2 * (i // 4))
    low = _nibbles(packed[:, 0:8].reshape(n, 1, 8)).reshape(n, 16)
    high = _bits(packed[:, 8:12], 2).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.int16) - 32
    dl = (d * sc.to(torch.float32)).view(n, 16, 1)
    ql = _bits(qs.reshape(n * 2, 32), 2).reshape(n, 16, 16).to(torch.int16)
    hm = _bits(hmask, 1).reshape(n, 16, 16).to(torch.int16)  # value b*32 + l: bit b of byte l
    q = (ql - ((hm ^ 1) << 2)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K block from its 12 packed bytes."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl, ml = (d * sc).view(n, 8, 1), (dmin * mn).view(n, 8, 1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl, ml = (d * sc).view(n, 8, 1), (dmin * mn).view(n, 8, 1)
    low = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], 1)  # value b*32 + l: bit b of byte l
    q = (low | (high << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b, 208)
    dl = (d * sc).view(n, 16, 1)
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, QK_K)  # h*128 + nibble*64 + j
    high = _bits(qh.reshape(n * 2, 32), 2).reshape(n, QK_K)  # h*128 + s*32 + l
    q = (low | (high << 4)).to(torch.int16) - 32
    return (dl * q.to(torch.float32).view(n, 16, 16)).reshape(n, QK_K)


def _bf16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.bfloat16).to(torch.float32)


def _f16_values(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32).clone()


NATIVE: dict[str, Callable[[Tensor], Tensor]] = {
    "F32": _f32,
    "F16": _f16_values,
    "BF16": _bf16,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
"""The block types decoded here, by GGML type name."""


def decode_blocks(type_name: str, blocks: Tensor) -> Tensor:
    """`(n, type_size)` uint8 blocks of GGML type `type_name` (one of `NATIVE`) -> `(n,
    block_size)` float32 values."""
    return NATIVE[type_name](blocks)
