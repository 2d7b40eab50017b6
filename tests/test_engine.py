"""The spectral engine: batching, ordering, prefetch errors, NaN handling, cache reuse, MiniLM."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch
from _linalg_fixtures import (
    decaying,
    one_thread,  # noqa: F401 (fixture)
    planted,
)

from spectra.errors import SourceError, ValidationError
from spectra.linalg.batching import plan_batches, prefetch
from spectra.linalg.cache import CACHE_FORMAT, SpectrumCache
from spectra.linalg.engine import compute_spectra


@dataclass(frozen=True)
class FakeRef:
    key: str
    role: str
    layer: int | None
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return 4 * self.numel


class FakeCheckpoint:
    """Implements only what the engine consumes: matrices, read_many, content_key."""

    def __init__(self, tensors: dict[str, torch.Tensor], fail_on: str | None = None) -> None:
        self.tensors = tensors
        self.fail_on = fail_on
        self.reads: list[str] = []
        self.refs = [
            FakeRef(k, "q" if i % 2 else "up", i, tuple(t.shape))
            for i, (k, t) in enumerate(tensors.items())
        ]

    def matrices(self) -> list[FakeRef]:
        return list(self.refs)

    def read_many(
        self, refs: Sequence[FakeRef], *, dtype: torch.dtype, device: str
    ) -> Iterator[tuple[FakeRef, torch.Tensor]]:
        for ref in reversed(list(refs)):  # a reader may yield in its own (shard) order
            if ref.key == self.fail_on:
                raise SourceError(f"cannot read {ref.key!r}")
            self.reads.append(ref.key)
            yield ref, self.tensors[ref.key].to(dtype=dtype, device=device)

    def content_key(self, ref: FakeRef) -> str:
        t = self.tensors[ref.key]
        return f"fake:{ref.key}:{hash(t.numpy().tobytes())}"


def _fake(n_square: int = 5, n_tall: int = 3) -> FakeCheckpoint:
    tensors = {}
    for i in range(n_square + n_tall):
        shape = (40, 40) if i % 2 == 0 or i >= 2 * n_tall else (70, 30)
        tensors[f"m{i}"] = planted(*shape, decaying(min(shape)), seed=i).float()
    return FakeCheckpoint(tensors)


def test_values_in_input_order_equal_direct_computation() -> None:
    ck = _fake()
    done: list[tuple[int, int, int]] = []
    out = list(compute_spectra(ck, mode="values", device="cpu", progress=lambda *a: done.append(a)))
    assert [s.key for s in out] == [r.key for r in ck.refs]
    assert [s.layer for s in out] == list(range(len(ck.refs)))
    for s in out:
        ref64 = torch.linalg.svdvals(ck.tensors[s.key].double())
        assert s.method == "gram64" and s.values.dtype == torch.float64
        assert torch.allclose(s.values, ref64, rtol=1e-9, atol=1e-12)
    assert done[-1][:2] == (len(out), len(out))
    assert done[-1][2] == sum(r.nbytes for r in ck.refs)


def test_batch_size_does_not_change_results() -> None:
    ck = _fake()
    big = list(compute_spectra(ck, mode="topk", k=4, device="cpu", method="krylov"))
    tiny = list(compute_spectra(ck, mode="topk", k=4, device="cpu", method="krylov", max_memory=1))
    for a, b in zip(big, tiny, strict=True):
        assert torch.equal(a.values, b.values) and torch.equal(a.U, b.U)
        assert a.method == "rsvd-krylov" and a.converged and a.residual is not None


def test_plan_groups_shapes_and_respects_budget() -> None:
    shapes = [(4, 4), (8, 4), (4, 4), (4, 4), (8, 4)]
    plan = plan_batches(shapes, lambda s: 10, budget=20)
    assert [b.indices for b in plan] == [(0, 2), (1, 4), (3,)]
    assert plan_batches(shapes, lambda s: 10, budget=1, skip={0, 1})[0].indices == (2,)


def test_non_finite_matrix_fails_alone_and_the_run_continues() -> None:
    ck = _fake()
    ck.tensors["m2"][3, 3] = float("nan")
    out = list(compute_spectra(ck, mode="values", device="cpu"))
    bad = out[2]
    assert not bad.ok and bad.status == "failed" and "m2: 1 NaN and 0 Inf entries of" in bad.message
    assert bad.values.numel() == 0 and bad.to_dict()["status"] == "failed"
    assert all(s.ok for i, s in enumerate(out) if i != 2)


def test_reader_errors_propagate_from_the_prefetch_thread() -> None:
    ck = _fake()
    ck.fail_on = "m3"
    with pytest.raises(SourceError, match="cannot read 'm3'"):
        list(compute_spectra(ck, mode="values", device="cpu", max_memory=1))


def test_prefetch_closes_cleanly_when_abandoned() -> None:
    produced: list[int] = []

    def items() -> Iterator[int]:
        for i in range(100):
            produced.append(i)
            yield i

    gen = prefetch(items())
    assert next(gen) == 0
    gen.close()
    assert len(produced) < 100


def test_cache_second_run_reads_nothing_and_matches(tmp_path) -> None:
    ck = _fake()
    cache = SpectrumCache(tmp_path)
    first = list(compute_spectra(ck, mode="topk", k=5, device="cpu", cache=cache))
    n_reads = len(ck.reads)
    second = list(compute_spectra(ck, mode="topk", k=5, device="cpu", cache=cache))
    assert len(ck.reads) == n_reads  # nothing read again
    assert all(s.from_cache for s in second) and not any(s.from_cache for s in first)
    for a, b in zip(first, second, strict=True):
        assert a.key == b.key and torch.equal(a.values, b.values) and torch.equal(a.Vh, b.Vh)
        assert a.to_dict() == b.to_dict()
    # other parameters are other entries
    list(compute_spectra(ck, mode="topk", k=6, device="cpu", cache=cache))
    assert len(ck.reads) == 2 * n_reads


def test_corrupted_entry_is_reported_and_recomputed(tmp_path) -> None:
    ck = _fake(2, 0)
    cache = SpectrumCache(tmp_path)
    first = list(compute_spectra(ck, mode="values", device="cpu", cache=cache))
    payloads = sorted(tmp_path.rglob("*.safetensors"))
    assert len(payloads) == 2
    data = bytearray(payloads[0].read_bytes())
    data[-3] ^= 0xFF
    payloads[0].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupted spectrum cache entry"):
        again = list(compute_spectra(ck, mode="values", device="cpu", cache=cache))
    assert sorted(s.from_cache for s in again) == [False, True]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.values, b.values)


def test_option_errors() -> None:
    ck = _fake()
    with pytest.raises(ValidationError, match="needs an integer k >= 1, got k=None"):
        compute_spectra(ck, mode="topk")
    with pytest.raises(ValidationError, match="got 'eig'"):
        compute_spectra(ck, mode="eig")
    with pytest.raises(ValidationError, match="max_memory must be > 0 bytes, got -5"):
        compute_spectra(ck, max_memory=-5)


def test_minilm_real_checkpoint_values_and_topk(minilm_path, tmp_path) -> None:
    from spectra.sources import Checkpoint

    with Checkpoint.open(minilm_path) as ck:
        refs = [r for r in ck.matrices() if r.layer == 0]
        assert len(refs) == 6
        cache = SpectrumCache(tmp_path)
        vals = list(compute_spectra(ck, refs, mode="values", device="cpu", cache=cache))
        top = list(compute_spectra(ck, refs, mode="topk", k=16, device="cpu", method="krylov"))
        for ref, v, t in zip(refs, vals, top, strict=True):
            W = ck.read(ref).double()
            U_ref, S_ref, _ = torch.linalg.svd(W, full_matrices=False)
            assert v.key == ref.key and v.role == ref.role and v.layer == 0
            assert torch.allclose(v.values, S_ref, rtol=1e-9)
            cos = torch.linalg.svdvals(t.U.double().T @ U_ref[:, :16]).min()
            assert float(cos) >= 0.99
        again = list(compute_spectra(ck, refs, mode="values", device="cpu", cache=cache))
        assert all(s.from_cache for s in again)
        assert (tmp_path / f"v{CACHE_FORMAT}" / "shards.json").is_file()


pytestmark = pytest.mark.usefixtures("one_thread")
