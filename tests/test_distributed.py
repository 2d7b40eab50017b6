"""spectra.distributed: partition, gather, failure protocol (pure), and real 2-process torchrun
runs with gloo on CPU (results equal to a single process, a crashed rank, resume from cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _source_fixtures import write_llama_like, write_lora_adapter
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spectra.distributed.failures import (
    Aborted,
    DistributedError,
    FailureBoard,
    Fault,
    RankStatus,
    Tracker,
    check_statuses,
    guarded,
)
from spectra.distributed.gather import GatherError, merge_indexed
from spectra.distributed.hub import snapshot_commit
from spectra.distributed.partition import CostModel, loads, matrix_cost, partition, shard_items
from spectra.distributed.runtime import (
    DistEnv,
    Session,
    backend_for,
    detect_env,
    resolve_threads,
    resolve_timeout,
)
from spectra.errors import ValidationError
from spectra.sources.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

# ------------------------------------------------------------------------------ partition


@given(
    costs=st.lists(st.floats(min_value=0, max_value=1e300), min_size=0, max_size=60),
    world=st.integers(min_value=1, max_value=9),
)
@example(costs=[5e-324], world=2)  # a subnormal total once underflowed the share to zero
@example(costs=[1e300] * 60, world=3)  # a huge total must not overflow to inf
@settings(max_examples=200, deadline=None)
def test_partition_is_complete_contiguous_and_balanced(costs: list[float], world: int) -> None:
    parts = partition(costs, world)
    assert len(parts) == world
    flat = [i for part in parts for i in part]
    assert flat == list(range(len(costs)))  # every item once, ranks in order: contiguous runs
    assert partition(costs, world) == parts  # deterministic
    total = sum(costs)
    if total > 0:
        bound = total / world + max(costs)
        assert max(loads(costs, parts)) <= bound * (1 + 1e-12)


def test_partition_balances_by_cost_not_count() -> None:
    costs = [8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert partition(costs, 2) == [[0], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert partition([0.0, 0.0, 0.0, 0.0], 2) == [[0, 1], [2, 3]]  # no cost known: by count
    assert partition([5.0], 3) == [[], [0], []]  # fewer items than ranks: some ranks idle


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_partition_rejects_bad_world_size(bad: object) -> None:
    with pytest.raises(ValidationError, match=f"world_size must be a positive integer, got {bad}"):
        partition([1.0], bad)  # type: ignore[arg-type]


def test_partition_rejects_negative_or_nan_cost() -> None:
    with pytest.raises(ValidationError, match="finite and >= 0, got -1.0"):
        partition([1.0, -1.0], 2)
    with pytest.raises(ValidationError, match="got nan"):
        partition([float("nan")], 2)


def test_cost_model_flops_and_seconds() -> None:
    full = CostModel(flops_per_s=1e9, bytes_per_s=1e8)
    assert full.flops((4096, 1024)) == 4096 * 1024 * 1024
    assert full.seconds((4096, 1024), 8 * 10**6) == pytest.approx(4.294967296 + 0.08)
    topk = CostModel(mode="topk", k=16, oversample=4, power_iters=2)
    assert topk.flops((100, 50)) == 2.0 * 100 * 50 * 20 * 6
    assert CostModel(mode="topk", k=64).flops((8, 8)) == 2.0 * 8 * 8 * 8 * 10  # width capped
    with pytest.raises(ValidationError, match="mode must be values, full or topk, got 'svd'"):
        CostModel(mode="svd")
    with pytest.raises(ValidationError, match="rates must be > 0"):
        CostModel(flops_per_s=0)


@dataclass(frozen=True)
class _Tensor:
    shard: str


@dataclass(frozen=True)
class _Ref:
    key: str
    shape: tuple[int, int]
    nbytes: int
    tensor: _Tensor


def test_shard_items_keeps_ranks_on_their_own_files() -> None:
    # 4 shards of 6 equal matrices, listed interleaved (the worst case for reading)
    refs = [_Ref(f"m{i}", (64, 64), 8192, _Tensor(f"s{i % 4}")) for i in range(24)]
    shares = [shard_items(refs, r, 4, cost=lambda r: 1.0) for r in range(4)]
    assert sorted(i for s in shares for i in s) == list(range(24))
    for share in shares:
        assert len(share) == 6
        assert len({refs[i].tensor.shard for i in share}) == 1  # one file per rank
    with pytest.raises(ValidationError, match=r"rank must be in \[0, 4\), got 4"):
        shard_items(refs, 4, 4)


def test_shard_items_on_a_real_checkpoint_touches_few_shards(tmp_path: Path) -> None:
    folder = write_llama_like(tmp_path / "ck", layers=4, shards=4)
    with Checkpoint.open(folder) as ck:
        refs = ck.matrices()
    costs = [matrix_cost(r) for r in refs]
    shares = [shard_items(refs, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(len(refs)))
    mine = [sum(costs[i] for i in s) for s in shares]
    assert max(mine) <= sum(costs) / 2 + max(costs)
    shards = [{refs[i].tensor.shard for i in s} for s in shares]
    assert len(shards[0] & shards[1]) <= 1  # at most the boundary shard is shared


# ------------------------------------------------------------------------------ runtime


def test_detect_env_reads_torchrun_variables() -> None:
    assert detect_env({}) == DistEnv(0, 1, 0, 1)
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.is_distributed and not env.is_writer and not env.is_local_leader
    with pytest.raises(ValidationError, match="WORLD_SIZE='two' is not an integer"):
        detect_env({"WORLD_SIZE": "two"})
    with pytest.raises(ValidationError, match="RANK=2, WORLD_SIZE=2"):
        detect_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValidationError, match="LOCAL_RANK=2, LOCAL_WORLD_SIZE=2"):
        detect_env({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"})


def test_threads_timeout_and_backend() -> None:
    assert resolve_threads(3, {}) == 3
    assert resolve_threads(None, {"SPECTRA_NUM_THREADS": "2"}) == 2
    assert resolve_threads(None, {}) is None
    with pytest.raises(ValidationError, match="SPECTRA_NUM_THREADS='x' is not an integer"):
        resolve_threads(None, {"SPECTRA_NUM_THREADS": "x"})
    with pytest.raises(ValidationError, match="positive integer, got 0"):
        resolve_threads(0, {})
    assert resolve_timeout(12) == 12.0
    with pytest.raises(ValidationError, match="got -1"):
        resolve_timeout(-1)
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"


def test_snapshot_commit_from_hub_cache_layout(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--org--name" / "snapshots" / commit / "model.safetensors"
    assert snapshot_commit([snap]) == commit
    assert snapshot_commit([tmp_path / "local" / "model.safetensors"]) == ""


# ------------------------------------------------------------------------------ gather, failures


def test_merge_indexed_orders_and_checks() -> None:
    assert merge_indexed([[(2, "c"), (0, "a")], [], [(1, "b")]], 3) == ["a", "b", "c"]
    with pytest.raises(GatherError, match="index 1 arrived twice"):
        merge_indexed([[(0, "a"), (1, "b")], [(1, "b")]], 2)
    with pytest.raises(GatherError, match="1 result.s. missing after the gather, e.g. index 2"):
        merge_indexed([[(0, "a"), (1, "b")]], 3)
    with pytest.raises(GatherError, match=r"index 5 out of range \[0, 2\)"):
        merge_indexed([[(5, "x")]], 2)


def test_fault_spec_parsing() -> None:
    assert Fault.from_env({"SPECTRA_DIST_FAULT": "1:3:exit"}) == Fault(1, 3, "exit")
    assert Fault.from_env({}) is None
    with pytest.raises(ValidationError, match="'1:x:raise': RANK and N must be integers"):
        Fault.from_env({"SPECTRA_DIST_FAULT": "1:x:raise"})
    with pytest.raises(ValidationError, match="expected RANK:N:raise or RANK:N:exit"):
        Fault.from_env({"SPECTRA_DIST_FAULT": "1:2:boom"})


class _Store:
    """The two calls FailureBoard makes on a c10d store."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def add(self, key: str, amount: int) -> int:
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]


def _session(rank: int, world: int, store: object = None) -> Session:
    return Session(DistEnv(rank, world, rank, world), torch.device("cpu"), 1, store=store)


def test_failure_is_recorded_with_its_matrix_and_peers_stop_early() -> None:
    store = _Store()

    def failing(tracker: Tracker) -> list[int]:
        tracker.step("layer.0")
        tracker.step("layer.1")
        raise ValueError("bad\nvalue")

    status, result = guarded(_session(1, 2, store), failing, fault=None)
    assert result is None
    assert status == RankStatus(1, status.host, "failed", "layer.1", "ValueError", "bad value")
    assert FailureBoard(store).any_failed()

    seen: list[str] = []

    def peer(tracker: Tracker) -> list[int]:
        for key in ("a", "b"):
            tracker.step(key)
            seen.append(key)
        return [1]

    status0, result0 = guarded(_session(0, 2, store), peer, fault=None)
    assert (status0.state, result0, seen) == ("aborted", None, [])
    with pytest.raises(DistributedError) as info:
        check_statuses([status0, status])
    text = str(info.value)
    assert "1 of 2 rank(s) failed: rank 1" in text
    assert "on matrix 'layer.1': ValueError: bad value" in text and "rerun" in text


def test_injected_fault_and_world_of_one_reraises() -> None:
    def work(tracker: Tracker) -> None:
        for key in ("a", "b", "c"):
            tracker.step(key)

    status, _ = guarded(_session(1, 2), work, fault=Fault(1, 2, "raise"))
    assert (status.state, status.key) == ("failed", "c")
    assert "injected failure" in status.message
    status_other, _ = guarded(_session(0, 2), work, fault=Fault(1, 0, "raise"))
    assert status_other.state == "ok"
    with pytest.raises(RuntimeError, match="injected failure"):  # single process: as is
        guarded(_session(0, 1), work, fault=Fault(0, 0, "raise"))
    with pytest.raises(Aborted):
        Tracker(_session(0, 2, _Store()), _FailedBoard()).step("x")
    check_statuses([RankStatus(0, "h"), RankStatus(1, "h")])  # all ok: no error


class _FailedBoard(FailureBoard):
    def any_failed(self) -> bool:
        return True


# ----------------------------------------------------------------- torchrun (2 CPU ranks)

_WORKER = """
import json, sys
from spectra.analysis.comparison import CompareOptions
from spectra.jobs.compare import compare
from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.linalg.cache import SpectrumCache
base, ft, lora, cache, out = sys.argv[1:6]
an = analyze(base, AnalyzeOptions(device="cpu", mp_fit=True, randomize=True), threads=1,
             cache=SpectrumCache(cache))
res = {"analysis": an.to_dict() if an else None}
if ft != "-":
    for name, other, svds in (("compare", ft, cache + "-svd"), ("lora", lora, None)):
        opts = CompareOptions(device="cpu", epsilons=(0.5, 0.9))
        cmp = compare(base, other, opts, threads=1, cache=svds)
        res[name] = cmp.to_dict() if cmp else None
if an is not None:
    with open(out, "w") as fh:
        json.dump(res, fh)
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    base = write_llama_like(root / "base", layers=2, shards=3, seed=0)
    ft = write_llama_like(root / "ft", layers=2, shards=3, seed=1)
    with Checkpoint.open(base) as ck:
        shapes = {m.key: tuple(m.shape) for m in ck.matrices(roles=["q", "v", "down"])}
    lora = write_lora_adapter(root / "lora", shapes, r=4)
    worker = root / "worker.py"
    worker.write_text(_WORKER)
    return base, ft, lora, worker


def _torchrun(
    worker: Path, args: list[str], fault: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.pop("SPECTRA_DIST_FAULT", None)
    if fault:
        env["SPECTRA_DIST_FAULT"] = fault
    env["SPECTRA_DIST_TIMEOUT"] = "60"
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(worker), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _single(base: Path, ft: Path, lora: Path, cache: Path) -> dict[str, object]:
    """The same work in this process, with the same thread count as each torchrun worker."""
    from spectra.analysis.comparison import CompareOptions
    from spectra.jobs.compare import compare
    from spectra.jobs.report import AnalyzeOptions, analyze
    from spectra.linalg.cache import SpectrumCache

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = AnalyzeOptions(device="cpu", mp_fit=True, randomize=True)
        an = analyze(base, report, cache=SpectrumCache(cache))
        svds = SpectrumCache(f"{cache}-svd")
        opts = CompareOptions(device="cpu", epsilons=(0.5, 0.9))
        cmp = compare(base, ft, opts, cache=svds)
        cmp_lora = compare(base, lora, opts)
    finally:
        torch.set_num_threads(before)
    return {"analysis": an.to_dict(), "compare": cmp.to_dict(), "lora": cmp_lora.to_dict()}


def _entries(cache: Path) -> dict[Path, tuple[int, int]]:
    """Spectrum cache entries -> (inode, mtime_ns): a rewritten entry changes both."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("entries/*/*.json")}


@pytest.mark.timeout(300)
def test_killed_rank_fails_the_job_and_the_rerun_resumes_and_equals_one_process(
    pair: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    base, ft, lora, worker = pair
    cache, out = tmp_path / "cache", tmp_path / "out.json"
    n_matrices = 16  # 2 layers x 7 + embed + lm_head

    crashed = _torchrun(worker, [str(base), "-", "-", str(cache), str(out)], fault="1:2:exit")
    assert crashed.returncode != 0
    assert "exitcode: 17" in crashed.stderr and "local_rank: 1" in crashed.stderr
    assert not out.exists()
    done = _entries(cache)
    assert 2 <= len(done) < n_matrices  # rank 1 finished 2 spectra, rank 0 some or all of its own

    rerun = _torchrun(worker, [str(base), str(ft), str(lora), str(cache), str(out)])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = _entries(cache)
    assert len(after) == n_matrices
    assert all(after[p] == v for p, v in done.items())  # reused, not recomputed or rewritten

    got = json.loads(out.read_text())
    want = _single(base, ft, lora, tmp_path / "single-cache")
    assert got == want  # every JSON number bit for bit (json round trip is exact for floats)
    assert len(got["analysis"]["layers"]) == n_matrices
    assert len(got["compare"]["pairs"]) == n_matrices
    assert len(got["lora"]["pairs"]) == 6 and got["lora"]["mode"] == "lora"
    assert len(_entries(Path(f"{cache}-svd"))) == n_matrices  # base SVDs cached by their ranks


@pytest.mark.timeout(300)
def test_failing_rank_names_itself_and_its_matrix(
    pair: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    base, _, _, worker = pair
    out = tmp_path / "out.json"
    args = [str(base), "-", "-", str(tmp_path / "c"), str(out)]
    res = _torchrun(worker, args, fault="1:1:raise")
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "DistributedError: 1 of 2 rank(s) failed: rank 1" in text
    assert "failed on matrix 'model.layers." in text
    assert "RuntimeError: injected failure (SPECTRA_DIST_FAULT) at matrix 2" in text
    assert not out.exists()


def test_run_init_on_a_non_writer_rank_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from spectra.jobs.init import InitOptions, run_init

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    # a source that does not exist: a non-writer must not even open it. A calibration method:
    # those run on rank 0 alone (weight-only methods are split, see the init tests below)
    assert run_init("/nonexistent/model", InitOptions(out="/nonexistent/out", method="eva")) is None


class _Opened:
    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, leader_error: bool) -> list[tuple]:
    """Checkpoint.open records its calls; all_gather answers as two node leaders would."""
    from spectra.distributed import hub
    from spectra.errors import HubError

    commit = "ab" * 20
    calls: list[tuple] = []
    snap = tmp_path / "models--org--m" / "snapshots" / commit / "model.safetensors"

    def fake_open(source: object, **kwargs: object) -> _Opened:
        calls.append((str(source), kwargs))
        if leader_error:
            raise HubError("org/m: not in the local Hub cache")
        return _Opened([snap])

    monkeypatch.setattr(Checkpoint, "open", staticmethod(fake_open))
    monkeypatch.setattr(hub, "is_hub_source", lambda source: True)
    outcome = ("", "HubError: org/m: not in the local Hub cache") if leader_error else (commit, "")
    # ranks 0 and 2 lead nodes 0 and 1 (2 ranks per node)
    monkeypatch.setattr(hub, "all_gather", lambda s, mine: [outcome, ("", ""), outcome, ("", "")])
    return calls


def test_hub_repo_is_opened_by_the_node_leader_then_offline_by_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from spectra.distributed.hub import open_checkpoint

    calls = _fake_hub(monkeypatch, tmp_path, leader_error=False)
    leader = Session(DistEnv(2, 4, 0, 2), torch.device("cpu"), 1)
    other = Session(DistEnv(3, 4, 1, 2), torch.device("cpu"), 1)
    open_checkpoint(leader, "org/m")
    open_checkpoint(other, "org/m@main")
    assert calls[0] == ("org/m", {"revision": None, "local_only": None, "disk_budget": None})
    assert calls[1] == ("org/m", {"revision": "ab" * 20, "local_only": True})


def test_hub_download_error_stops_every_rank(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from spectra.distributed.hub import open_checkpoint

    calls = _fake_hub(monkeypatch, tmp_path, leader_error=True)
    other = Session(DistEnv(1, 4, 1, 2), torch.device("cpu"), 1)
    with pytest.raises(DistributedError, match="rank 0: HubError: org/m: not in the local Hub"):
        open_checkpoint(other, "org/m")
    assert calls == []  # the non-leader never touched the Hub


# ----------------------------------------------------------------- init split over 2 CPU ranks

_INIT_WORKER = """
import json, os, sys
from spectra.adapt.registry import get_initializer
from spectra.jobs.init import InitOptions, run_init
from spectra.errors import SpectraError

src, out, log = sys.argv[1:4]
seen = []
for name in ("pissa", "olora"):  # record which matrices this process factorizes
    cls = type(get_initializer(name))
    def spy(self, W, r, scale, ctx, _orig=cls.init):
        seen.append(ctx.key)
        return _orig(self, W, r, scale, ctx)
    cls.init = spy
record = {}
for name, extra in _RUNS:
    seen.clear()
    opts = InitOptions(out=f"{out}/{name}", method=name, device="cpu", **extra)
    res = run_init(src, opts, threads=1)
    record[name] = {"keys": list(seen), "returned": res is not None}
try:  # the same output folder again: rank 0 refuses, every rank must stop
    run_init(src, InitOptions(out=f"{out}/pissa", method="pissa", device="cpu"), threads=1)
    record["refused"] = None
except SpectraError as exc:
    record["refused"] = f"{type(exc).__name__}: {exc}"
with open(f"{log}.{os.environ['RANK']}.json", "w") as fh:
    json.dump(record, fh)
"""
# pissa through the randomized engine (seeded per matrix), olora with ranks from an allocator
# that rank 0 computes and shares
_INIT_RUNS: tuple[tuple[str, dict[str, object]], ...] = (
    ("pissa", {"rank": 4, "svd": "randomized", "seed": 7, "targets": "q,v,up,down"}),
    ("olora", {"rank": 4, "allocator": "energy", "targets": "q,k,o,gate"}),
)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _assert_same_outputs(got: Path, want: Path) -> None:
    """Adapter and residual tensors bit for bit (dtype included), the manifest exactly."""
    for sub in ("adapter", "residual_base"):
        a, b = _tensors(got / sub), _tensors(want / sub)
        assert sorted(a) == sorted(b) and a
        for name, t in a.items():
            assert t.dtype == b[name].dtype and torch.equal(t, b[name]), name
    assert json.loads((got / "spectra.json").read_text()) == json.loads(
        (want / "spectra.json").read_text()
    )  # no timing or output path in the manifest: every field must match


@pytest.mark.timeout(300)
def test_init_split_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    from spectra.jobs.init import InitOptions, init_adapter, init_share

    src = write_llama_like(tmp_path / "ck", layers=3, shards=3, seed=2)
    worker = tmp_path / "init_worker.py"
    worker.write_text(f"_RUNS = {_INIT_RUNS!r}\n" + _INIT_WORKER)
    out, log = tmp_path / "dist", tmp_path / "log"
    res = _torchrun(worker, [str(src), str(out), str(log)])
    assert res.returncode == 0, res.stderr[-3000:]
    logs = [json.loads(Path(f"{log}.{r}.json").read_text()) for r in range(2)]

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count (reproducibility contract)
    try:
        for name, extra in _INIT_RUNS:
            single = init_adapter(
                src, InitOptions(out=tmp_path / f"one-{name}", method=name, **extra)
            )
            _assert_same_outputs(out / name, tmp_path / f"one-{name}")
            # each rank factorized exactly its share, and rank 0 only wrote the rest
            planned = [m.key for m in single.plan.modules]
            with Checkpoint.open(src) as ck:
                refs = {m.key: m for m in ck.matrices()}
            shares = [init_share(single.plan.modules, refs, r, 2) for r in range(2)]
            for r in range(2):
                assert logs[r][name]["keys"] == [planned[i] for i in shares[r]]
                assert logs[r][name]["returned"] == (r == 0)
            assert (
                shares[0]
                and shares[1]
                and sorted(shares[0] + shares[1]) == list(range(len(planned)))
            )
    finally:
        torch.set_num_threads(before)
    for r in range(2):  # the refusal reached both ranks, before anything was read
        assert "rank 0" in logs[r]["refused"] and "already exists" in logs[r]["refused"]
        assert logs[r]["refused"].startswith("DistributedError")
    assert len(list(out.iterdir())) == 2  # pissa, olora: the refused run left nothing


def test_init_share_is_shard_affine_and_balanced(tmp_path: Path) -> None:
    from spectra.adapt.plan import build_plan, select_targets
    from spectra.jobs.init import init_share

    src = write_llama_like(tmp_path / "ck", layers=4, shards=4)
    with Checkpoint.open(src) as ck:
        mats = ck.matrices()
    selected = select_targets(mats, "q,k,v,o,up,gate,down")
    plan = build_plan(selected, {m.key: 4 for m in selected}, method="pissa", targets="all")
    refs = {m.key: m for m in mats}
    shares = [init_share(plan.modules, refs, r, 3) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(len(plan.modules)))
    costs = [matrix_cost(refs[m.key]) for m in plan.modules]
    loads_ = [sum(costs[i] for i in s) for s in shares]
    assert max(loads_) <= sum(costs) / 3 + max(costs)
    files = [{refs[plan.modules[i].key].tensor.shard for i in s} for s in shares]
    assert all(len(files[a] & files[b]) <= 1 for a in range(3) for b in range(a + 1, 3))


@pytest.mark.timeout(300)
def test_init_rank_failing_on_a_nan_matrix_fails_the_job_and_writes_nothing(
    tmp_path: Path,
) -> None:
    from _source_fixtures import llama_tensors, write_sharded

    tensors = llama_tensors(layers=2, seed=4)
    bad = "model.layers.1.mlp.down_proj.weight"  # the last target: rank 1's share
    tensors[bad][3, 5] = float("nan")
    src = write_sharded(tmp_path / "ck", tensors, shards=2, config={"model_type": "llama"})
    out = tmp_path / "out"
    cli = ["spectra", "init", str(src), "--out", str(out), "--targets", "q,down", "--rank", "2"]
    res = _torchrun(Path("-m"), [*cli, "--device", "cpu"])  # torchrun -m spectra init ...
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "1 of 2 rank(s) failed: rank 1" in text
    assert f"failed on matrix '{bad}'" in text
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_init_adapter_writes_given_factors_and_checks_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from spectra.adapt.registry import Factors
    from spectra.jobs.init import InitOptions, init_adapter

    src = write_llama_like(tmp_path / "ck", layers=1, shards=1)
    key = "model.layers.0.self_attn.q_proj.weight"
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(2, 64, generator=g) * 0.1, torch.randn(64, 2, generator=g) * 0.1
    given = {key: Factors(A, B, {"from": "elsewhere"})}
    args = {"method": "pissa", "rank": 2, "targets": "q", "device": "cpu"}
    res = init_adapter(src, InitOptions(out=tmp_path / "o", **args), factors=given)
    tensors = load_file(str(tmp_path / "o" / "adapter" / "adapter_model.safetensors"))
    (a_name,) = [k for k in tensors if k.endswith("q_proj.lora_A.weight")]
    assert torch.equal(tensors[a_name], A)  # written as given (float32 storage: exact)
    assert torch.equal(tensors[a_name.replace("lora_A", "lora_B")], B)
    assert res.info[key]["from"] == "elsewhere" and "svd" not in res.info[key]
    # the residual is computed from the weights: W_res + s B A gives W back
    with Checkpoint.open(src) as ck:
        W = ck.read(key, dtype=torch.float64)
    (shard,) = (tmp_path / "o" / "residual_base").glob("*.safetensors")
    W_res = load_file(str(shard))[key].double()
    scale = res.plan.modules[0].scale
    back = W_res + scale * B.double() @ A.double()
    assert float(torch.linalg.norm(back - W) / torch.linalg.norm(W)) == pytest.approx(
        res.errors[key], rel=1e-5
    )
    assert res.errors[key] < 1e-2  # bf16 rounding of the residual only
    other = "model.layers.0.self_attn.k_proj.weight"
    with pytest.raises(ValidationError, match=f"outside the plan, e.g. '{other}'"):
        init_adapter(src, InitOptions(out=tmp_path / "x", **args), factors={other: given[key]})
    bad = {key: Factors(A.clone().fill_(float("nan")), B)}
    with pytest.raises(ValidationError, match="'pissa' produced NaN/Inf factors"):
        init_adapter(src, InitOptions(out=tmp_path / "y", **args), factors=bad)
    with pytest.raises(ValidationError, match=r"returned A \(2, 64\), B \(64, 3\)"):
        init_adapter(
            src,
            InitOptions(out=tmp_path / "z", **args),
            factors={key: Factors(A, torch.zeros(64, 3))},
        )
    assert not any((tmp_path / n).exists() for n in "xyz")
