"""`spectra mitigate` under torchrun (2 CPU ranks): the ranks split the matrices, rank 0 writes,
and the output equals a single process's bit for bit (checkpoint and adapter); a failing rank
stops the job with one error naming it, and nothing is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _compare_fixtures import base_and_ft, lora_and_merged
from _source_fixtures import write_sharded

from spectra.jobs.mitigate import REPORT_NAME, MitigateOptions, mitigate
from spectra.sources.checkpoint import Checkpoint

pytestmark = pytest.mark.timeout(300)
TORCHRUN = Path(sys.executable).with_name("torchrun")
SPLIT = ["--device", "cpu", "--threads", "1", "--lambda", "0.5"]


def _torchrun(args: list[str], cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.pop("SPECTRA_DIST_FAULT", None)
    if fault:
        env["SPECTRA_DIST_FAULT"] = fault
    env.update(SPECTRA_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "spectra", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The workers' thread count in this process (reproducibility contract)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(root: Path) -> tuple[Path, Path]:
    """compare's planted pair, in 3 shards: the two ranks' shares lie in different files."""
    base, ft, _ = base_and_ft()
    config = {"model_type": "llama"}
    dirs = []
    for name, tensors in (("base", base), ("ft", ft)):
        t32 = {k: v.to(torch.float32) for k, v in tensors.items()}
        dirs.append(write_sharded(root / name, t32, shards=3, config=config))
    return dirs[0], dirs[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.usefixtures("one_thread")
def test_split_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    b_dir, f_dir = _pair(tmp_path)
    (tmp_path / "inputs").mkdir()
    lora_base, adapter, _ = lora_and_merged(tmp_path / "inputs")
    for name, (b, f) in {"ckpt": (b_dir, f_dir), "lora": (lora_base, adapter)}.items():
        res = _torchrun(
            ["mitigate", str(b), str(f), "--out", str(tmp_path / name), *SPLIT], tmp_path
        )
        errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
        assert res.returncode == 0, errors[:6]
        assert res.stdout.count("wrote the mitigated") == 1  # rank 0 alone reports
        one = mitigate(b, f, tmp_path / f"one-{name}", MitigateOptions(lam=0.5, device="cpu"))
        assert one is not None and one.out is not None and one.changed
        got, want = _files(tmp_path / name), _files(one.out)
        assert sorted(got) == sorted(want)
        for file, data in want.items():
            if file == REPORT_NAME:  # the same rows; only the versions line may differ
                a, b_ = json.loads(got[file]), json.loads(data)
                assert {**a, "versions": None} == {**b_, "versions": None}
            else:
                assert got[file] == data, f"{name}: {file} differs from the one-process run"
    with Checkpoint.open(f_dir) as ck:
        assert len({m.tensor.shard for m in ck.matrices()}) == 3


def test_failing_rank_names_itself_and_nothing_is_written(tmp_path: Path) -> None:
    b_dir, f_dir = _pair(tmp_path)
    out = tmp_path / "out"
    res = _torchrun(
        ["mitigate", str(b_dir), str(f_dir), "--out", str(out), *SPLIT], tmp_path, "1:0:raise"
    )
    assert res.returncode != 0  # torchrun's own exit status for a failed child
    text = res.stdout + res.stderr
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, errors  # each rank: the same one line
    assert "1 of 2 rank(s) failed: rank 1" in errors[0]
    assert "failed on matrix 'model.layers." in errors[0] and "Nothing was written" in errors[0]
    assert "spectra/jobs" not in text  # no traceback of ours (torchrun prints its own)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
