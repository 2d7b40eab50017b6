"""Which files make up a local checkpoint: one file, an indexed folder, or a folder of shards.

Nothing here reads tensor data; the index JSON is the only file opened. Pickled checkpoints are
refused by name, never opened. `check_index` compares an index's `weight_map` with the shard
headers once they are parsed (the headers are the truth; the index must agree with them).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from spectra.errors import SourceError
from spectra.formats.files import read_json_input
from spectra.formats.safetensors import INDEX_NAME, MAX_HEADER_BYTES, ShardHeader, clip

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = (
    "spectra never unpickles (a pickle can run arbitrary code): in an environment you trust, "
    "load it and save it with safetensors, e.g. "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')` "
    "or `model.save_pretrained(out, safe_serialization=True)`"
)


_SHOWN = 3  # names quoted in an index-mismatch message
_MAX_CONFIG_BYTES = 10_000_000  # a real config.json is a few KB


class IndexMismatchWarning(UserWarning):
    """The shards hold tensors that the index's `weight_map` does not list (they are still read)."""


@dataclass(frozen=True)
class ShardLayout:
    """The shard files of a local checkpoint and, when an index named them, where it says each
    tensor lives (`weight_map`: tensor name -> shard path, built as `index folder / entry`, so it
    compares equal to the shard paths)."""

    shards: tuple[Path, ...]
    weight_map: Mapping[str, Path] | None = None


def local_shards(path: Path) -> list[Path]:
    """The safetensors files of the local checkpoint at `path`, in reading order.

    A file is taken as is; a folder with `model.safetensors.index.json` (or any single
    `*.safetensors.index.json`) gives the shards the index names, in index order of first
    appearance; a folder without an index gives its `*.safetensors` files sorted by name.
    """
    return list(local_layout(path).shards)


def local_layout(path: Path) -> ShardLayout:
    """`local_shards(path)` with the index's weight map when there is one (for `check_index`)."""
    if not path.exists():
        raise SourceError(
            f"{path}: no such file or folder (give a .safetensors file, a folder of shards, "
            "or a Hub repo id like org/name)"
        )
    if path.is_file():
        return ShardLayout((_single_file(path),))
    if not path.is_dir():
        raise SourceError(f"{path}: neither a file nor a folder")
    index = _find_index(path)
    if index is not None:
        return layout_from_index(index)
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if shards:
        return ShardLayout(tuple(shards))
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
    # not `is_file()`: an index that is a FIFO, a device or a folder is refused when it is read
    named = folder / INDEX_NAME
    if named.exists():
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
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if ggufs:
        return (
            f"{folder}: no .safetensors files in this folder, but GGUF files "
            f"({', '.join(ggufs[:3])}): give one .gguf file as the source"
        )
    return f"{folder}: no .safetensors files in this folder"


def layout_from_index(index: Path) -> ShardLayout:
    """The shards a `*.safetensors.index.json` names (each checked to stay inside its folder and
    to exist) and its weight map as paths."""
    obj = read_json_input(index, "safetensors index", MAX_HEADER_BYTES)
    weight_map = index_weight_map(obj, str(index))
    shards = {name: index.parent / name for name in _first_appearance(weight_map)}
    for shard in shards.values():
        if not shard.is_file():
            raise SourceError(
                f"{index}: names shard {clip(shard.name)}, which is missing from {index.parent}: "
                "download the missing shard or remove the index"
            )
    located = {tensor: shards[rel] for tensor, rel in weight_map.items()}
    return ShardLayout(tuple(shards.values()), located)


def _first_appearance(weight_map: Mapping[str, str]) -> list[str]:
    return list(dict.fromkeys(weight_map.values()))


def index_weight_map(obj: object, label: str) -> dict[str, str]:
    """The `weight_map` of a parsed index (tensor name -> shard file name), every entry checked
    to be a `.safetensors` file inside the checkpoint folder before any file is opened."""
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
    return dict(weight_map)


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


def check_index(
    label: str, weight_map: Mapping[str, Path] | None, headers: Sequence[ShardHeader]
) -> None:
    """Check an index's `weight_map` (tensor -> shard path) against the parsed shard headers.

    The headers are what gets read, so the index must agree with them:

    - a tensor the index lists that no shard holds: `SourceError` (an incomplete download, or an
      index of other shards; the checkpoint would silently lack that tensor).
    - a tensor held by another shard than the index names: `SourceError` too. Reading would still
      work (tensors are located from the headers), but `save_pretrained` writes index and shards
      together, so a disagreement means files of different revisions or exports were mixed, and
      an analysis would then report weights other than the ones the user meant, with no sign of
      it. Tools that locate tensors through the index (mergekit's `ShardedTensorIndex`) would
      look in the wrong file. Re-downloading is cheap next to a wrong forensic verdict.
    - tensors in the shards that the index does not list: `IndexMismatchWarning` only; they are
      still listed (some exports leave extras such as buffers out of the index).

    `weight_map=None` (no index) checks nothing. Messages quote at most 3 names, clipped.
    """
    if weight_map is None:
        return
    found: dict[str, Path] = {}
    for header in headers:
        found.update(dict.fromkeys((ref.name for ref in header.tensors), header.path))
    missing = [(name, shard) for name, shard in weight_map.items() if name not in found]
    if missing:
        raise SourceError(
            f"{label}: the index lists {_count(missing, 'tensor')} that no shard contains "
            f"({_quote(f'{clip(n)} in {clip(s.name)}' for n, s in missing)}): the download is "
            "incomplete or the index belongs to other shards; re-download the checkpoint"
        )
    moved = [(n, s, found[n]) for n, s in weight_map.items() if found[n] != s]
    if moved:
        raise SourceError(
            f"{label}: the index and the shards disagree on where {_count(moved, 'tensor')} "
            f"{'is' if len(moved) == 1 else 'are'} ("
            + _quote(f"{clip(n)} in {clip(f.name)} (index: {clip(s.name)})" for n, s, f in moved)
            + "): the files come from different revisions or exports; re-download the checkpoint"
        )
    extra = [name for name in found if name not in weight_map]
    if extra:
        warnings.warn(
            f"{label}: the shards hold {_count(extra, 'tensor')} that the index does not list "
            f"({_quote(clip(n) for n in extra)}); listing them anyway",
            IndexMismatchWarning,
            stacklevel=5,  # check_index < Checkpoint.__init__ < from_files < open < the caller
        )


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _quote(texts: Iterable[str]) -> str:
    """The first `_SHOWN` texts joined, with `...` when there were more."""
    shown = list(itertools.islice(texts, _SHOWN + 1))
    more = len(shown) > _SHOWN
    return ", ".join(shown[:_SHOWN]) + (", ..." if more else "")


def read_config(shards: Sequence[Path]) -> dict[str, object]:
    """config.json beside the shards, if any (used for the model width); never an error."""
    if not shards:
        return {}
    candidate = shards[0].parent / "config.json"
    try:
        obj = read_json_input(candidate, "config.json", _MAX_CONFIG_BYTES)
    except SourceError:
        return {}  # a FIFO, a device, too big, not JSON: the width is only a hint
    return obj if isinstance(obj, dict) else {}
