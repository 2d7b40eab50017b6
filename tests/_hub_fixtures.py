"""Fixtures for tests against the loopback Hub server (tests/_hub_server.py): a small sharded
model, the server with huggingface_hub (and so spectra) pointed at it and at a fresh cache, and
the helpers to run the CLI against it in a fresh process.

Import the fixtures a module uses (``from _hub_fixtures import hub_fixture, model_fixture``,
with ``# noqa: F401``): tests ask for them as ``hub`` and ``model``.
In-process tests point huggingface_hub at the server by patching the constants it read at import
(ENDPOINT and the resolve-URL template); the CLI tests set HF_ENDPOINT in a fresh process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _hub_server import COMMIT, HubServer, Repo
from _source_fixtures import write_llama_like
from huggingface_hub import constants as hf_constants

from spectra.sources import hub_client

TAG_COMMIT = "7a9000000000000000000000000000000000beef"
SHARD1 = "model-00001-of-00002.safetensors"


@pytest.fixture(name="model")
def model_fixture(tmp_path: Path) -> Path:
    src = write_llama_like(tmp_path / "src", shards=2)
    (src / "config.json").write_text(json.dumps({"hidden_size": 64}))
    return src


@pytest.fixture(name="hub")
def hub_fixture(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HubServer]:
    """The server, with huggingface_hub (and so spectra) pointed at it and at a fresh cache."""
    server = HubServer({"org/tiny": Repo(model, refs={"v1": COMMIT})})
    with server:
        cache = tmp_path / "hf-cache"
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
        monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 1)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(hub_client, "HUB_BACKOFF_S", 0.05)
        monkeypatch.chdir(tmp_path)
        yield server


def cache_folder(repo: str = "org/tiny") -> Path:
    return Path(hf_constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spectra", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,  # a fresh process imports torch: slow on a busy 2-core box
        check=False,
    )


def cli_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_CACHE=str(tmp_path / "cli-cache"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
    )
    return env
