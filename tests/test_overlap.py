"""The report's fits run on the engine's worker while it decomposes the next batch
(`compute_spectra(then=...)`, spectra.overlap.Lagged): outputs, progress calls and errors
exactly as the sequential loop (`FITS_ON_WORKER = False`: each fit on the calling thread as its
spectrum arrives) gives them."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from _linalg_fixtures import one_thread  # noqa: F401  (fixture)
from _source_fixtures import llama_tensors, write_llama_like
from safetensors.torch import save_file

from spectra.errors import SourceError
from spectra.jobs import report
from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.linalg.cache import SpectrumCache
from spectra.linalg.decompose import SpectrumOptions
from spectra.linalg.engine import EngineOptions, MatrixExtras, compute_spectra
from spectra.linalg.spectrum import Spectrum
from spectra.overlap import Lagged
from spectra.sources import reader
from spectra.sources.checkpoint import Checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# small batches: the 2-layer fixture's 16 matrices come in several engine batches
BUDGET = 800_000


# ------------------------------------------------------------------ Lagged


def test_results_in_order_one_group_behind() -> None:
    def slow_first(x: int) -> int:
        time.sleep(0.02 if x % 3 == 0 else 0.0)
        return x * x

    lag = Lagged(slow_first, name="probe")
    try:
        for group in ([0, 1, 2], [3], [], [4, 5]):
            for x in group:
                lag.add(x, tag=f"t{x}")
            lag.end_group()
        assert lag.pending() == 6
        assert list(lag.take(keep=2)) == [("t0", 0), ("t1", 1), ("t2", 4)]
        assert list(lag.take(keep=1)) == [("t3", 9)]  # the empty group is no group
        assert list(lag.take(keep=0)) == [("t4", 16), ("t5", 25)]
        assert lag.pending() == 0
    finally:
        lag.close()


def test_fn_runs_once_per_item_in_order_on_one_worker_thread() -> None:
    seen: list[tuple[int, str]] = []

    def fn(x: int) -> int:
        seen.append((x, threading.current_thread().name))
        return x

    lag = Lagged(fn, name="probe")
    for x in range(10):
        lag.add(x)
    lag.end_group()
    assert [r for _, r in lag.take(keep=0)] == list(range(10))
    lag.close()
    assert [x for x, _ in seen] == list(range(10))
    assert len({name for _, name in seen}) == 1 and seen[0][1].startswith("probe")


def test_an_error_of_fn_is_raised_at_its_item_after_the_earlier_results() -> None:
    def fn(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    lag = Lagged(fn, name="probe")
    for x in range(5):
        lag.add(x)
    lag.end_group()
    got: list[int] = []
    with pytest.raises(ValueError, match="two"):
        for _, r in lag.take(keep=0):
            got.append(r)
    assert got == [0, 1]
    lag.close()
    _no_thread_left("probe")


# ------------------------------------------------------------------ the report


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return write_llama_like(tmp_path / "m", layers=2, shards=2)


def _analyze(path: Path, worker: bool, monkeypatch: pytest.MonkeyPatch, **kw: object):
    monkeypatch.setattr(report, "FITS_ON_WORKER", worker)
    options = kw.pop("options", AnalyzeOptions(device="cpu", mp_fit=True))
    return analyze(path, options, max_memory=BUDGET, **kw)  # type: ignore[arg-type]


def _json(an: object) -> str:
    data = an.to_dict()  # type: ignore[attr-defined]
    data.pop("versions", None)
    return json.dumps(data, sort_keys=True)


def test_report_is_bit_identical_to_the_sequential_fits(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for options in (
        AnalyzeOptions(device="cpu", mp_fit=True),
        AnalyzeOptions(device="cpu", randomize=True, detx=True, fix_fingers="clip_xmax"),
    ):
        seq = _analyze(llama, False, monkeypatch, options=options, cache=False)
        par = _analyze(llama, True, monkeypatch, options=options, cache=False)
        assert _json(par) == _json(seq)
        assert list(par.esds) == list(seq.esds)
        assert all((par.esds[k] == seq.esds[k]).all() for k in seq.esds)
    cache = tmp_path / "cache"
    cold = _analyze(llama, True, monkeypatch, cache=cache)
    warm = _analyze(llama, True, monkeypatch, cache=cache)
    assert _json(cold) == _json(warm) == _json(_analyze(llama, False, monkeypatch, cache=False))


def test_progress_calls_as_the_sequential_loop_made_them(llama: Path) -> None:
    """Sequentially, progress(k) came after the caller took the result of matrix k - 1; the
    failure tracker of a torchrun rank relies on it to name the matrix whose fit failed."""
    events: dict[bool, list[tuple[str, object]]] = {False: [], True: []}
    opts = SpectrumOptions(mode="values")
    for worker in (False, True):
        log = events[worker]

        def tick(done: int, total: int, nbytes: int, log: list = log) -> None:
            log.append(("p", (done, total, nbytes)))

        with Checkpoint.open(llama) as ck:
            run = EngineOptions(device="cpu", max_memory=BUDGET)
            if worker:
                then = compute_spectra(ck, None, opts, engine=run, progress=tick, then=_key)
                for key in then:
                    log.append(("r", key))
            else:
                for spec in compute_spectra(ck, None, opts, engine=run, progress=tick):
                    log.append(("r", _key(spec)))
    assert events[True] == events[False]
    n = len(events[False]) // 2
    assert [e[0] for e in events[False]] == ["r", "p"] * n and n == 16


@pytest.mark.parametrize("fit_fails", [False, True])
def test_an_engine_error_comes_after_every_earlier_result_and_fit_error(
    llama: Path, fit_fails: bool
) -> None:
    """The engine fails at its 10th matrix (an extras hook raising while it computes); with
    `fit_fails`, the fit of the 2nd matrix fails first, which sequentially was raised first."""
    events: dict[bool, list[tuple[str, object]]] = {False: [], True: []}
    errors: dict[bool, str] = {}
    opts = SpectrumOptions(mode="values")
    with Checkpoint.open(llama) as ck:
        second = ck.matrices()[1].key
    for worker in (False, True):
        log = events[worker]
        seen = {"n": 0}

        def hook(ref: object, W: object, seen: dict = seen) -> dict[str, int]:
            seen["n"] += 1
            if seen["n"] == 10:
                raise RuntimeError("engine failed at its 10th matrix")
            return {"x": 1}

        def fit(spec: Spectrum) -> str:
            if fit_fails and spec.key == second:
                raise ArithmeticError("fit of the 2nd matrix failed")
            return spec.key

        def tick(done: int, total: int, nbytes: int, log: list = log) -> None:
            log.append(("p", done))

        with Checkpoint.open(llama) as ck:
            run = EngineOptions(device="cpu", max_memory=BUDGET)
            extras = MatrixExtras(("x",), hook)
            try:
                if worker:
                    for key in compute_spectra(
                        ck, None, opts, engine=run, progress=tick, extras=extras, then=fit
                    ):
                        log.append(("r", key))
                else:
                    for spec in compute_spectra(
                        ck, None, opts, engine=run, progress=tick, extras=extras
                    ):
                        log.append(("r", fit(spec)))
            except (RuntimeError, ArithmeticError) as exc:
                errors[worker] = f"{type(exc).__name__}: {exc}"
    assert errors[True] == errors[False]
    assert ("fit of the 2nd" in errors[False]) == fit_fails
    assert events[True] == events[False] and len(events[False]) >= (2 if fit_fails else 6)


def _key(spec: Spectrum) -> str:
    return spec.key


def test_a_failing_fit_raises_its_error_after_the_same_progress(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = report._layer
    calls: dict[int, list[int]] = {}

    def failing(ref, spec, options):  # noqa: ANN001
        if ref.key.endswith("layers.1.self_attn.v_proj.weight"):
            raise ArithmeticError(f"fit of {ref.key} failed")
        return original(ref, spec, options)

    monkeypatch.setattr(report, "_layer", failing)
    for worker in (False, True):
        log = calls.setdefault(worker, [])

        def tick(done: int, total: int, nbytes: int, log: list = log) -> None:
            log.append(done)

        with pytest.raises(ArithmeticError, match=r"fit of .*layers\.1\.self_attn\.v_proj"):
            _analyze(llama, worker, monkeypatch, cache=False, progress=tick)
    assert calls[True] == calls[False] and calls[False] == list(range(1, calls[False][-1] + 1))
    _no_thread_left("spectra-then")


def test_a_shard_rewritten_mid_run_is_the_same_source_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first shard is rewritten (same size, other bytes) while the engine holds its first
    matrix: storing that matrix's spectrum is a SourceError, fits overlapped or not."""
    monkeypatch.setattr(reader, "RACY_NS", -(10**15))  # digests settled at once
    raised: dict[bool, str] = {}
    original_outlier = report.outlier_ratio
    for worker in (False, True):
        model = write_llama_like(tmp_path / f"m{worker}", layers=2, shards=2)
        shard = model / "model-00001-of-00002.safetensors"  # where the first matrix is
        tensors = llama_tensors(layers=2, seed=7)
        done = threading.Event()

        def rewrite_once(W, multiplier, shard=shard, tensors=tensors, done=done):  # noqa: ANN001
            if not done.is_set():  # while the engine holds the first matrix
                done.set()
                names = json.loads(shard.with_name("model.safetensors.index.json").read_text())
                mine = [n for n, f in names["weight_map"].items() if f == shard.name]
                before = shard.stat().st_size
                save_file({n: tensors[n] for n in mine}, str(shard), metadata={"format": "pt"})
                assert shard.stat().st_size == before
            return original_outlier(W, multiplier=multiplier)

        monkeypatch.setattr(report, "outlier_ratio", rewrite_once)
        with pytest.raises(SourceError) as info:
            _analyze(model, worker, monkeypatch, cache=SpectrumCache(tmp_path / f"c{worker}"))
        raised[worker] = str(info.value).replace(f"m{worker}", "m")
    assert raised[True] == raised[False]
    assert "changed while spectra was reading it" in raised[False]


def test_ctrl_c_in_the_engine_or_a_fit_stops_the_report_and_its_threads(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_outlier, original_layer = report.outlier_ratio, report._layer
    seen = {"engine": 0, "fit": 0}

    def interrupt_engine(W, multiplier):  # noqa: ANN001
        seen["engine"] += 1
        if seen["engine"] == 9:
            raise KeyboardInterrupt
        return original_outlier(W, multiplier=multiplier)

    def interrupt_fit(ref, spec, options):  # noqa: ANN001
        seen["fit"] += 1
        if seen["fit"] == 5:
            raise KeyboardInterrupt
        return original_layer(ref, spec, options)

    monkeypatch.setattr(report, "outlier_ratio", interrupt_engine)
    with pytest.raises(KeyboardInterrupt):
        _analyze(llama, True, monkeypatch, cache=False)
    monkeypatch.setattr(report, "outlier_ratio", original_outlier)
    monkeypatch.setattr(report, "_layer", interrupt_fit)
    with pytest.raises(KeyboardInterrupt):
        _analyze(llama, True, monkeypatch, cache=False)
    _no_thread_left("spectra-then")
    _no_thread_left("spectra-prefetch")


def _no_thread_left(prefix: str) -> None:
    deadline = time.monotonic() + 10
    while any(t.name.startswith(prefix) for t in threading.enumerate()):
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.01)


# ------------------------------------------------------------------ shard hashing on a worker


def _spectra(path: Path, cache: SpectrumCache | None) -> list[Spectrum]:
    with Checkpoint.open(path) as ck:
        run = EngineOptions(device="cpu", max_memory=BUDGET)
        return list(
            compute_spectra(ck, None, SpectrumOptions(mode="values"), engine=run, cache=cache)
        )


def _same(a: list[Spectrum], b: list[Spectrum]) -> bool:
    return [s.key for s in a] == [s.key for s in b] and all(
        x.values.dtype == y.values.dtype and bool((x.values == y.values).all())
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture
def hashing(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """(thread, shard name, hashed) of every shard digest asked of a SpectrumCache; hashed:
    the memo missed and the file was read (the default `compute`)."""
    calls: list[tuple[str, str, bool]] = []
    original = SpectrumCache.shard_record

    def spy(self, path, compute=reader.hash_shard):  # noqa: ANN001
        hashed = {"done": False}

        def counted(p: Path) -> reader.ShardDigest:
            hashed["done"] = compute is reader.hash_shard  # not the engine's memo-only probe
            return compute(p)

        try:
            return original(self, path, counted)
        finally:
            calls.append((threading.current_thread().name, Path(path).name, hashed["done"]))

    monkeypatch.setattr(SpectrumCache, "shard_record", spy)
    monkeypatch.setattr(reader, "RACY_NS", -(10**15))  # digests settled at once: memo used
    return calls


def test_shards_are_hashed_on_a_worker_and_spectra_equal_the_uncached_run(
    llama: Path, tmp_path: Path, hashing: list[tuple[str, str, bool]]
) -> None:
    plain = _spectra(llama, None)
    cold = _spectra(llama, SpectrumCache(tmp_path / "c"))
    read = [(t, name) for t, name, hashed in hashing if hashed]
    assert sorted(name for _, name in read) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert all(t == "spectra-hash" for t, _ in read), read  # never on the caller's thread
    hashing.clear()
    warm = _spectra(llama, SpectrumCache(tmp_path / "c"))
    assert not any(hashed for *_, hashed in hashing)  # the memo: nothing hashed again
    assert all(s.from_cache for s in warm) and not any(s.from_cache for s in cold)
    assert _same(cold, plain) and _same(warm, plain)


def test_a_touched_shard_is_rehashed_on_the_worker_and_its_entries_used_unread(
    llama: Path, tmp_path: Path, hashing: list[tuple[str, str, bool]]
) -> None:
    """A new mtime: the memo misses, the worker hashes the same bytes again, and every matrix
    of that shard is found in the cache when its batch is read: served, not read."""
    cold = _spectra(llama, SpectrumCache(tmp_path / "c"))
    shard = llama / "model-00002-of-00002.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    hashing.clear()
    read: list[str] = []
    original = Checkpoint.read_many

    def counting(self, refs, **kw):  # noqa: ANN001
        read.extend(r.key for r in refs)
        return original(self, refs, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoint, "read_many", counting)
        warm = _spectra(llama, SpectrumCache(tmp_path / "c"))
    assert [(t, n) for t, n, hashed in hashing if hashed] == [("spectra-hash", shard.name)]
    assert read == [] and all(s.from_cache for s in warm)
    assert _same(warm, cold)


def test_a_hashing_error_is_raised_by_the_run(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(self, path, compute=reader.hash_shard):  # noqa: ANN001
        if compute is reader.hash_shard:
            raise SourceError(f"{path}: cannot read shard to hash it (Input/output error)")
        return compute(Path(path))

    monkeypatch.setattr(SpectrumCache, "shard_record", unreadable)
    with pytest.raises(SourceError, match="cannot read shard to hash it"):
        _spectra(llama, SpectrumCache(tmp_path / "c"))
    _no_thread_left("spectra-hash")
