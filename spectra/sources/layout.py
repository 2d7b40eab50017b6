"""Which files make up a local checkpoint: one file, an indexed folder, or a folder of shards.

Nothing here reads tensor data; the index JSON is the only file opened. Pickled checkpoints are
refused by name, never opened.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from spectra.errors import SourceError
from spectra.sources.header import MAX_HEADER_BYTES, clip

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = (
    "spectra never unpickles (a pickle can run arbitrary code): in an environment you trust, "
    "load it and save it with safetensors, e.g. "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')` "
    "or `model.save_pretrained(out, safe_serialization=True)`"
)


def local_shards(path: Path) -> list[Path]:
    """The safetensors files of the local checkpoint at `path`, in reading order.

    A file is taken as is; a folder with `model.safetensors.index.json` (or any single
    `*.safetensors.index.json`) gives the shards the index names, in index order of first
    appearance; a folder without an index gives its `*.safetensors` files sorted by name.
    """
    if not path.exists():
        raise SourceError(
            f"{path}: no such file or folder (give a .safetensors file, a folder of shards, "
            "or a Hub repo id like org/name)"
        )
    if path.is_file():
        return [_single_file(path)]
    if not path.is_dir():
        raise SourceError(f"{path}: neither a file nor a folder")
    index = _find_index(path)
    if index is not None:
        return shards_from_index(index)
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if shards:
        return shards
    raise SourceError(_no_safetensors_message(path))


def _single_file(path: Path) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SourceError(f"{path}: refusing a pickled checkpoint ({path.suffix}); {CONVERT_HINT}")
    if path.name.endswith(".index.json"):
        raise SourceError(
            f"{path}: give the folder that holds the index, not the index file itself"
        )
    if path.suffix != ".safetensors":
        raise SourceError(f"{path}: not a .safetensors file (give a .safetensors file or a folder)")
    return path


def _find_index(folder: Path) -> Path | None:
    named = folder / INDEX_NAME
    if named.is_file():
        return named
    others = sorted(folder.glob("*.safetensors.index.json"))
    if len(others) == 1:
        return others[0]
    if len(others) > 1:
        names = ", ".join(p.name for p in others)
        raise SourceError(f"{folder}: several safetensors indexes ({names}); give one shard file")
    return None


def _no_safetensors_message(folder: Path) -> str:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        return (
            f"{folder}: only pickled weights here ({', '.join(pickles[:3])}), no .safetensors; "
            f"{CONVERT_HINT}"
        )
    return f"{folder}: no .safetensors files in this folder"


def shards_from_index(index: Path) -> list[Path]:
    """Shard paths named by a `*.safetensors.index.json`, each checked to stay inside its folder."""
    try:
        size = index.stat().st_size
        if size > MAX_HEADER_BYTES:
            raise SourceError(
                f"{index}: index is {size} bytes, more than {MAX_HEADER_BYTES}: not a real index"
            )
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{index}: cannot read the index ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
        raise SourceError(f"{index}: invalid index JSON ({type(exc).__name__})") from exc
    shards = [index.parent / name for name in index_shard_names(obj, str(index))]
    for shard in shards:
        if not shard.is_file():
            raise SourceError(
                f"{index}: names shard {clip(shard.name)}, which is missing from {index.parent}: "
                "download the missing shard or remove the index"
            )
    return shards


def index_shard_names(obj: object, label: str) -> list[str]:
    """Shard file names of a parsed index, in order of first appearance, refused before any
    file is opened when one would leave the checkpoint folder."""
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict):
        raise SourceError(f"{label}: index has no 'weight_map' object")
    names: dict[str, None] = {}  # ordered set
    for tensor, rel in weight_map.items():
        if not isinstance(rel, str):
            raise SourceError(
                f"{label}: tensor {clip(tensor)} maps to {clip(rel)}, not a file name"
            )
        if rel not in names:
            _check_child(rel, label, tensor)
            names[rel] = None
    if not names:
        raise SourceError(f"{label}: the index lists no tensors (empty checkpoint)")
    return list(names)


def _check_child(rel: str, label: str, tensor: str) -> None:
    """Refuse, before any file is opened, an index entry that leaves the checkpoint folder."""
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if (
        not rel
        or posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise SourceError(
            f"{label}: tensor {clip(tensor)} points to {clip(rel)}, outside the checkpoint folder; "
            "refusing to read it (shard names must be plain file names in the same folder)"
        )
    if not rel.endswith(".safetensors"):
        raise SourceError(
            f"{label}: tensor {clip(tensor)} points to {clip(rel)}, not a .safetensors file"
        )
