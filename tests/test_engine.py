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
from spectra.linalg.decompose import SpectrumOptions
from spectra.linalg.engine import EngineOptions, compute_spectra

CPU = EngineOptions(device="cpu")


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
    out = list(
        compute_spectra(
            ck, None, SpectrumOptions(mode="values"), engine=CPU, progress=lambda *a: done.append(a)
        )
    )
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
    big = list(
        compute_spectra(ck, None, SpectrumOptions(mode="topk", k=4, method="krylov"), engine=CPU)
    )
    tiny = list(
        compute_spectra(
            ck,
            None,
            SpectrumOptions(mode="topk", k=4, method="krylov"),
            engine=EngineOptions(device="cpu", max_memory=1),
        )
    )
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
    out = list(compute_spectra(ck, None, SpectrumOptions(mode="values"), engine=CPU))
    bad = out[2]
    assert not bad.ok and bad.status == "failed" and "m2: 1 NaN and 0 Inf entries of" in bad.message
    assert bad.values.numel() == 0 and bad.to_dict()["status"] == "failed"
    assert all(s.ok for i, s in enumerate(out) if i != 2)


def test_reader_errors_propagate_from_the_prefetch_thread() -> None:
    ck = _fake()
    ck.fail_on = "m3"
    with pytest.raises(SourceError, match="cannot read 'm3'"):
        list(
            compute_spectra(
                ck,
                None,
                SpectrumOptions(mode="values"),
                engine=EngineOptions(device="cpu", max_memory=1),
            )
        )


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
    first = list(
        compute_spectra(ck, None, SpectrumOptions(mode="topk", k=5), engine=CPU, cache=cache)
    )
    n_reads = len(ck.reads)
    second = list(
        compute_spectra(ck, None, SpectrumOptions(mode="topk", k=5), engine=CPU, cache=cache)
    )
    assert len(ck.reads) == n_reads  # nothing read again
    assert all(s.from_cache for s in second) and not any(s.from_cache for s in first)
    for a, b in zip(first, second, strict=True):
        assert a.key == b.key and torch.equal(a.values, b.values) and torch.equal(a.Vh, b.Vh)
        assert a.to_dict() == b.to_dict()
    # other parameters are other entries
    list(compute_spectra(ck, None, SpectrumOptions(mode="topk", k=6), engine=CPU, cache=cache))
    assert len(ck.reads) == 2 * n_reads


def test_corrupted_entry_is_reported_and_recomputed(tmp_path) -> None:
    ck = _fake(2, 0)
    cache = SpectrumCache(tmp_path)
    first = list(compute_spectra(ck, None, SpectrumOptions(mode="values"), engine=CPU, cache=cache))
    payloads = sorted(tmp_path.rglob("*.safetensors"))
    assert len(payloads) == 2
    data = bytearray(payloads[0].read_bytes())
    data[-3] ^= 0xFF
    payloads[0].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupted spectrum cache entry"):
        again = list(
            compute_spectra(ck, None, SpectrumOptions(mode="values"), engine=CPU, cache=cache)
        )
    assert sorted(s.from_cache for s in again) == [False, True]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.values, b.values)


def test_option_errors() -> None:
    ck = _fake()
    with pytest.raises(ValidationError, match="needs an integer k >= 1, got k=None"):
        compute_spectra(ck, None, SpectrumOptions(mode="topk"))
    with pytest.raises(ValidationError, match="got 'eig'"):
        compute_spectra(ck, None, SpectrumOptions(mode="eig"))
    with pytest.raises(ValidationError, match="max_memory must be > 0 bytes, got -5"):
        compute_spectra(ck, engine=EngineOptions(max_memory=-5))


def test_minilm_real_checkpoint_values_and_topk(minilm_path, tmp_path) -> None:
    from spectra.sources.checkpoint import Checkpoint

    with Checkpoint.open(minilm_path) as ck:
        refs = [r for r in ck.matrices() if r.layer == 0]
        assert len(refs) == 6
        cache = SpectrumCache(tmp_path)
        vals = list(
            compute_spectra(ck, refs, SpectrumOptions(mode="values"), engine=CPU, cache=cache)
        )
        top = list(
            compute_spectra(
                ck, refs, SpectrumOptions(mode="topk", k=16, method="krylov"), engine=CPU
            )
        )
        for ref, v, t in zip(refs, vals, top, strict=True):
            W = ck.read(ref).double()
            U_ref, S_ref, _ = torch.linalg.svd(W, full_matrices=False)
            assert v.key == ref.key and v.role == ref.role and v.layer == 0
            assert torch.allclose(v.values, S_ref, rtol=1e-9)
            cos = torch.linalg.svdvals(t.U.double().T @ U_ref[:, :16]).min()
            assert float(cos) >= 0.99
        again = list(
            compute_spectra(ck, refs, SpectrumOptions(mode="values"), engine=CPU, cache=cache)
        )
        assert all(s.from_cache for s in again)
        assert (tmp_path / f"v{CACHE_FORMAT}" / "shards.json").is_file()


pytestmark = pytest.mark.usefixtures("one_thread")


# -- memory: budget estimate, the prefetch gate, bf16 read as stored ----------------------------
def test_values_estimate_counts_input_one_slice_and_the_gram_workspace() -> None:
    from spectra.linalg.decompose import GRAM_BYTES_PER_ENTRY, SpectrumOptions
    from spectra.linalg.exact import GRAM_SLICE_BYTES

    opts = SpectrumOptions(mode="values")
    m, n = 32000, 4096  # a Llama embedding: no float64 copy of W, one 64 MiB slice
    assert opts.bytes_per_matrix((m, n)) == 4 * m * n + GRAM_SLICE_BYTES + 17 * n * n
    assert GRAM_BYTES_PER_ENTRY == 17  # G and eigvalsh's copy: 2.07 x 8 bytes measured
    assert opts.bytes_per_matrix((40, 30)) == 12 * 40 * 30 + 17 * 30 * 30  # small: whole copy
    svdvals = SpectrumOptions(mode="values", route="svdvals")
    assert svdvals.bytes_per_matrix((m, n)) == 12 * m * n + 16 * n * n


def test_memory_gate_holds_a_read_until_the_batch_in_flight_is_released() -> None:
    import threading

    from spectra.linalg.batching import MemoryGate

    gate = MemoryGate(100)
    gate.acquire(70)  # an oversize batch computing
    admitted = threading.Event()

    def reader() -> None:
        gate.acquire(40)
        admitted.set()

    t = threading.Thread(target=reader)
    t.start()
    assert not admitted.wait(0.2)  # 70 + 40 > 100: the next read waits
    gate.release(70)
    assert admitted.wait(5) and gate.used == 40
    gate.acquire(60)  # fits beside it
    t.join()
    gate.release(100)
    gate.acquire(500)  # over capacity but alone: admitted (an oversize batch never deadlocks)
    assert gate.used == 500
    closing = MemoryGate(1)
    closing.acquire(1)
    waiter = threading.Thread(target=closing.acquire, args=(1,))
    waiter.start()
    closing.close()
    waiter.join(5)
    assert not waiter.is_alive()


def test_bf16_is_read_as_stored_and_gives_the_float32_route_bit_for_bit(tmp_path) -> None:
    from _source_fixtures import write_llama_like

    from spectra.linalg.engine import MatrixExtras
    from spectra.linalg.exact import gram_svdvals
    from spectra.sources.checkpoint import Checkpoint

    path = write_llama_like(tmp_path / "ck", layers=1, hidden=32, intermediate=48, vocab=50)
    seen: list[torch.dtype] = []

    def note(ref, W) -> dict[str, float]:  # noqa: ANN001
        seen.append(W.dtype)
        return {"sum": float(W.double().sum())}

    extras = MatrixExtras(("sum",), note)
    with Checkpoint.open(str(path)) as ck:
        refs = ck.matrices()
        got = list(compute_spectra(ck, refs, engine=CPU, extras=extras))
        for ref, spec in zip(refs, got, strict=True):
            W32 = ck.read(ref)  # float32
            assert torch.equal(spec.values, gram_svdvals(W32[None])[0])
            assert spec.extras == {"sum": float(W32.double().sum())}
    assert set(seen) == {torch.bfloat16} and len(seen) == len(refs)


def test_extras_ride_on_the_read_and_are_cached(tmp_path) -> None:
    from spectra.linalg.engine import MatrixExtras

    ck = _fake()
    calls: list[str] = []

    def norm(ref, W) -> dict[str, float]:  # noqa: ANN001
        calls.append(ref.key)
        return {"fro": float(torch.linalg.norm(W.double()))}

    cache = SpectrumCache(tmp_path)
    first = list(compute_spectra(ck, engine=CPU, cache=cache, extras=MatrixExtras(("fro",), norm)))
    assert sorted(calls) == sorted(ck.tensors) and sorted(ck.reads) == sorted(ck.tensors)
    for spec in first:
        assert spec.extras == {"fro": float(torch.linalg.norm(ck.tensors[spec.key].double()))}
    # cached: neither decomposed nor read again, extras served from the entry
    again = list(compute_spectra(ck, engine=CPU, cache=cache, extras=MatrixExtras(("fro",), norm)))
    assert len(ck.reads) == len(ck.tensors) and len(calls) == len(ck.tensors)
    assert [s.extras for s in again] == [s.extras for s in first] and all(
        s.from_cache for s in again
    )
    # a new extra: one read per matrix (no decomposition), then stored beside the old one
    twice = MatrixExtras(("fro", "max"), lambda ref, W: {**norm(ref, W), "max": float(W.max())})
    third = list(compute_spectra(ck, engine=CPU, cache=cache, extras=twice))
    assert len(ck.reads) == 2 * len(ck.tensors)
    assert all(set(s.extras) == {"fro", "max"} for s in third)
    list(compute_spectra(ck, engine=CPU, cache=cache, extras=twice))
    assert len(ck.reads) == 2 * len(ck.tensors)
    for a, b in zip(first, third, strict=True):
        assert torch.equal(a.values, b.values)
