"""Streaming a sharded Hub repo under a disk budget, against the loopback Hub server
(tests/_hub_server.py) and the real huggingface_hub client (issue 15 cases 4-5): a streamed
`report` downloads every shard once and stays under its budget on disk."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _hub_fixtures import cache_folder, hub_fixture  # noqa: F401 - the `hub` fixture
from _hub_server import HubServer
from _source_fixtures import write_llama_like

from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.sources.hub import HubOptions, HubRemote

pytestmark = pytest.mark.timeout(120)


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
    assert [lm.key for lm in streamed.layers] == [lm.key for lm in local.layers]
    for a, b in zip(streamed.layers, local.layers, strict=True):
        assert a.alpha == pytest.approx(b.alpha, rel=1e-9, abs=1e-12)
