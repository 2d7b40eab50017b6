"""The residual base of a quantized (or GGUF) checkpoint: written dequantized, from the
`Checkpoint` API, one tensor in memory at a time.

A residual `W - s B A` cannot be stored back into 4-bit codes without destroying what the adapter
is meant to restore, and a checkpoint that mixes packed codes with float matrices loads in no
library. So every encoded weight of the source (planned or not) is written under its logical
name (`X.weight`; a whole expert stack under its stack name) as float: float32 with
``upcast`` (``--residual-dtype float32``), else the model's float dtype (config.json's
`torch_dtype`/`dtype` when it is float16/bfloat16/float32, bfloat16 otherwise). Its side tensors
(scales, zeros, g_idx, absmax, quant states) are dropped; every other tensor is copied byte for
byte (or converted to float32 with ``upcast``, as `spectra.export.residual` does). Output shards
keep the source's shard names (a `.gguf` source becomes `model.safetensors`) and tensor order; the
index is rewritten when the source had several shards, and config.json is the source's config
without `quantization_config`, naming the written dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from spectra.errors import SourceError, ValidationError
from spectra.export.residual import HALF_DTYPES, copy_side_files, storage_dtype
from spectra.formats.files import open_input
from spectra.formats.safetensors import DTYPES, INDEX_NAME, TensorRef, header_bytes
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.quantized import EncodedWeight
from spectra.sources.reader import read_encoded

Replace = Callable[[str], Tensor | None]
_CHUNK = 16 << 20
_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class DequantizedBaseWarning(UserWarning):
    """`spectra init` on a quantized base wrote its residual base dequantized."""


def decoded_dtype(ckpt: Checkpoint, *, upcast: bool) -> str:
    """The safetensors dtype an encoded weight of `ckpt` is written in (module docstring)."""
    if upcast:
        return "F32"
    for key in ("torch_dtype", "dtype"):
        name = _NAMES.get(str(ckpt.config.get(key)))
        if name is not None:
            return name
    return "BF16"


@dataclass(frozen=True)
class _Entry:
    """One output tensor: copied from `source`, or an encoded `weight` decoded (or replaced)."""

    ref: TensorRef  # name, dtype, shape as written
    position: tuple[int, int]  # (shard rank, offset) in the source: the output order
    source: TensorRef | None = None
    weight: EncodedWeight | None = None


def write_decoded_checkpoint(
    ckpt: Checkpoint,
    out_dir: str | Path,
    replace: Replace,
    *,
    upcast: bool = False,
    copy_files: bool = True,
) -> list[str]:
    """Write `ckpt` into `out_dir` (created) with every encoded weight decoded and with
    ``replace(name)``'s tensor (same shape, the written dtype) for the names it returns one for.
    Returns every replaced name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = decoded_dtype(ckpt, upcast=upcast)
    shards = _output_shards(ckpt, target, upcast)
    replaced: list[str] = []
    weight_map: dict[str, str] = {}
    for file_name, entries in shards.items():
        replaced += _write_shard(ckpt, out / file_name, entries, replace)
        weight_map.update(dict.fromkeys((e.ref.name for e in entries), file_name))
    if copy_files:
        copy_side_files(ckpt.files[0].parent, out, list(ckpt.files))
    _write_index(out, shards, weight_map)
    _write_config(out, ckpt, target)
    return replaced


def _output_shards(ckpt: Checkpoint, target: str, upcast: bool) -> dict[str, list[_Entry]]:
    rank = {path: i for i, path in enumerate(ckpt.files)}
    names = {path: _shard_name(path) for path in ckpt.files}
    if len(set(names.values())) != len(names):
        raise ValidationError(f"shard file names repeat: {sorted(names.values())}")
    entries: list[tuple[Path, _Entry]] = []
    consumed = ckpt.quantization.consumed
    for t in ckpt.tensors():
        if t.name in consumed:
            continue
        dtype = "F32" if upcast and t.dtype in HALF_DTYPES else t.dtype
        ref = TensorRef(t.name, t.shape, dtype, t.shard, 0, t.numel * DTYPES[dtype].itemsize)
        entries.append((t.shard, _Entry(ref, (rank[t.shard], t.offset), source=t)))
    for w in ckpt.quantization.weights:
        primary = w.encoded.primary
        shape = tuple(w.encoded.shape)
        nbytes = math.prod(shape) * DTYPES[target].itemsize
        ref = TensorRef(w.name, shape, target, primary.shard, 0, nbytes)
        entries.append(
            (primary.shard, _Entry(ref, (rank[primary.shard], primary.offset), weight=w))
        )
    by_shard: dict[str, list[_Entry]] = {names[p]: [] for p in ckpt.files}
    for shard, entry in sorted(entries, key=lambda item: item[1].position):
        by_shard[names[shard]].append(entry)
    return {name: items for name, items in by_shard.items() if items}


def _shard_name(path: Path) -> str:
    return path.name if path.suffix == ".safetensors" else "model.safetensors"


def _write_shard(ckpt: Checkpoint, dst: Path, entries: list[_Entry], replace: Replace) -> list[str]:
    replaced = []
    with ExitStack() as stack, dst.open("wb") as fout:
        opened: dict[Path, BinaryIO] = {}

        def open_shard(shard: Path) -> BinaryIO:
            if shard not in opened:
                if not shard.is_file():
                    raise SourceError(
                        f"shard {str(shard)!r} is not a local file; download it first"
                    )
                opened[shard] = stack.enter_context(open_input(shard, "shard"))
            return opened[shard]

        fout.write(header_bytes([e.ref for e in entries], {"format": "pt"}))
        for entry in entries:
            value = replace(entry.ref.name)
            if value is not None:
                replaced.append(entry.ref.name)
            elif entry.source is not None:
                _copy(open_shard(entry.source.shard), fout, entry.source, entry.ref.dtype)
                continue
            elif entry.weight is not None:
                value = read_encoded(open_shard, entry.weight.encoded)
            else:
                raise ValidationError(f"nothing to write for {entry.ref.name!r}")
            fout.write(_bytes(entry.ref, value, exact=entry.weight is None))
            del value
    return replaced


def _copy(src: BinaryIO, dst: BinaryIO, ref: TensorRef, dtype: str) -> None:
    """`ref`'s bytes, as stored or (a half-precision tensor with `dtype` F32) as float32."""
    src.seek(ref.offset)
    left = ref.nbytes
    while left > 0:
        chunk = src.read(min(_CHUNK, left))
        if not chunk or (dtype != ref.dtype and len(chunk) % 2):
            raise SourceError(f"{ref.shard}: file ends early (truncated shard?)")
        left -= len(chunk)
        if dtype != ref.dtype:
            values = torch.frombuffer(bytearray(chunk), dtype=storage_dtype(ref.dtype))
            chunk = values.to(torch.float32).view(torch.uint8).numpy().tobytes()
        dst.write(chunk)


def _bytes(ref: TensorRef, value: Tensor, *, exact: bool) -> bytes:
    """`value` as `ref` stores it; a replacement of a plain tensor must come in that dtype
    already (`exact`), a decoded weight (float32) is cast to the written dtype."""
    want = storage_dtype(ref.dtype)
    if tuple(value.shape) != ref.shape or (exact and value.dtype != want):
        raise ValidationError(
            f"replacement for {ref.name!r} is {value.dtype} {tuple(value.shape)}, "
            f"the residual stores {want} {ref.shape}"
        )
    return value.detach().to(want).cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _write_index(out: Path, shards: dict[str, list[_Entry]], weight_map: dict[str, str]) -> None:
    index = out / INDEX_NAME
    if len(shards) == 1 and not index.exists():
        return
    total = sum(e.ref.nbytes for items in shards.values() for e in items)
    text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    index.write_text(text + "\n")


def _write_config(out: Path, ckpt: Checkpoint, target: str) -> None:
    if not ckpt.config:
        return
    config = {
        k: v
        for k, v in ckpt.config.items()
        if k not in ("quantization_config", "compression_config")
    }
    name = {v: k for k, v in _NAMES.items()}[target]
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
