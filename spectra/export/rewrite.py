"""A checkpoint rewritten with some of its matrices replaced, streamed one tensor at a time: what
`spectra smooth` and `spectra remove-traps` write.

- A plain safetensors checkpoint goes through the residual writer (`export/residual.py`): the
  source's shard files, tensor order, dtypes, index and side files (config, tokenizer, the
  sentence-transformers folders); every tensor not replaced is copied byte for byte; a replaced
  matrix is written in its stored dtype (and layout: a GPT-2 Conv1D matrix transposed back).
- A quantized or GGUF checkpoint goes through the decoded writer (`export/decoded.py`): spectra
  cannot quantize again, so every encoded weight is written dequantized (the replaced ones as
  replaced), config.json loses `quantization_config`, and a `DequantizedOutputWarning` says so.

`select_matrices` (with `rewritable`, the one check of which matrices can be replaced) runs
before anything is written.
Callers write into `spectra.outdir.atomic_output_dir`'s temporary folder.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from spectra.errors import ValidationError
from spectra.export.decoded import decoded_dtype, write_decoded_checkpoint
from spectra.export.residual import is_side_file, storage_dtype, write_residual_checkpoint
from spectra.formats.safetensors import clip
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.roles import MatrixRef

# Float storage a replaced matrix is written back in (integer / float8 matrices are not).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
Replace = Callable[[str], torch.Tensor | None]


class DequantizedOutputWarning(UserWarning):
    """A quantized (or GGUF) source was written dequantized."""


def rewritable(ref: MatrixRef) -> str | None:
    """Why `ref` cannot be replaced in a rewritten checkpoint, or None when it can."""
    if ref.key != ref.tensor.name and ref.encoded is None:
        return f"one slice of the 3-D tensor {ref.tensor.name!r} (expert stacks are not rewritten)"
    if ref.encoded is None and ref.tensor.dtype not in FLOAT_DTYPES:
        return f"stored as {ref.tensor.dtype} (only float32/float16/bfloat16/float64 are rewritten)"
    if ref.encoded is not None and len(ref.encoded.shape) != 2:
        return f"a quantized {len(ref.encoded.shape)}-D tensor (expert stacks are not rewritten)"
    return None


def select_matrices(
    ckpt: Checkpoint,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    roles: tuple[str, ...],
    *,
    min_evals: int,
) -> tuple[dict[str, MatrixRef], list[tuple[str, str]]]:
    """The matrices of `ckpt` to replace, by written name (`output_name`), and the selected ones
    left as they are with the reason (`rewritable`, or min(m, n) < `min_evals`: WeightWatcher's
    size filter). Nothing to replace is a one-line ValidationError."""
    todo: dict[str, MatrixRef] = {}
    skipped: list[tuple[str, str]] = []
    for ref in ckpt.matrices(include=include, exclude=exclude, roles=roles):
        why = rewritable(ref)
        if why is None and min(ref.shape) < min_evals:
            why = f"min(m, n) = {min(ref.shape)} < min_evals = {min_evals}"
        if why is None:
            todo[output_name(ref)] = ref
        else:
            skipped.append((ref.key, why))
    if not todo:
        raise ValidationError(
            f"no matrix of {clip(str(ckpt.source))} to transform "
            f"({len(skipped)} skipped{': ' + clip(skipped[0][1]) if skipped else ''}); "
            "check --include/--exclude/--roles/--min-evals"
        )
    return todo, skipped


def output_name(ref: MatrixRef) -> str:
    """The tensor name `ref` is written under (an encoded weight: its logical name)."""
    return ref.key if ref.encoded is not None else ref.tensor.name


def stored_value(ref: MatrixRef, value: torch.Tensor) -> torch.Tensor:
    """A new (out, in) matrix as the writer takes it: the stored dtype (float32 for an encoded
    weight: the decoded writer casts it to the written dtype), the stored layout, on the CPU."""
    dtype = torch.float32 if ref.encoded is not None else storage_dtype(ref.tensor.dtype)
    out = value.to(dtype)
    out = out.mT if ref.transpose else out
    return out.contiguous().cpu()


def write_rewritten(ckpt: Checkpoint, out: Path, replace: Replace, *, folder_source: bool) -> bool:
    """Write `ckpt` into `out` with `replace(name)`'s tensor for the names it returns one for
    (`output_name`, value from `stored_value`). Returns True when the source was quantized and
    was written dequantized (a `DequantizedOutputWarning` is issued).

    folder_source: the source is a folder or Hub repo (its side files are copied; a single
    file's folder is not a checkpoint and gives none)."""
    if ckpt.quantization.method is not None:
        write_decoded_checkpoint(ckpt, out, replace, copy_files=folder_source)
        dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[
            decoded_dtype(ckpt, upcast=False)
        ]
        formats = ", ".join(ckpt.quantization.formats())
        warnings.warn(
            f"the source is quantized ({formats}): all {len(ckpt.quantization.weights)} "
            f"quantized weights are written dequantized to {dtype} and config.json has no "
            "quantization_config; load it as a plain model, or quantize it again yourself",
            DequantizedOutputWarning,
            stacklevel=3,
        )
        return True
    if folder_source:  # a streamed Hub repo: its config and tokenizer files, beside
        ckpt.fetch_side_files(is_side_file)
    write_residual_checkpoint(
        list(ckpt.files), out, replace, copy_files=folder_source, opener=ckpt.open_shard
    )
    return False
