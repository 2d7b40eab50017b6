"""Hub repo ids online, against a loopback server that speaks the Hub's HTTP API
(tests/_hub_server.py), driving the real huggingface_hub client (issue 15 cases 1-3, issue 14
case 7): offline after online, verified bytes, and every network failure as one HubError line.

In-process tests point huggingface_hub at the server by patching the constants it read at import
(ENDPOINT and the resolve-URL template); the CLI tests set HF_ENDPOINT in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _hub_fixtures import (  # noqa: F401 - hub_fixture, model_fixture: the hub, model fixtures
    SHARD1,
    cache_folder,
    cli_env,
    closed_port,
    hub_fixture,
    model_fixture,
    run_cli,
)
from _hub_server import COMMIT, Fault, HubServer, Repo
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file

from spectra.errors import HubError
from spectra.sources import hub_client
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub import HubRemote, streaming_shards
from spectra.sources.inventory import inventory

pytestmark = pytest.mark.timeout(120)


def first_q(ckpt: Checkpoint) -> torch.Tensor:
    return ckpt.read(ckpt.matrices(roles=["q"])[0])


def reference_q(model: Path) -> torch.Tensor:
    return load_file(str(model / SHARD1))["model.layers.0.self_attn.q_proj.weight"].float()


def test_offline_after_online_needs_no_network(
    hub: HubServer, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Checkpoint.open("org/tiny") as ckpt:
        online = first_q(ckpt)
    with Checkpoint.open("org/tiny@v1") as ckpt:
        assert torch.equal(first_q(ckpt), online)
    # huggingface_hub recorded the revisions (before the fix: no refs/, offline said "not cached")
    assert (cache_folder() / "refs" / "main").read_text() == COMMIT
    assert (cache_folder() / "refs" / "v1").read_text() == COMMIT
    found = try_to_load_from_cache("org/tiny", "config.json", cache_dir=hf_constants.HF_HUB_CACHE)
    assert isinstance(found, str) and Path(found).parent.name == COMMIT
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("org/tiny", "org/tiny@v1", f"org/tiny@{COMMIT}"):
        with Checkpoint.open(spec) as ckpt:
            assert torch.equal(first_q(ckpt), online)
            assert torch.equal(online, reference_q(model))


def test_corrupted_download_is_refused_and_deleted(hub: HubServer, model: Path) -> None:
    hub.faults.append(Fault("corrupt", "corrupt", match=SHARD1, times=1))
    sha = hashlib.sha256((model / SHARD1).read_bytes()).hexdigest()
    with pytest.raises(HubError, match=rf"org/tiny/{SHARD1}: .*do not match the sha256.*deleted"):
        Checkpoint.open("org/tiny")
    assert not (cache_folder() / "blobs" / sha).exists()  # before the fix: kept, read, exit 0
    with Checkpoint.open("org/tiny") as ckpt:  # the retry downloads it anew
        assert torch.equal(first_q(ckpt), reference_q(model))


def test_corrupt_cached_blob_named_offline_deleted_online(
    hub: HubServer, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Checkpoint.open("org/tiny"):
        pass
    sha = hashlib.sha256((model / SHARD1).read_bytes()).hexdigest()
    blob = cache_folder() / "blobs" / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same name: only the bytes tell
    blob.write_bytes(bytes(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=rf"do not match.*delete {blob} and download it again"):
        Checkpoint.open("org/tiny")
    assert blob.exists()  # offline: named, not deleted (nothing could replace it)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubError, match=r"it was deleted, run again"):
        Checkpoint.open("org/tiny")
    with Checkpoint.open("org/tiny") as ckpt:
        assert torch.equal(first_q(ckpt), reference_q(model))


def test_streaming_verifies_each_shard(hub: HubServer, model: Path) -> None:
    hub.faults.append(Fault("corrupt", "corrupt", match=SHARD1, times=1))
    remote = HubRemote("org/tiny", None, Path(hf_constants.HF_HUB_CACHE))
    ckpt = Checkpoint.from_shards(streaming_shards("org/tiny", remote, disk_budget=10**8))
    with pytest.raises(HubError, match=r"do not match the sha256"):
        list(ckpt.read_many(ckpt.matrices()))
    assert not list((cache_folder() / "blobs").glob("*"))
    ckpt = Checkpoint.from_shards(streaming_shards("org/tiny", remote, disk_budget=10**8))
    got = dict(ckpt.read_many(ckpt.matrices(roles=["q"])))
    assert torch.equal(next(iter(got.values())), reference_q(model))
    assert (cache_folder() / "refs" / "main").read_text() == COMMIT


def test_transient_failures_are_retried(hub: HubServer, model: Path) -> None:
    hub.faults += [
        Fault("info", "status", status=500, times=1),
        Fault("tree", "status", status=503, times=1),
        Fault("resolve", "status", status=502, match=SHARD1, times=1),
        Fault("resolve", "cut", match="config.json", times=1),
    ]
    with Checkpoint.open("org/tiny") as ckpt:  # before the fix: the first 500 ended the run
        assert torch.equal(first_q(ckpt), reference_q(model))
    assert all(f.hits == 1 for f in hub.faults)


FAILURES = {
    # name: (faults, source, message)
    "404 repo": ([], "org/nope", r"org/nope: the repo does not exist .*check the repo id"),
    "404 revision": ([], "org/tiny@nope", r"revision does not exist.*check the revision"),
    "401": ([Fault("info", "status", status=401)], "org/tiny", r"HTTP 401.*check the token"),
    "403": ([Fault("info", "status", status=403)], "org/tiny", r"HTTP 403.*check the token"),
    "gated": (
        [Fault("info", "status", status=401, error_code="GatedRepo")],
        "org/tiny",
        r"the repo is gated.*accept its terms",
    ),
    "429": ([Fault("info", "status", status=429)], "org/tiny", r"HTTP 429\) after 3 tries"),
    "500": ([Fault("info", "status", status=500)], "org/tiny", r"HTTP 500\) after 3 tries.*retry"),
    "stall": (
        [Fault("info", "stall", seconds=10)],
        "org/tiny",
        r"no answer within 1 s after 3 tries.*HF_HUB_OFFLINE=1",
    ),
    "stall download": (
        [Fault("resolve", "stall-get", match=SHARD1, seconds=10)],
        "org/tiny",
        r"no answer within 1 s",
    ),
    "cut": (
        [Fault("resolve", "cut", match=SHARD1)],
        "org/tiny",
        r"connection to the Hub failed .*RemoteProtocolError",
    ),
    "redirect loop": (
        [Fault("info", "redirect-loop")],
        "org/tiny",
        r"redirects in a loop.*HF_ENDPOINT",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_network_failures_are_one_line_hub_errors(hub: HubServer, case: str) -> None:
    faults, source, message = FAILURES[case]
    hub.faults += faults
    t0 = time.monotonic()
    with pytest.raises(HubError, match=message) as info:
        Checkpoint.open(source)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600
    assert time.monotonic() - t0 < 60  # bounded: timeouts and a bounded number of tries


def test_unreachable_hub_is_a_hub_error(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{f}"
    )
    with pytest.raises(HubError, match=r"org/x: the connection to the Hub failed after 3 tries"):
        Checkpoint.open("org/x")


def test_cli_no_network_is_exit_2(tmp_path: Path) -> None:
    """Issue 14 case 7: before, `internal error: ConnectError` and exit 1."""
    env = cli_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    out = run_cli(["inspect", "org/x"], env, tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "internal error" not in out.stderr
    assert "org/x: the connection to the Hub failed" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0]


def test_cli_offline_after_online(tmp_path: Path, model: Path) -> None:
    """An online `report` downloads the repo; `inspect` then works offline with the server
    gone. (An online `inspect` reads only the headers, by ranged reads: it caches no shard.)"""
    with HubServer({"org/tiny": Repo(model)}) as server:
        env = cli_env(tmp_path, server.url)
        args = ["report", "org/tiny", "--out", "r", "--format", "json", "--no-cache", "-q"]
        online = run_cli([*args, "--device", "cpu"], env, tmp_path)
    assert online.returncode == 0, online.stderr
    env["HF_HUB_OFFLINE"] = "1"  # the server is gone
    offline = run_cli(["inspect", "org/tiny", "--json"], env, tmp_path)
    assert offline.returncode == 0, offline.stderr
    with Checkpoint.open(model) as ckpt:
        local = inventory(ckpt).to_dict()
    got = json.loads(offline.stdout)
    assert got["source"] == "org/tiny" and got["totals"] == local["totals"]
    assert [m["key"] for m in got["matrices"]] == [m["key"] for m in local["matrices"]]


def test_offline_hint_is_a_working_hf_download(tmp_path: Path, model: Path) -> None:
    """The command the offline error suggests fetches what spectra needs (before: `--include
    '*.safetensors' '*.json'`, which huggingface_hub 2.x's CLI does not read as two patterns)."""
    env = cli_env(tmp_path, "http://127.0.0.1:9")
    env["HF_HUB_OFFLINE"] = "1"
    first = run_cli(["inspect", "org/tiny"], env, tmp_path)
    assert first.returncode == 2
    hint = re.search(r"`(hf download [^`]*)`", first.stderr)
    assert hint, first.stderr
    assert hint.group(1) == "hf download org/tiny --include '*.safetensors' --include '*.json'"
    hf = Path(sys.executable).with_name("hf")
    with HubServer({"org/tiny": Repo(model)}) as server:
        online = dict(env, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0")
        got = subprocess.run(
            [str(hf), *shlex.split(hint.group(1))[1:]],
            env=online,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert got.returncode == 0, got.stderr
    again = run_cli(["inspect", "org/tiny", "--json"], env, tmp_path)  # offline, server gone
    assert again.returncode == 0, again.stderr


def test_verified_blobs_are_not_hashed_again_until_rewritten(
    hub: HubServer, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Checkpoint.open("org/tiny"):
        pass
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hashed: list[str] = []
    real_hash = hub_client.file_sha256

    def counting(path: Path) -> str:
        hashed.append(Path(path).name)
        return real_hash(path)

    monkeypatch.setattr(hub_client, "file_sha256", counting)
    hub_client._VERIFIED.clear()  # a new process: only the stamps remain
    with Checkpoint.open("org/tiny") as ckpt:
        assert torch.equal(first_q(ckpt), reference_q(model))
    assert hashed == []  # both shards' stamps matched: no re-hash of an unchanged blob
    blob = (cache_folder() / "snapshots" / COMMIT / SHARD1).resolve()
    blob.write_bytes(blob.read_bytes())  # same bytes, rewritten: the ctime moves
    with Checkpoint.open("org/tiny"):
        pass
    assert hashed == [SHARD1]
