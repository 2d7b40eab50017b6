"""Which stored tensors make up each quantized weight matrix, from config.json's
`quantization_config` and the tensors present (headers only; bitsandbytes' small JSON quant
states are read).

`find_encoded(tensors, config, read_bytes)` returns a `Quantization`: the scheme, one
`EncodedWeight` (logical name `X.weight` or `X` for a 3-D expert stack, its `Encoded`) per
quantized matrix, and the names of every tensor used as a part (hidden from the plain listing:
scales, zeros, g_idx, absmax... are not matrices). An unknown `quant_method` is a one-line
`SourceError` naming it; fp8 weights with scale tensors are never read raw.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from spectra.errors import SourceError
from spectra.formats.awq import AwqCodec
from spectra.formats.bnb import Bnb4bitCodec, Bnb8bitCodec, QuantState
from spectra.formats.codec import Encoded
from spectra.formats.compressed_tensors import (
    FORMATS,
    STRATEGIES,
    CompressedTensorsCodec,
    WeightArgs,
)
from spectra.formats.fp8 import Fp8BlockCodec
from spectra.formats.gptq import BITS as GPTQ_BITS
from spectra.formats.gptq import GptqCodec
from spectra.formats.mxfp4 import Mxfp4Codec
from spectra.formats.safetensors import TensorRef, clip

ReadBytes = Callable[[TensorRef], bytes]
METHODS = ("fp8", "compressed-tensors", "gptq", "awq", "bitsandbytes", "mxfp4")
_FP8 = ("F8_E4M3", "F8_E5M2")
_HOW = "dequantize it to bf16/fp32 safetensors first (e.g. transformers' dequantize=True)"


@dataclass(frozen=True)
class EncodedWeight:
    """One logical weight: `name` (`X.weight`, or the stack name for 3-D experts), `encoded`,
    and `linear`: the decoded matrix is (out, in) whatever the name's layout (GPTQ/AWQ/bnb)."""

    name: str
    encoded: Encoded
    linear: bool = False


@dataclass(frozen=True)
class Quantization:
    """What `find_encoded` found: `method` (None: a plain checkpoint), the encoded weights, and
    every tensor name used as one of their parts."""

    method: str | None
    weights: tuple[EncodedWeight, ...]
    consumed: frozenset[str]

    def formats(self) -> list[str]:
        """The distinct storage labels, in first-seen order (for reports)."""
        return list(dict.fromkeys(w.encoded.codec.storage.label() for w in self.weights))


NONE = Quantization(None, (), frozenset())


def given_encoded(encoded: Mapping[str, Encoded]) -> Quantization:
    """A `Quantization` of encoded weights a source built itself (GGUF): logical name ->
    `Encoded`, decoded in the (out, in) layout; the method is the first codec's scheme family."""
    weights = tuple(EncodedWeight(name, enc, linear=True) for name, enc in encoded.items())
    method = weights[0].encoded.codec.storage.scheme.split(":")[0] if weights else None
    return Quantization(
        method, weights, frozenset(p.name for w in weights for p in w.encoded.parts)
    )


def find_encoded(
    source: str, tensors: Sequence[TensorRef], config: Mapping[str, object], read: ReadBytes
) -> Quantization:
    """The quantized weights of a checkpoint (see the module docstring)."""
    by_name = {t.name: t for t in tensors}
    qc = config.get("quantization_config", config.get("compression_config"))
    if qc is None:
        method = _guess(source, by_name)
        qc = {}
    elif not isinstance(qc, dict):
        raise SourceError(f"{source}: config.json quantization_config is not an object")
    else:
        method = qc.get("quant_method")
        if method not in METHODS:
            raise SourceError(
                f"{source}: quantization method {clip(method)} (config.json "
                f"quantization_config.quant_method) is not supported; spectra reads "
                f"{', '.join(METHODS)}: {_HOW}"
            )
    if method is None:
        return NONE
    weights = _HANDLERS[method](source, by_name, qc, read)
    consumed = frozenset(p.name for w in weights for p in w.encoded.parts)
    _refuse_raw_fp8(source, by_name, consumed)
    return Quantization(method, tuple(weights), consumed)


def _guess(source: str, by_name: Mapping[str, TensorRef]) -> str | None:
    """The scheme of a checkpoint without a quantization_config, from its tensor names."""
    names = by_name.keys()
    if any(n.endswith(".weight_scale_inv") for n in names):
        return "fp8"
    if any(".quant_state.bitsandbytes__" in n for n in names):
        return "bitsandbytes"
    if any(n.endswith("_blocks") and n[: -len("_blocks")] + "_scales" in names for n in names):
        return "mxfp4"
    for marker in (".qweight", ".weight_packed", ".weight_scale"):
        found = next((n for n in names if n.endswith(marker)), None)
        if found is not None:
            raise SourceError(
                f"{source}: tensor {clip(found)} is quantized, but no config.json with a "
                "quantization_config says how (GPTQ, AWQ and compressed-tensors pack alike): "
                "put the model's config.json beside its weights"
            )
    return None


def _refuse_raw_fp8(
    source: str, by_name: Mapping[str, TensorRef], consumed: frozenset[str]
) -> None:
    for name, ref in by_name.items():
        if ref.dtype in _FP8 and name.endswith(".weight") and name not in consumed:
            if len(ref.shape) == 2:
                raise SourceError(
                    f"{source}: fp8 tensor {clip(name)} has no scale tensor "
                    f"({clip(name + '_scale_inv')} or {clip(name + '_scale')}): read raw its "
                    "spectrum would be the unscaled codes'; the checkpoint is incomplete"
                )


# -- fp8 with block scales --------------------------------------------------------------------
def _fp8(
    source: str, by_name: Mapping[str, TensorRef], qc: Mapping[str, object], read: ReadBytes
) -> list[EncodedWeight]:
    block = _block(source, qc.get("weight_block_size"))
    out = []
    for name, ref in by_name.items():
        scale = by_name.get(name + "_scale_inv")
        if scale is None or not name.endswith(".weight") or ref.dtype not in _FP8:
            continue
        _need_2d(source, ref)
        codec = Fp8BlockCodec(name, block if block is not None else _infer_block(ref, scale))
        _need_shape(source, scale, codec.scale_shape(ref.shape))
        out.append(EncodedWeight(name, Encoded((ref, scale), ref.shape, codec)))
    return out


def _infer_block(ref: TensorRef, scale: TensorRef) -> tuple[int, int] | None:
    """DeepSeek's 128 x 128 when the scale's shape fits it; one scale: per tensor."""
    if math.prod(scale.shape) == 1:
        return None
    return (128, 128)


def _block(source: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (value[0], value[1])
    raise SourceError(
        f"{source}: config.json weight_block_size {clip(value)} must be [rows, cols] > 0"
    )


# -- compressed-tensors -----------------------------------------------------------------------
def _compressed_tensors(
    source: str, by_name: Mapping[str, TensorRef], qc: Mapping[str, object], read: ReadBytes
) -> list[EncodedWeight]:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise SourceError(f"{source}: compressed-tensors quantization_config has no config_groups")
    default_format = qc.get("format")
    args = [_weight_args(source, g, default_format) for g in groups.values() if isinstance(g, dict)]
    args = [a for a in args if a is not None]
    out = []
    for name, ref in by_name.items():
        stem = _stem_of(name, (".weight_packed", ".weight"))
        if stem is None or (stem + ".weight_scale") not in by_name:
            continue
        a = _pick_args(source, args, name, ref)
        scale = by_name[stem + ".weight_scale"]
        zero = by_name.get(stem + ".weight_zero_point")
        g_idx = by_name.get(stem + ".weight_g_idx")
        parts = [ref, scale] + [p for p in (zero, g_idx) if p is not None]
        if a.format == "pack-quantized":
            shape_ref = by_name.get(stem + ".weight_shape")
            if shape_ref is None:
                raise SourceError(f"{source}: {clip(name)} has no {clip(stem + '.weight_shape')}")
            raw = read(shape_ref)
            shape = _int_shape(source, shape_ref, raw)
            parts.append(shape_ref)
        else:
            _need_2d(source, ref)
            shape = (ref.shape[0], ref.shape[1])
        codec = CompressedTensorsCodec(
            stem + ".weight", a, shape, zero is not None, g_idx is not None
        )
        out.append(EncodedWeight(stem + ".weight", Encoded(tuple(parts), shape, codec)))
    return out


def _weight_args(source: str, group: Mapping[str, object], default: object) -> WeightArgs | None:
    weights = group.get("weights")
    if not isinstance(weights, dict):
        return None
    fmt = group.get("format") or default
    strategy = weights.get("strategy")
    if fmt not in FORMATS:
        raise SourceError(
            f"{source}: compressed-tensors format {clip(fmt)} is not supported (spectra reads "
            f"{', '.join(FORMATS)}): {_HOW}"
        )
    if strategy not in STRATEGIES:
        raise SourceError(
            f"{source}: compressed-tensors weight strategy {clip(strategy)} "
            f"is not supported (spectra reads {', '.join(STRATEGIES)})"
        )
    bits = weights.get("num_bits")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise SourceError(f"{source}: compressed-tensors num_bits {clip(bits)} is not 1..8")
    group_size = weights.get("group_size")
    block = _block(source, weights.get("block_structure"))
    return WeightArgs(
        str(fmt),
        bits,
        str(weights.get("type", "int")),
        str(strategy),
        group_size if isinstance(group_size, int) else None,
        block,
        bool(weights.get("symmetric", True)),
    )


def _pick_args(source: str, args: Sequence[WeightArgs], name: str, ref: TensorRef) -> WeightArgs:
    """The group whose format matches how `name` is stored (packed / fp8 / int8)."""
    packed = name.endswith(".weight_packed")
    for a in args:
        if packed == (a.format == "pack-quantized") and (
            packed or (ref.dtype in _FP8) == (a.type == "float")
        ):
            return a
    raise SourceError(
        f"{source}: no compressed-tensors config group matches {clip(name)} "
        f"({ref.dtype}); the config and the weights disagree"
    )


def _int_shape(source: str, ref: TensorRef, raw: bytes) -> tuple[int, int]:
    width = {"I64": 8, "I32": 4, "I16": 2}.get(ref.dtype)
    if width is None or ref.shape != (2,) or len(raw) != 2 * width:
        raise SourceError(
            f"{source}: {clip(ref.name)} must hold 2 integers, got {ref.dtype} {ref.shape}"
        )
    rows, cols = (
        int.from_bytes(raw[i * width : (i + 1) * width], "little", signed=True) for i in range(2)
    )
    if rows <= 0 or cols <= 0:
        raise SourceError(f"{source}: {clip(ref.name)} says shape ({rows}, {cols})")
    return (rows, cols)


# -- GPTQ and AWQ -----------------------------------------------------------------------------
def _gptq(
    source: str, by_name: Mapping[str, TensorRef], qc: Mapping[str, object], read: ReadBytes
) -> list[EncodedWeight]:
    bits = _int_field(source, qc, "bits", 4)
    if bits not in GPTQ_BITS:
        raise SourceError(f"{source}: {bits}-bit GPTQ is not supported (spectra reads {GPTQ_BITS})")
    group = _int_field(source, qc, "group_size", 128)
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise SourceError(
            f"{source}: GPTQ checkpoint_format {clip(fmt)} is not supported "
            "(spectra reads gptq, gptq_v2)"
        )
    out = []
    for stem, qweight, qzeros, scales in _packed_linears(source, by_name):
        per = 32 // bits
        shape = (scales.shape[-1], qweight.shape[0] * per)
        g_idx = by_name.get(stem + ".g_idx")
        parts = (qweight, qzeros, scales) + ((g_idx,) if g_idx is not None else ())
        codec = GptqCodec(stem + ".weight", shape, bits, group, fmt == "gptq", g_idx is not None)
        out.append(EncodedWeight(stem + ".weight", Encoded(parts, shape, codec), linear=True))
    return out


def _awq(
    source: str, by_name: Mapping[str, TensorRef], qc: Mapping[str, object], read: ReadBytes
) -> list[EncodedWeight]:
    bits = _int_field(source, qc, "bits", _int_field(source, qc, "w_bit", 4))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise SourceError(
            f"{source}: AWQ version {clip(version)} with {bits} bits is not "
            f"supported (spectra reads 4-bit GEMM): {_HOW}"
        )
    group = _int_field(source, qc, "group_size", _int_field(source, qc, "q_group_size", 128))
    out = []
    for stem, qweight, qzeros, scales in _packed_linears(source, by_name):
        shape = (qweight.shape[-1] * 8, qweight.shape[0])
        codec = AwqCodec(stem + ".weight", shape, group)
        parts = (qweight, qzeros, scales)
        out.append(EncodedWeight(stem + ".weight", Encoded(parts, shape, codec), linear=True))
    return out


def _packed_linears(
    source: str, by_name: Mapping[str, TensorRef]
) -> list[tuple[str, TensorRef, TensorRef, TensorRef]]:
    out = []
    for name, qweight in by_name.items():
        stem = _stem_of(name, (".qweight",))
        if stem is None:
            continue
        missing = [s for s in (".qzeros", ".scales") if stem + s not in by_name]
        if missing:
            raise SourceError(f"{source}: {clip(name)} has no {clip(stem + missing[0])}")
        for ref in (qweight, by_name[stem + ".qzeros"], by_name[stem + ".scales"]):
            _need_2d(source, ref)
        out.append((stem, qweight, by_name[stem + ".qzeros"], by_name[stem + ".scales"]))
    return out


def _int_field(source: str, qc: Mapping[str, object], key: str, default: int) -> int:
    value = qc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SourceError(
            f"{source}: config.json quantization_config.{key} {clip(value)} must be an integer"
        )
    return value


# -- bitsandbytes -----------------------------------------------------------------------------
_MAX_STATE_BYTES = 1 << 16
_QUANT_STATE = re.compile(r"^(.*\.weight)\.quant_state\.bitsandbytes__(nf4|fp4)$")


def _bitsandbytes(
    source: str, by_name: Mapping[str, TensorRef], qc: Mapping[str, object], read: ReadBytes
) -> list[EncodedWeight]:
    out = []
    for name, ref in by_name.items():
        match = _QUANT_STATE.match(name)
        if match is not None:
            out.append(_bnb4(source, by_name, match.group(1), ref, read))
        elif name.endswith(".SCB"):
            weight = by_name.get(name[: -len("SCB")] + "weight")
            if weight is not None and weight.dtype == "I8" and len(weight.shape) == 2:
                shape = (weight.shape[0], weight.shape[1])
                codec = Bnb8bitCodec(weight.name, shape)
                out.append(EncodedWeight(weight.name, Encoded((weight, ref), shape, codec)))
    return out


def _bnb4(
    source: str,
    by_name: Mapping[str, TensorRef],
    weight_name: str,
    state_ref: TensorRef,
    read: ReadBytes,
) -> EncodedWeight:
    if state_ref.nbytes > _MAX_STATE_BYTES:
        raise SourceError(
            f"{source}: {clip(state_ref.name)} holds {state_ref.nbytes} bytes, "
            "not a bitsandbytes quant state (a few hundred bytes)"
        )
    state = QuantState.parse(read(state_ref), f"{source}: {clip(state_ref.name)}")
    names = [weight_name, weight_name + ".absmax", weight_name + ".quant_map"]
    if state.nested_blocksize is not None:
        names += [weight_name + ".nested_absmax", weight_name + ".nested_quant_map"]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SourceError(
            f"{source}: bitsandbytes weight {clip(weight_name)} has no {clip(missing[0])}"
        )
    parts = tuple(by_name[n] for n in names) + (state_ref,)
    codec = Bnb4bitCodec(weight_name, state)
    return EncodedWeight(weight_name, Encoded(parts, state.shape, codec), linear=True)


# -- MXFP4 ------------------------------------------------------------------------------------
def _mxfp4(
    source: str, by_name: Mapping[str, TensorRef], qc: Mapping[str, object], read: ReadBytes
) -> list[EncodedWeight]:
    out = []
    for name, blocks in by_name.items():
        if not name.endswith("_blocks"):
            continue
        stem = name[: -len("_blocks")]
        scales = by_name.get(stem + "_scales")
        if scales is None:
            raise SourceError(f"{source}: {clip(name)} has no {clip(stem + '_scales')}")
        if len(blocks.shape) not in (3, 4) or blocks.shape[-1] != 16:
            raise SourceError(
                f"{source}: {clip(name)} of shape {blocks.shape} is not MXFP4 "
                "blocks ([experts,] rows, groups, 16)"
            )
        stack = len(blocks.shape) == 4  # (E, out, groups, 16): transformers' (E, in, out)
        rows, cols = blocks.shape[-3], blocks.shape[-2] * 32
        shape = (blocks.shape[0], cols, rows) if stack else (rows, cols)
        logical = stem if stack or stem.endswith(".weight") else stem + ".weight"
        codec = Mxfp4Codec(logical, transpose=stack)
        out.append(EncodedWeight(logical, Encoded((blocks, scales), shape, codec)))
    return out


def _stem_of(name: str, suffixes: Sequence[str]) -> str | None:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _need_2d(source: str, ref: TensorRef) -> None:
    if len(ref.shape) != 2:
        raise SourceError(
            f"{source}: quantized tensor {clip(ref.name)} has shape {ref.shape}, expected 2-D"
        )


def _need_shape(source: str, ref: TensorRef, shape: Sequence[int]) -> None:
    if math.prod(ref.shape) != math.prod(shape):
        raise SourceError(
            f"{source}: {clip(ref.name)} has shape {ref.shape}, expected "
            f"{tuple(shape)} for its weight"
        )


_HANDLERS: dict[
    str,
    Callable[[str, Mapping[str, TensorRef], Mapping[str, object], ReadBytes], list[EncodedWeight]],
] = {
    "fp8": _fp8,
    "compressed-tensors": _compressed_tensors,
    "gptq": _gptq,
    "awq": _awq,
    "bitsandbytes": _bitsandbytes,
    "mxfp4": _mxfp4,
}
