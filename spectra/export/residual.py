"""Residual base checkpoints, streamed tensor by tensor: the source's layout with some matrices
replaced.

The output has the source's shard files (same names, same tensor order and dtypes), its
``model.safetensors.index.json`` (still valid: names, shards and sizes are unchanged) and its
config/tokenizer files. Tensors the method does not touch are copied byte for byte from the
source file, so they are unchanged by construction. Memory is bounded by the largest single
tensor (the one being replaced), never by a shard or the model: the safetensors header is written
first (it only needs names, dtypes and shapes), then each tensor's bytes in order.

``upcast=True`` (``spectra init --residual-dtype float32``) stores every float16/bfloat16 tensor
as float32 instead (a half-precision residual rounds away what the adapter does not hold: about
1e-3 relative error for bfloat16, against ~1e-7 in float32); the copied tensors are converted
chunk by chunk (exact), and the config's ``torch_dtype``/``dtype`` and the index's
``total_size`` are updated to match.

Callers write into a temporary folder (``spectra.outdir.atomic_output_dir``) so a crash
never leaves a half-written checkpoint under the final name. Source headers go through the
validating reader (``spectra.formats.safetensors.read_header``): a malformed shard is refused
before anything is written.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace as with_fields
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from spectra.errors import SourceError, SpectraError, ValidationError
from spectra.formats.files import open_input, read_json_input
from spectra.formats.safetensors import (
    DTYPES,
    INDEX_NAME,
    TensorRef,
    header_bytes,
    parse_header,
    read_header,
)

_CHUNK = 16 << 20
# Side files copied next to the residual weights: what loading the model and its tokenizer
# needs (transformers, sentence-transformers), and nothing else the source folder may hold.
# Beyond the configs and tokenizer files: added_tokens.json (slow tokenizers) and
# chat_template.* (transformers saves a chat template there); *.model is a sentencepiece model.
SIDE_FILE_PATTERNS = (
    INDEX_NAME,
    "config*.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "vocab.*",
    "merges.txt",
    "*.model",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",
)
# sentence-transformers module folders (1_Pooling, 2_Normalize, ...): their JSON files only.
SIDE_FOLDER = re.compile(r"^[0-9]+_[A-Za-z]+$")

# Storage dtypes a replacement may have: those torch computes in (a residual is computed in the
# stored dtype). Float8, complex and unsigned 16/32/64-bit tensors are copied, never replaced.
RESIDUAL_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
# Stored as float32 with ``upcast=True``: the half-precision float dtypes (float8 stays as it
# is: its values only mean something with their scale tensors).
HALF_DTYPES = ("F16", "BF16")


class ResidualPrecisionWarning(UserWarning):
    """A residual base is stored in half precision like its source (``spectra init``)."""


def residual_storage(dtype: str, *, upcast: bool) -> str:
    """The safetensors dtype a residual-base tensor stored as ``dtype`` is written in."""
    return "F32" if upcast and dtype in HALF_DTYPES else dtype


def storage_dtype(dtype: str) -> torch.dtype:
    """torch dtype of a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``)."""
    found = DTYPES[dtype].torch_dtype if dtype in RESIDUAL_DTYPES else None
    if found is None:
        raise ValidationError(f"cannot write a residual for storage dtype {dtype!r}")
    return found


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, nbytes: int) -> None:
    src.seek(start)
    left = nbytes
    while left > 0:
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise SourceError(f"{src.name}: file ends early (truncated shard?)")
        dst.write(chunk)
        left -= len(chunk)


def _tensor_bytes(entry: TensorRef, value: Tensor) -> memoryview:
    """The bytes of ``value`` as a view of its own memory (no copy: a 7B matrix's bytes were
    copied whole before being written)."""
    want = storage_dtype(entry.dtype)
    if value.dtype != want or tuple(value.shape) != entry.shape:
        raise ValidationError(
            f"replacement for {entry.name!r} is {value.dtype} {tuple(value.shape)}, "
            f"the source stores {want} {entry.shape}"
        )
    flat = value.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


Replace = Callable[[str], Tensor | None]
Opener = Callable[[Path], AbstractContextManager[BinaryIO]]


def _upcast_range(src: BinaryIO, dst: BinaryIO, entry: TensorRef) -> None:
    """Copy a half-precision tensor's bytes as float32, chunk by chunk (exact)."""
    half = storage_dtype(entry.dtype)
    src.seek(entry.offset)
    left = entry.nbytes
    while left > 0:
        chunk = src.read(min(_CHUNK, left))
        if not chunk or len(chunk) % 2:
            raise SourceError(f"{src.name}: file ends early (truncated shard?)")
        values = torch.frombuffer(bytearray(chunk), dtype=half).to(torch.float32)
        dst.write(values.view(torch.uint8).numpy().tobytes())
        left -= len(chunk)


def _stored(entry: TensorRef, upcast: bool) -> TensorRef:
    dtype = residual_storage(entry.dtype, upcast=upcast)
    if dtype == entry.dtype:
        return entry
    return with_fields(entry, dtype=dtype, nbytes=entry.numel * DTYPES[dtype].itemsize)


def write_shard(
    src: Path, dst: Path, replace: Replace, *, upcast: bool = False, opener: Opener | None = None
) -> list[str]:
    """Write ``dst`` as a copy of safetensors file ``src`` where ``replace(name)`` returns a
    tensor (same shape, dtype as stored, or `residual_storage` with ``upcast``) for the
    tensors to change, None for the rest. Returns the names replaced.

    opener: opens ``src`` for reading (default: the local file; `Checkpoint.open_shard` for a
    shard streamed from the Hub)."""
    replaced = []
    with _open_shard(src, opener) as fin, dst.open("wb") as fout:
        header = parse_header(fin, os.fstat(fin.fileno()).st_size, src)
        entries = header.in_data_order()
        stored = [_stored(e, upcast) for e in entries]
        fout.write(header_bytes(stored, header.metadata))
        for entry, out in zip(entries, stored, strict=True):
            value = replace(entry.name)
            if value is not None:
                fout.write(_tensor_bytes(out, value))
                replaced.append(entry.name)
                del value
            elif out.dtype != entry.dtype:
                _upcast_range(fin, fout, entry)
            else:
                _copy_range(fin, fout, entry.offset, entry.nbytes)
    return replaced


def _open_shard(src: Path, opener: Opener | None) -> AbstractContextManager[BinaryIO]:
    return open_input(src, "shard") if opener is None else opener(src)


class SkippedSideFileWarning(UserWarning):
    """A side file of the source was not copied into the residual base (see copy_side_files)."""


def side_file_root(src_dir: Path) -> Path:
    """The folder every side file must resolve into: the checkpoint folder, or for a Hub cache
    snapshot (``models--org--name/snapshots/<rev>``, whose files are symlinks into
    ``../../blobs``) the repo folder ``models--org--name``."""
    folder = src_dir.resolve()
    snapshots = src_dir.absolute().parent
    if snapshots.name == "snapshots" and "--" in snapshots.parent.name:
        return snapshots.parent.resolve()
    return folder


def is_side_file(name: str) -> bool:
    """True when a top-level file of the source folder is one of ``SIDE_FILE_PATTERNS``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SIDE_FILE_PATTERNS)


def copy_side_files(src_dir: Path, dst_dir: Path, shards: list[Path]) -> list[str]:
    """Copy the whitelisted side files of ``src_dir`` (``SIDE_FILE_PATTERNS``: config,
    tokenizer, index, sentence-transformers files) and the JSON files of its
    sentence-transformers module folders (``1_Pooling``: ``SIDE_FOLDER``, not recursed).
    Everything else (notes, data, other weights, hidden files) stays behind. Returns the copied
    top-level names.

    Symlinks: a symlinked file is copied (its content, not the link) only when it resolves into
    `side_file_root` (the checkpoint folder, or its Hub repo folder with the blobs); one that
    points anywhere else, a dangling one, and every symlinked folder are skipped with a
    `SkippedSideFileWarning` naming it. A stranger's checkpoint folder must never make spectra
    copy ``~/.ssh/id_rsa`` next to the weights the user then uploads. Skipping (not failing)
    keeps the weights, which were read and checked, usable; copy a skipped file by hand if you
    trust it.
    """
    root = side_file_root(src_dir)
    copied = []
    for item in sorted(src_dir.iterdir()):
        if item in shards:
            continue
        folder = SIDE_FOLDER.match(item.name) is not None
        if not (folder or is_side_file(item.name)) or _outside(item, root):
            continue
        if folder and item.is_dir():
            _copy_json_files(item, dst_dir / item.name, root)
        elif not folder and item.is_file():  # not a FIFO, socket, device or folder
            shutil.copyfile(item, dst_dir / item.name)
        else:
            continue
        copied.append(item.name)
    return copied


def _outside(item: Path, root: Path) -> bool:
    """True (with a warning) when `item` must not be copied: a symlinked folder, or a symlink
    that does not resolve to an existing file under `root`."""
    if not item.is_symlink():
        return False
    target = item.resolve()
    if item.is_dir():
        why = "is a symlinked folder"
    elif not target.is_file():
        why = "is a dangling symlink"
    elif not target.is_relative_to(root):
        why = f"is a symlink to {str(target)!r}, outside {str(root)!r}"
    else:
        return False
    warnings.warn(
        f"not copied into the residual base: {str(item)!r} {why}",
        SkippedSideFileWarning,
        stacklevel=3,
    )
    return True


def _copy_json_files(src: Path, dst: Path, root: Path) -> None:
    """Copy the ``*.json`` files (not sub-folders) of a sentence-transformers module folder."""
    dst.mkdir(exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.name.endswith(".json") and not _outside(item, root) and item.is_file():
            shutil.copyfile(item, dst / item.name)


def write_residual_checkpoint(
    shards: list[Path],
    out_dir: str | Path,
    replace: Replace,
    *,
    copy_files: bool = True,
    progress: Callable[[str], None] | None = None,
    upcast: bool = False,
    opener: Opener | None = None,
) -> list[str]:
    """Write the checkpoint made of ``shards`` into ``out_dir`` (created), replacing the
    tensors for which ``replace(name)`` returns a tensor. Shards are processed in order, one
    tensor in memory at a time. Returns every replaced tensor name.

    copy_files: also copy the side files of the shards' folder (`copy_side_files`); pass False
    when the source was a single file, whose folder is not a checkpoint (``~/Downloads``).
    upcast: store float16/bfloat16 tensors as float32 (see the module docstring).
    opener: opens a shard for reading (default: the local file; `Checkpoint.open_shard` reads a
    shard streamed from the Hub)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ValidationError(f"shard file names repeat: {names}")
    replaced: list[str] = []
    for shard in shards:
        if opener is None and not shard.is_file():
            raise SourceError(f"shard {str(shard)!r} is not a local file; download it first")
        replaced += write_shard(shard, out / shard.name, replace, upcast=upcast, opener=opener)
        if progress is not None:
            progress(shard.name)
    if copy_files:
        copy_side_files(shards[0].parent, out, shards)
        if upcast:
            _float32_side_files(out)
    return replaced


def _float32_side_files(out: Path) -> None:
    """After an upcast: the config names float32, the index the new total size."""
    config = _json_object(out / "config.json")
    if config is not None:
        keys = [k for k in ("torch_dtype", "dtype") if config.get(k) in ("bfloat16", "float16")]
        for key in keys:
            config[key] = "float32"
        if keys:
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = _json_object(out / INDEX_NAME)
    meta = None if index is None else index.get("metadata")
    if isinstance(meta, dict) and "total_size" in meta:
        total = 0
        for shard in sorted(out.glob("*.safetensors")):
            total += sum(ref.nbytes for ref in read_header(shard).in_data_order())
        meta["total_size"] = total
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _json_object(path: Path) -> dict[str, object] | None:
    """A copied side file's JSON object, or None (absent or not a JSON object: left as is)."""
    if not path.is_file():
        return None
    try:
        data = read_json_input(path, "residual base side file")
    except SpectraError:
        return None
    return data if isinstance(data, dict) else None
