"""Streaming a sharded Hub repo under a disk budget, against the loopback Hub server
(tests/_hub_server.py) and the real huggingface_hub client (issue 15 cases 4-5): a streamed
`report` downloads every shard once and stays under its budget on disk."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _hub_fixtures import (  # noqa: F401 - hub_fixture: the `hub` fixture
    TAG_COMMIT,
    cache_folder,
    cli_env,
    closed_port,
    hub_fixture,
    run_cli,
)
from _hub_server import COMMIT, Fault, HubServer, Repo
from _source_fixtures import write_llama_like
from safetensors.torch import load_file
from typer.testing import CliRunner

from spectra.analysis.comparison import CompareOptions
from spectra.cli._common import parse_size
from spectra.cli.main import app
from spectra.errors import HubError, ValidationError
from spectra.jobs.compare import compare
from spectra.jobs.init import InitOptions, run_init
from spectra.jobs.plan import PlanOptions, make_plan
from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.sources.hub import HubRemote
from spectra.sources.hub_options import HubOptions

pytestmark = pytest.mark.timeout(300)  # CLI runs in fresh processes: slow on a busy box


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """Four layers in four shards: every role's matrices are spread over every shard."""
    src = write_llama_like(tmp_path / "src", layers=4, shards=4)
    (src / "config.json").write_text(json.dumps({"hidden_size": 64}))
    return src


def blob_bytes(folder: Path) -> int:
    """Bytes of every file in a repo's blobs folder, partial downloads included."""
    total = 0
    for p in (folder / "blobs").glob("*") if (folder / "blobs").is_dir() else []:
        try:
            total += p.stat().st_size
        except OSError:  # renamed or deleted while we looked
            continue
    return total


@pytest.fixture
def disk_watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes on disk in the repo's blobs folder: sampled every millisecond, and measured right
    after each download (when the shards held and the new one are all there)."""
    seen: list[int] = []
    real = HubRemote.download

    def measured(self: HubRemote, name: str) -> Path:
        path = real(self, name)
        seen.append(blob_bytes(cache_folder()))
        return path

    monkeypatch.setattr(HubRemote, "download", measured)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            seen.append(blob_bytes(cache_folder()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join(timeout=5)


def test_streamed_report_moves_each_shard_once_under_the_budget(
    hub: HubServer, model: Path, disk_watch: list[int]
) -> None:
    sizes = {p.name: p.stat().st_size for p in model.glob("*.safetensors")}
    total = sum(sizes.values())
    budget = 2 * max(sizes.values())
    assert budget < total  # the model does not fit the budget
    options = AnalyzeOptions(device="cpu")
    streamed = analyze("org/tiny", options, cache=False, hub=HubOptions(disk_budget=budget))
    bodies = [(n, b) for n, rng, b in hub.served if n.endswith(".safetensors") and rng is None]
    # each shard downloaded exactly once (before: every shape batch fetched every shard again)
    assert sorted(n for n, _ in bodies) == sorted(sizes)
    assert sum(b for _, b in bodies) == total
    assert disk_watch and max(disk_watch) <= budget
    assert blob_bytes(cache_folder()) == 0  # nothing left behind
    local = analyze(str(model), options, cache=False)
    assert streamed is not None and local is not None
    # provenance: the commit the revision resolved to (before: not recorded anywhere)
    assert streamed.commit == COMMIT and json.loads(streamed.to_json())["commit"] == COMMIT
    assert local.commit is None and "commit" not in local.to_dict()  # local outputs unchanged
    assert [lm.key for lm in streamed.layers] == [lm.key for lm in local.layers]
    for a, b in zip(streamed.layers, local.layers, strict=True):
        assert a.alpha == pytest.approx(b.alpha, rel=1e-9, abs=1e-12)


def safetensors_bodies(server: HubServer) -> list[tuple[str, int]]:
    """(file, bytes) of every whole-file safetensors body the server sent."""
    return [(n, b) for n, rng, b in server.served if n.endswith(".safetensors") and rng is None]


def test_cli_report_streams_under_disk_budget(model: Path, tmp_path: Path) -> None:
    """`spectra report REPO --disk-budget` (before: no such flag on any command)."""
    sizes = {p.name: p.stat().st_size for p in model.glob("*.safetensors")}
    budget = 2 * max(sizes.values())
    with HubServer({"org/tiny": Repo(model, refs={"v1": COMMIT})}) as server:
        env = cli_env(tmp_path, server.url)
        args = ["report", "org/tiny", "--revision", "v1", "--disk-budget", f"{budget}B"]
        out = run_cli([*args, "--out", "r", "--no-cache", "--device", "cpu", "-q"], env, tmp_path)
        assert out.returncode == 0, out.stderr
        assert sorted(n for n, _ in safetensors_bodies(server)) == sorted(sizes)
        assert sum(b for _, b in safetensors_bodies(server)) == sum(sizes.values())
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert len(metrics["layers"]) == 30 and metrics["commit"] == COMMIT
    blobs = tmp_path / "cli-cache" / "models--org--tiny" / "blobs"
    assert not [p for p in blobs.iterdir() if p.name.count(".") == 0 and p.stat().st_size > 50_000]


def test_budget_below_largest_shard_refused_before_download(
    hub: HubServer, model: Path, tmp_path: Path
) -> None:
    """Every job refuses it when it opens the repo, naming the shard and its size, before any
    download (before: refused only when the pass reached that shard)."""
    largest = max(model.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    message = rf"^org/tiny/{largest.name}: shard is {largest.stat().st_size} bytes .*50000 bytes"
    small = HubOptions(disk_budget=50_000)
    with pytest.raises(HubError, match=message):
        analyze("org/tiny", AnalyzeOptions(device="cpu"), cache=False, hub=small)
    with pytest.raises(HubError, match=message):
        run_init("org/tiny", InitOptions(out=tmp_path / "i", device="cpu", hub=small))
    with pytest.raises(HubError, match=message):
        compare("org/tiny", "org/tiny", CompareOptions(device="cpu"), hub=small)
    assert safetensors_bodies(hub) == []  # nothing downloaded, not even a header
    assert [n for n, rng, _ in hub.served if n.endswith(".safetensors")] == []
    assert parse_size("500MiB") == 500 * 2**20 and parse_size("20GB") == 20 * 10**9
    with pytest.raises(ValidationError, match=r"--disk-budget 'lots' is not a size"):
        parse_size("lots")


def test_cli_offline_flag_and_compare_revisions(model: Path, tmp_path: Path) -> None:
    """`--offline` reads the cache with the server gone; `--revision`/`--base-revision` name
    each side of a compare."""
    refs = {"v1": TAG_COMMIT, TAG_COMMIT: TAG_COMMIT}  # a tag on another commit
    with HubServer({"org/tiny": Repo(model, refs=refs)}) as server:
        env = cli_env(tmp_path, server.url)
        args = ["compare", "org/tiny", "org/tiny", "--base-revision", "v1", "--revision", "main"]
        out = run_cli([*args, "--out", "c", "--device", "cpu"], env, tmp_path)
        assert out.returncode == 0, out.stderr
    commits = json.loads((tmp_path / "c" / "compare.json").read_text())["commits"]
    assert commits == {"base": TAG_COMMIT, "finetuned": COMMIT}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"  # nothing listens there
    args = ["inspect", "org/tiny", "--offline", "--revision", "v1", "--json"]
    offline = run_cli(args, env, tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert len(json.loads(offline.stdout)["matrices"]) == 30


def test_init_streams_a_hub_checkpoint(hub: HubServer, model: Path, tmp_path: Path) -> None:
    """`init` on a repo streamed under a disk budget (before: 'not a local file'): the same
    adapter, residual base and manifest hashes as a local run, each shard downloaded once."""
    sizes = {p.name: p.stat().st_size for p in model.glob("*.safetensors")}
    budget = 2 * max(sizes.values())
    hubbed = InitOptions(
        out=tmp_path / "streamed", rank=4, device="cpu", hub=HubOptions(disk_budget=budget)
    )
    streamed = run_init("org/tiny", hubbed)
    local = run_init(str(model), replace(hubbed, out=tmp_path / "local", hub=None))
    assert streamed is not None and local is not None
    assert sorted(n for n, _ in safetensors_bodies(hub)) == sorted(sizes)
    for part in ("adapter/adapter_model.safetensors", *(f"residual_base/{n}" for n in sizes)):
        a, b = (
            load_file(str(tmp_path / "streamed" / part)),
            load_file(str(tmp_path / "local" / part)),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert (tmp_path / "streamed" / "residual_base" / "config.json").is_file()
    manifests = [
        json.loads((tmp_path / d / "spectra.json").read_text()) for d in ("streamed", "local")
    ]
    assert manifests[0]["source_files"] == manifests[1]["source_files"]
    assert manifests[0]["source_commit"] == COMMIT and "source_commit" not in manifests[1]
    assert blob_bytes(cache_folder()) < max(sizes.values())  # shards deleted, config kept


def test_inspect_reads_each_header_with_two_ranged_requests(hub: HubServer, model: Path) -> None:
    """`spectra inspect REPO` fetches the 8-byte length, then exactly the header, of each shard
    (before: a snapshot download of the whole model; the streaming path read two 5 MiB blocks
    per header through HfFileSystem, 1.86x the model on bench_hub_bytes.py)."""
    result = CliRunner().invoke(app, ["inspect", "org/tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["matrices"]) == 30
    got = sorted((n, rng, b) for n, rng, b in hub.served if n.endswith(".safetensors"))
    want = []
    for shard in sorted(model.glob("*.safetensors")):
        hlen = int.from_bytes(shard.read_bytes()[:8], "little")
        want += [(shard.name, "bytes=0-7", 8), (shard.name, f"bytes=8-{8 + hlen - 1}", hlen)]
    assert got == sorted(want)
    moved = sum(b for _, _, b in got)
    assert moved < sum(p.stat().st_size for p in model.glob("*.safetensors")) / 20
    assert not (cache_folder() / "blobs").exists() or blob_bytes(cache_folder()) == 0


def default_sigint() -> None:
    """In the child: Ctrl-C as a terminal delivers it (a background job inherits it ignored,
    and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_does_not_wait_for_a_stalled_download(model: Path, tmp_path: Path) -> None:
    """Ctrl-C during a download ends the run at once with one line and exit 130, with and
    without a disk budget (before: it waited for every in-flight download: here a 20 s stall)."""
    shard = sorted(model.glob("*.safetensors"))[0].name
    with HubServer({"org/tiny": Repo(model)}) as server:
        server.faults.append(Fault("resolve", "stall-get", match=shard, seconds=20))
        runs = {}
        for name, extra in (("snapshot", []), ("streamed", ["--disk-budget", "10MB"])):
            env = cli_env(tmp_path / name, server.url)
            env["HF_HUB_DOWNLOAD_TIMEOUT"] = "60"  # the stall is not ended by a timeout
            (tmp_path / name).mkdir()
            args = ["report", "org/tiny", "--out", "r", "--no-cache", "-q", *extra]
            runs[name] = subprocess.Popen(
                [sys.executable, "-m", "spectra", *args],
                env=env,
                cwd=tmp_path / name,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=default_sigint,
            )
        deadline = time.monotonic() + 240
        stalled = [r for r in server.requests if r[0] == "GET" and r[1].endswith(shard)]
        while len(stalled) < 2 and time.monotonic() < deadline:  # both are inside the stall
            time.sleep(0.2)
            stalled = [r for r in server.requests if r[0] == "GET" and r[1].endswith(shard)]
        assert len(stalled) >= 2, server.requests
        time.sleep(0.5)
        for proc in runs.values():
            proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        for name, proc in runs.items():
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 130, (name, err)
            assert [line for line in err.splitlines() if line.strip()] == ["interrupted"], err
        assert time.monotonic() - t0 < 10  # the stall lasts 20 s


def test_plan_streams_a_hub_checkpoint(hub: HubServer, model: Path, tmp_path: Path) -> None:
    """`plan` takes the Hub options too, records the commit, and streams each shard once."""
    sizes = {p.name: p.stat().st_size for p in model.glob("*.safetensors")}
    # with_vectors=False: the 1-D weights (norms) are read one by one outside the engine, which
    # does not plan those reads shard by shard (each may download its shard again)
    options = PlanOptions(
        kind="spectrum", out=tmp_path / "plan.json", device="cpu", with_vectors=False
    )
    hubbed = HubOptions(disk_budget=2 * max(sizes.values()))
    streamed = make_plan("org/tiny", options, cache=False, hub=hubbed)
    assert sorted(n for n, _ in safetensors_bodies(hub)) == sorted(sizes)
    local = make_plan(str(model), replace(options, out=tmp_path / "local.json"), cache=False)
    assert json.loads((tmp_path / "plan.json").read_text())["commit"] == COMMIT
    assert "commit" not in local.plan
    assert {k: v for k, v in streamed.plan.items() if k not in ("commit", "checkpoint")} == {
        k: v for k, v in local.plan.items() if k != "checkpoint"
    }
