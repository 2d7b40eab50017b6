"""`spectra mitigate` on Hub repo ids (the loopback Hub server, tests/_hub_server.py, and the real
huggingface_hub client): `--revision`/`--base-revision`, `--disk-budget` (each shard streamed
once), `--offline` after an online run, the commits in mitigation.json; and `--threads` on
`mitigate` and `plan`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _compare_fixtures import Q0, base_and_ft, lora_and_merged
from _hub_fixtures import (  # noqa: F401 - hub_fixture: the `hub` fixture
    TAG_COMMIT,
    hub_fixture,
)
from _hub_server import COMMIT, HubServer, Repo
from _source_fixtures import write_llama_like, write_sharded
from typer.testing import CliRunner

from spectra.cli.main import app
from spectra.jobs.mitigate import REPORT_NAME, MitigateOptions, mitigate
from spectra.sources.hub_options import HubOptions

pytestmark = pytest.mark.timeout(300)
runner = CliRunner()


def _checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    return write_sharded(
        folder,
        {k: v.to(torch.float32) for k, v in tensors.items()},
        shards=2,
        config={"model_type": "llama"},
    )


@pytest.fixture(name="model")
def model_fixture(tmp_path: Path) -> Path:
    """The base the `hub` fixture serves as org/tiny (compare's planted-intruder pair)."""
    base, _, _ = base_and_ft()
    return _checkpoint(tmp_path / "base", base)


@pytest.fixture(name="finetuned")
def finetuned_fixture(hub: HubServer, tmp_path: Path) -> Path:
    """The fine-tune, served as org/ft; its tag v1 names another commit (same files)."""
    _, ft, _ = base_and_ft()
    folder = _checkpoint(tmp_path / "ft", ft)
    hub.repos["org/ft"] = Repo(folder, refs={"v1": TAG_COMMIT, TAG_COMMIT: TAG_COMMIT})
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != REPORT_NAME
    }


def _bodies(server: HubServer, repo_folder: Path) -> list[str]:
    """Whole-file safetensors bodies the server sent of one repo's shards."""
    names = {p.name for p in repo_folder.glob("*.safetensors")}
    return sorted(n for n, rng, _ in server.served if rng is None and n in names)


def test_streamed_hub_mitigation_equals_the_local_one(
    hub: HubServer, model: Path, finetuned: Path, tmp_path: Path
) -> None:
    """Both sides streamed under a disk budget, FINETUNED at a tag: the same shards, index and
    config as the local run, each shard downloaded once, the resolved commits recorded."""
    budget = 2 * max(p.stat().st_size for p in finetuned.glob("*.safetensors"))
    options = MitigateOptions(
        lam=0.5,
        device="cpu",
        base_hub=HubOptions(disk_budget=budget),
        hub=HubOptions(revision="v1", disk_budget=budget),
    )
    streamed = mitigate("org/tiny", "org/ft", tmp_path / "hub-out", options)
    local_opts = MitigateOptions(lam=0.5, device="cpu")
    local = mitigate(model, finetuned, tmp_path / "local-out", local_opts)
    assert [m.key for m in streamed.changed] == [m.key for m in local.changed] == [Q0]
    assert streamed.out is not None and local.out is not None
    got, want = _files(streamed.out), _files(local.out)
    assert sorted(got) == sorted(want) and "config.json" in got
    assert all(got[name] == want[name] for name in want), "bytes differ from the local run"
    # both repos have the same two shard names: each shard of each side downloaded once
    shards = [p.name for p in finetuned.glob("*.safetensors")]
    assert _bodies(hub, finetuned) == sorted(shards * 2)
    report = json.loads((streamed.out / REPORT_NAME).read_text())
    assert report["commits"] == {"base": COMMIT, "finetuned": TAG_COMMIT}
    assert "commits" not in json.loads((local.out / REPORT_NAME).read_text())


def test_cli_offline_after_online(
    hub: HubServer, finetuned: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An online `mitigate` fills the Hub cache; with the server gone, `--offline` gives the
    same checkpoint (and without the cache, `--offline` is a one-line error)."""
    args = ["mitigate", "org/tiny", "org/ft", "--lambda", "0.5", "--device", "cpu"]
    online = runner.invoke(app, [*args, "--base-revision", "main", "--out", str(tmp_path / "a")])
    assert online.exit_code == 0, online.output
    hub.stop()
    offline = runner.invoke(app, [*args, "--offline", "--out", str(tmp_path / "b")])
    assert offline.exit_code == 0, offline.output
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert json.loads((tmp_path / "b" / REPORT_NAME).read_text())["commits"] == {
        "base": COMMIT,
        "finetuned": COMMIT,
    }
    uncached = runner.invoke(
        app, [*args, "--offline", "--revision", "v1", "--out", str(tmp_path / "c")]
    )
    assert uncached.exit_code == 2, uncached.output
    assert len(uncached.output.strip().splitlines()) == 1 and "org/ft" in uncached.output
    assert not (tmp_path / "c").exists()


def test_revision_of_a_local_adapter_is_a_one_line_error(tmp_path: Path) -> None:
    b_dir, adapter, _ = lora_and_merged(tmp_path)
    args = ["mitigate", str(b_dir), str(adapter), "--out", str(tmp_path / "o"), "--revision", "v1"]
    cli = runner.invoke(app, args)
    assert cli.exit_code == 2, cli.output
    assert "local adapter folder" in cli.output and len(cli.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SPECTRA_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_threads")
def test_threads_sets_torchs_thread_count(tmp_path: Path) -> None:
    """`--threads 2` on mitigate and plan: torch runs with 2 intra-op threads (the default is 1)."""
    b_dir, adapter, _ = lora_and_merged(tmp_path)
    torch.set_num_threads(1)
    mit = ["mitigate", str(b_dir), str(adapter), "--device", "cpu", "--threads", "2"]
    cli = runner.invoke(app, [*mit, "--out", str(tmp_path / "m")])
    assert cli.exit_code == 0, cli.output
    assert torch.get_num_threads() == 2
    cli = runner.invoke(app, [*mit[:-1], "1", "--out", str(tmp_path / "m1")])
    assert cli.exit_code == 0, cli.output
    assert torch.get_num_threads() == 1
    model = write_llama_like(tmp_path / "llama")
    plan = ["plan", str(model), "--for", "lisa", "--no-cache", "--device", "cpu", "-q"]
    cli = runner.invoke(app, [*plan, "--out", str(tmp_path / "p.json"), "--threads", "2"])
    assert cli.exit_code == 0, cli.output
    assert torch.get_num_threads() == 2
    cli = runner.invoke(app, [*plan, "--out", str(tmp_path / "q.json")])  # the default: 1
    assert cli.exit_code == 0, cli.output
    assert torch.get_num_threads() == 1
    bad = runner.invoke(app, [*plan, "--out", str(tmp_path / "r.json"), "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output
