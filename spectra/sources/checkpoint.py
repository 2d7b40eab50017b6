"""`Checkpoint`: a lazy catalog of a safetensors checkpoint. Lists from headers, reads on demand.

>>> from spectra.sources.checkpoint import Checkpoint
>>> from spectra.sources.bundled import bundled_model_path
>>> with Checkpoint.open(bundled_model_path()) as ckpt:          # doctest: +SKIP
...     q = ckpt.matrices(roles=["q"])[0]
...     W = ckpt.read(q)                                           # (384, 384) float32
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from spectra.device import resolve_device
from spectra.errors import SourceError, ValidationError
from spectra.formats.codec import Encoded
from spectra.formats.files import check_source
from spectra.formats.safetensors import ShardHeader, TensorRef, read_header
from spectra.sources.gguf import gguf_layout
from spectra.sources.hub import RepoShards, looks_like_repo_id, repo_shards
from spectra.sources.layout import check_index, local_layout, read_config
from spectra.sources.quantized import find_encoded, given_encoded
from spectra.sources.reader import LocalStore, ShardStore, convert, read_encoded, read_range
from spectra.sources.roles import MatrixRef, classify, classify_encoded
from spectra.sources.select import select

if TYPE_CHECKING:  # torch is imported by the reads, so a headers-only job (`spectra inspect`)
    import torch  # never imports it

Ref = TensorRef | MatrixRef | str


class Checkpoint:
    """A checkpoint's tensors, listed from safetensors headers; data read only when asked.

    Open with `Checkpoint.open(source)`: a `.safetensors` file, a folder (with or without
    `model.safetensors.index.json`), a PEFT adapter folder (its factors are listed as tensors; see
    `spectra.sources.adapters` for the adapter on top of its base), or a Hub repo id `org/name`
    (`org/name@revision`). Use as a context manager so streamed Hub shards are cleaned up.

    When the shards were named by an index, its `weight_map` (tensor -> shard path) is checked
    against the headers (`spectra.sources.layout.check_index`): a tensor the index lists that no
    shard holds, or holds in another shard, is a `SourceError`; unlisted extras warn.

    Quantized checkpoints (`spectra.sources.quantized`: fp8 with scales, compressed-tensors,
    GPTQ, AWQ, bitsandbytes, MXFP4) list one matrix per logical weight, read decoded. A source
    that is not safetensors (GGUF) passes `encoded` (logical name -> `Encoded`, decoded (out, in))
    instead of having it detected; `quantization` says what was found.
    """

    def __init__(
        self,
        source: str,
        headers: Sequence[ShardHeader],
        *,
        store: ShardStore | None = None,
        config: dict[str, object] | None = None,
        weight_map: Mapping[str, Path] | None = None,
        encoded: Mapping[str, Encoded] | None = None,
        commit: str | None = None,
    ) -> None:
        self.source = source
        self.commit = commit  # a Hub repo's resolved commit (provenance); None for local files
        self.files: list[Path] = [h.path for h in headers]
        self.metadata: dict[str, str] = {}
        for header in headers:
            self.metadata.update(header.metadata)
        self.config: dict[str, object] = dict(config or {})
        self._store: ShardStore = store or LocalStore()
        self._shard_rank = {path: i for i, path in enumerate(self.files)}
        self._sizes = {h.path: h.size for h in headers}
        self._tensors = _collect(source, headers, allow_empty=bool(encoded))
        check_index(source, weight_map, headers)  # after _collect: duplicates have their message
        self._by_name = {t.name: t for t in self._tensors}
        hidden = self.config.get("hidden_size")
        ok = isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0
        hidden = hidden if ok else None
        self.quantization = (
            find_encoded(source, self._tensors, self.config, self._read_bytes)
            if encoded is None
            else given_encoded(encoded)
        )
        plain = [
            m
            for t in self._tensors
            if t.name not in self.quantization.consumed
            for m in classify(t, hidden_size=hidden)
        ]
        encoded = [
            m
            for w in self.quantization.weights
            for m in classify_encoded(w.name, w.encoded, hidden_size=hidden, linear=w.linear)
        ]
        # in storage order (shard, then offset of the primary tensor); experts stay in order
        self._matrices = sorted(
            plain + encoded, key=lambda m: (self._shard_rank[m.tensor.shard], m.tensor.offset)
        )
        self._by_key = {m.key: m for m in self._matrices}

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        source: str | Path,
        *,
        revision: str | None = None,
        local_only: bool | None = None,
        disk_budget: int | None = None,
    ) -> Checkpoint:
        """Open a local checkpoint or a Hub repo id. Reads headers only.

        `revision`, `local_only` (default: the HF_HUB_OFFLINE setting) and `disk_budget` (bytes:
        stream shard by shard, dropping each downloaded shard after its pass) apply to Hub repos.
        """
        check_source(source)
        path = Path(source).expanduser()
        if is_hub_source(source):
            shards = repo_shards(
                str(source), revision=revision, local_only=local_only, disk_budget=disk_budget
            )
            return cls.from_shards(shards)
        if revision is not None:
            raise ValidationError(
                f"revision={revision!r} applies to Hub repos, but {source} is a local path"
            )
        if path.suffix.lower() == ".gguf" and path.is_file():
            return cls.from_gguf(path, str(source))
        layout = local_layout(path)
        return cls.from_files(str(source), layout.shards, weight_map=layout.weight_map)

    @classmethod
    def from_files(
        cls,
        source: str,
        shards: Sequence[Path],
        *,
        store: ShardStore | None = None,
        weight_map: Mapping[str, Path] | None = None,
    ) -> Checkpoint:
        """A checkpoint over local shard files (headers parsed now, config.json read if beside).

        `weight_map` (tensor -> shard path, from an index) is checked against the headers.
        """
        headers = [read_header(p) for p in shards]
        config = read_config(shards)
        return cls(source, headers, store=store, config=config, weight_map=weight_map)

    @classmethod
    def from_gguf(cls, path: Path, source: str | None = None) -> Checkpoint:
        """A checkpoint over a GGUF file (`spectra.sources.gguf`): Hugging Face names, every
        weight matrix decoded from its blocks, q/k rows un-permuted."""
        layout = gguf_layout(path)
        label = str(path) if source is None else source
        return cls(label, [layout.header], config=layout.config, encoded=layout.encoded)

    @classmethod
    def from_shards(cls, shards: RepoShards) -> Checkpoint:
        """A checkpoint over a Hub repo's shards (`spectra.sources.hub.repo_shards`)."""
        return cls(
            shards.source,
            shards.headers,
            store=shards.store,
            config=shards.config,
            weight_map=shards.weight_map,
            commit=shards.commit,
        )

    # -- listing -----------------------------------------------------------------------------
    def tensors(self) -> list[TensorRef]:
        """Every tensor, in shard order then file order (headers only)."""
        return list(self._tensors)

    def matrices(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        roles: Sequence[str] = (),
    ) -> list[MatrixRef]:
        """Weight matrices (role, layer, (out, in)), filtered by name globs and roles."""
        return select(self._matrices, include=include, exclude=exclude, roles=roles)

    def tensor(self, name: str) -> TensorRef:
        """The tensor called `name` (SourceError when there is none)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise SourceError(f"{self.source}: no tensor named {name!r}") from None

    # -- reading -----------------------------------------------------------------------------
    def read(
        self, ref: Ref, *, dtype: torch.dtype | str | None = "float32", device: str = "cpu"
    ) -> torch.Tensor:
        """One tensor as `dtype` (a torch dtype or its name; None: as stored) on `device`.

        A `TensorRef` (or a tensor name) reads the tensor as stored; a `MatrixRef` (or a matrix
        key such as `name[expert=2]`) reads the (out, in) matrix: transposed for GPT-2 Conv1D,
        one slice for a 3-D expert stack.
        """
        resolved = self._resolve(ref)
        dev = resolve_device(device)
        with self._store.open(self._shard_of(resolved)) as fh:
            return self._read_open(fh, resolved, dtype, dev)

    def read_many(
        self,
        refs: Iterable[MatrixRef | TensorRef],
        *,
        dtype: torch.dtype | str | None = "float32",
        device: str = "cpu",
    ) -> Iterator[tuple[MatrixRef | TensorRef, torch.Tensor]]:
        """Yield `(ref, tensor)` in shard order, then offset order; each file opened once.

        Only one tensor is held at a time here: memory is bounded by what the caller keeps.
        """
        dev = resolve_device(device)
        ordered = sorted(
            (self._resolve(r) for r in refs),
            key=lambda r: (self._shard_rank[self._shard_of(r)], _offset(r)),
        )
        i = 0
        while i < len(ordered):
            shard = self._shard_of(ordered[i])
            j = i
            while j < len(ordered) and self._shard_of(ordered[j]) == shard:
                j += 1
            with self._store.open(shard) as fh:
                for r in ordered[i:j]:
                    yield r, self._read_open(fh, r, dtype, dev)
            i = j

    def read_groups(self, refs: Sequence[MatrixRef | TensorRef]) -> list[list[int]]:
        """Positions of `refs` cut into groups to read one after the other, each within a run of
        shards the store can hold at once (`ShardStore.windows`): one group for local files;
        for Hub shards streamed under a disk budget, runs that fit the budget, so a pass that
        batches within each group downloads every shard once. Groups follow shard order,
        positions within a group keep the order of `refs`."""
        shards = sorted(
            {self._shard_of(self._resolve(r)) for r in refs}, key=lambda p: self._shard_rank[p]
        )
        group_of = {s: g for g, run in enumerate(self._store.windows(shards)) for s in run}
        groups: list[list[int]] = [[] for _ in range(len(set(group_of.values())))]
        for i, r in enumerate(refs):
            groups[group_of[self._shard_of(self._resolve(r))]].append(i)
        return [g for g in groups if g]

    def open_shard(self, shard: Path) -> AbstractContextManager[BinaryIO]:
        """One shard file of this checkpoint opened for reading through its store (a streamed
        Hub shard is downloaded first, within the disk budget)."""
        if shard not in self._shard_rank:
            raise ValidationError(f"{str(shard)!r} is not a shard of {self.source}")
        return self._store.open(shard)

    def describe_shards(self) -> list[dict[str, object]]:
        """[{name, bytes, sha256}] of every shard, from the headers and the store's digests (a
        streamed Hub shard: the sha256 the Hub lists, which its download was verified
        against), without reading a file that is not on disk."""
        return [
            {"name": p.name, "bytes": self._sizes[p], "sha256": self._store.digest(p)}
            for p in self.files
        ]

    def fetch_side_files(self, wanted: Callable[[str], bool]) -> None:
        """Download the repo's small non-weight files whose names `wanted` accepts (config,
        tokenizer) beside a streamed Hub checkpoint's shards; no-op for local files."""
        fetch = getattr(self._store, "fetch_side_files", None)
        if fetch is not None:
            fetch(wanted)

    def content_key(self, ref: Ref) -> str:
        """Stable id of a matrix's bytes: `sha256(shard):offset:nbytes:dtype:shape[:T]`.

        `shape` is the presented shape joined by `x`; `:T` marks a transposed presentation, so
        a square Conv1D matrix never shares a key with its untransposed reading.
        """
        r = self._resolve(ref)
        digest = self._store.digest(self._shard_of(r))
        if isinstance(r, MatrixRef):
            shape, nbytes, tail = r.shape, r.nbytes, ":T" if r.transpose else ""
        else:
            shape, nbytes, tail = r.shape, r.nbytes, ""
        dims = "x".join(str(d) for d in shape)
        key = f"{digest}:{_offset(r)}:{nbytes}:{_tensor(r).dtype}:{dims}{tail}"
        if isinstance(r, MatrixRef) and r.encoded is not None:
            others = dict.fromkeys(p.shard for p in r.encoded.parts if p.shard != _tensor(r).shard)
            key += f":{r.encoded.codec.key()}" + "".join(
                f"+{self._store.digest(s)}" for s in others
            )
        return key

    # -- plumbing ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release streamed downloads (no-op for local files)."""
        self._store.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpoint({self.source!r}, files={len(self.files)}, tensors={len(self._tensors)}, "
            f"matrices={len(self._matrices)})"
        )

    def _read_bytes(self, ref: TensorRef) -> bytes:
        """The stored bytes of a small tensor (quantization metadata such as a JSON state)."""
        with self._store.open(ref.shard) as fh:
            raw = read_range(
                fh,
                offset=ref.offset,
                nbytes=ref.nbytes,
                dtype="U8",
                shape=(ref.nbytes,),
                where=f"{ref.shard}: tensor {ref.name!r}",
            )
        return raw.numpy().tobytes()

    def _resolve(self, ref: Ref) -> TensorRef | MatrixRef:
        if isinstance(ref, str):
            found = self._by_key.get(ref) or self._by_name.get(ref)
            if found is None:
                raise SourceError(f"{self.source}: no tensor or matrix named {ref!r}")
            return found
        if isinstance(ref, (TensorRef, MatrixRef)):
            if _tensor(ref).shard not in self._shard_rank:
                raise ValidationError(f"{_tensor(ref).name!r} belongs to another checkpoint")
            return ref
        raise ValidationError(f"expected a TensorRef, MatrixRef or name, got {type(ref).__name__}")

    def _shard_of(self, ref: TensorRef | MatrixRef) -> Path:
        return _tensor(ref).shard

    def _read_open(
        self,
        fh: BinaryIO,
        ref: TensorRef | MatrixRef,
        dtype: torch.dtype | str | None,
        device: torch.device,
    ) -> torch.Tensor:
        t = _tensor(ref)
        if isinstance(ref, MatrixRef) and ref.encoded is not None:
            with ExitStack() as others:
                opened = {t.shard: fh}

                def open_shard(shard: Path) -> BinaryIO:
                    if shard not in opened:
                        opened[shard] = others.enter_context(self._store.open(shard))
                    return opened[shard]

                decoded = read_encoded(open_shard, ref.encoded)
            return convert(decoded, dtype=dtype, device=device, transpose=ref.transpose)
        if isinstance(ref, MatrixRef):
            stored = t.shape[1:] if len(t.shape) == 3 else t.shape
            nbytes, transpose = ref.nbytes, ref.transpose
        else:
            stored, nbytes, transpose = t.shape, t.nbytes, False
        raw = read_range(
            fh,
            offset=_offset(ref),
            nbytes=nbytes,
            dtype=t.dtype,
            shape=tuple(stored),
            where=f"{t.shard}: tensor {t.name!r}",
        )
        return convert(raw, dtype=dtype, device=device, transpose=transpose)


def is_hub_source(source: str | Path) -> bool:
    """The one rule for whether a source is a Hub repo id: it reads as ``org/name[@rev]``, no
    such local path exists, and it does not read as a mistyped local path, which is one that
    starts with ``./``, ``../``, ``/`` or ``~``, has more than one ``/`` before any ``@``, or whose
    first component is a local folder (``models/nope`` beside a ``models/`` folder): that one
    ends in "no such file or folder" instead of a Hub lookup."""
    text = str(source)
    if Path(text).expanduser().exists() or not looks_like_repo_id(text):
        return False
    if text.startswith(("./", "../", "/", "~")) or text.partition("@")[0].count("/") > 1:
        return False
    return not Path(text.split("/", 1)[0]).is_dir()


def _tensor(ref: TensorRef | MatrixRef) -> TensorRef:
    return ref.tensor if isinstance(ref, MatrixRef) else ref


def _offset(ref: TensorRef | MatrixRef) -> int:
    return ref.offset


def _collect(
    source: str, headers: Sequence[ShardHeader], *, allow_empty: bool = False
) -> list[TensorRef]:
    seen: dict[str, Path] = {}
    out: list[TensorRef] = []
    for header in headers:
        for ref in sorted(header.tensors, key=lambda r: r.offset):
            if ref.name in seen:
                raise SourceError(
                    f"{source}: tensor {ref.name!r} appears in two shards ({seen[ref.name].name} "
                    f"and {header.path.name}): the checkpoint is inconsistent, re-download it"
                )
            seen[ref.name] = header.path
            out.append(ref)
    if not out and not allow_empty:
        names = ", ".join(h.path.name for h in headers)
        raise SourceError(f"{source}: empty checkpoint, no tensors in {names}")
    return out
