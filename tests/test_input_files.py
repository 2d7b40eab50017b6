"""Every input file is opened by one function (`spectra.formats.files.open_input`) that refuses
anything but a regular file and reads at most a stated number of bytes.

Issue 14, case 1: a `config.json` or `*.safetensors.index.json` that was a symlink to `/dev/zero`
grew spectra to 19 GB (size caps read `st_size`, 0 for a device), a FIFO in its place hung
forever. Each hostile file below must end in a `SpectraError` (or be ignored where the file is
only a hint) within a few seconds: the call runs in a thread joined with a timeout, so a
regression fails instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _source_fixtures import write_llama_like, write_lora_adapter, write_safetensors

from spectra.errors import SourceError, SpectraError
from spectra.formats.files import open_input, read_input, read_json_input, show_path

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "mkfifo") and Path("/dev/zero").exists()), reason="needs POSIX FIFOs"
)

TIMEOUT_S = 20.0


def within(fn: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    """`fn()` run in a daemon thread; its result or exception, or a failure after `timeout`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"still running after {timeout} s (a FIFO or device was read)")
    if "error" in box:
        return box["error"]
    return box.get("value")


def hostile(path: Path, kind: str) -> Path:
    """Put a FIFO, a /dev/zero symlink or a folder at `path` (replacing what was there)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    return path


KINDS = ("fifo", "zero", "folder")


def assert_refused(result: Any, words: str = "not a regular file") -> None:
    assert isinstance(result, SpectraError), f"expected a SpectraError, got {result!r}"
    line = str(result)
    assert "\n" not in line and words in line, line


# -- the function itself ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_open_input_refuses_non_regular_files(tmp_path: Path, kind: str) -> None:
    path = hostile(tmp_path / "config.json", kind)
    assert_refused(within(lambda: open_input(path, "config")))
    assert_refused(within(lambda: read_input(path, 1000, "config")))


def test_open_input_names_the_kind(tmp_path: Path) -> None:
    fifo = hostile(tmp_path / "a.json", "fifo")
    zero = hostile(tmp_path / "b.json", "zero")
    assert "FIFO" in str(within(lambda: open_input(fifo)))
    assert "character device" in str(within(lambda: open_input(zero)))


def test_read_input_reads_at_most_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(b"1" * 1001)
    assert read_input(path, 1001) == b"1" * 1001
    with pytest.raises(SourceError, match="more than the 1000 allowed"):
        read_input(path, 1000)


def test_read_json_input_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    for blob, words in (
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b"1" * 5000, "number too long"),
        (b"[" * 100_000 + b"]" * 100_000, "nesting too deep"),
    ):
        path.write_bytes(blob)
        with pytest.raises(SourceError, match=words) as info:
            read_json_input(path, "config")
        assert "\n" not in str(info.value)


def test_name_too_long_is_one_clipped_line(tmp_path: Path) -> None:
    long = tmp_path / ("x" * 5000 + ".json")
    with pytest.raises(SourceError) as info:
        open_input(long, "config")
    msg = str(info.value)
    assert "File name too long" in msg and len(msg) < 400, msg
    assert show_path("a" * 10) == "a" * 10 and len(show_path("a" * 10_000)) < 200


# -- every reader goes through it ---------------------------------------------------------------
@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_llama_like(tmp_path / "model", layers=1, hidden=8, intermediate=16, vocab=10)


def _open_catalog(folder: Path) -> Any:
    from spectra.sources.checkpoint import Checkpoint

    with Checkpoint.open(folder) as ckpt:
        return [t.name for t in ckpt.tensors()]


@pytest.mark.parametrize("kind", KINDS)
def test_index_named_or_globbed_is_refused(model: Path, kind: str) -> None:
    index = model / "model.safetensors.index.json"
    other = index.with_name("other.safetensors.index.json")
    index.rename(other)
    hostile(index, kind)
    assert_refused(within(lambda: _open_catalog(model)))
    index.unlink() if kind != "folder" else index.rmdir()
    other.unlink()
    hostile(other, kind)  # found by the glob, which never checked is_file()
    assert_refused(within(lambda: _open_catalog(model)))


@pytest.mark.parametrize("kind", KINDS)
def test_config_json_is_only_a_hint(model: Path, kind: str) -> None:
    from spectra.sources.checkpoint import Checkpoint
    from spectra.sources.layout import read_config

    hostile(model / "config.json", kind)
    shards = sorted(model.glob("*.safetensors"))
    assert within(lambda: read_config(shards)) == {}
    names = within(lambda: _open_catalog(model))
    assert isinstance(names, list) and names, names
    with Checkpoint.open(model) as ckpt:
        assert ckpt.tensors()


@pytest.mark.parametrize("kind", ("fifo", "zero"))
def test_shard_named_by_the_index_is_refused(model: Path, kind: str) -> None:
    shard = sorted(model.glob("*.safetensors"))[0]
    hostile(shard, kind)
    assert isinstance(within(lambda: _open_catalog(model)), SourceError)


@pytest.mark.parametrize("kind", ("fifo", "zero"))
def test_shard_replaced_after_opening_is_refused(model: Path, kind: str) -> None:
    from spectra.sources.checkpoint import Checkpoint

    with Checkpoint.open(model) as ckpt:
        mats = list(ckpt.matrices())
        for shard in sorted(model.glob("*.safetensors")):
            hostile(shard, kind)
        assert_refused(within(lambda: ckpt.read(mats[0].key)))


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return write_lora_adapter(tmp_path / "adapter", {"model.layers.0.q.weight": (8, 8)})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ("adapter_config.json", "adapter_model.safetensors"))
def test_adapter_files_are_refused(adapter: Path, kind: str, name: str) -> None:
    from spectra.sources.adapters import LoraAdapter

    hostile(adapter / name, kind)
    assert_refused(within(lambda: LoraAdapter.open(adapter)))


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_is_refused(tmp_path: Path, kind: str) -> None:
    from spectra.export.manifest import read_manifest

    hostile(tmp_path / "spectra.json", kind)
    assert_refused(within(lambda: read_manifest(tmp_path)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ("calib.txt", "calib.jsonl"))
def test_calibration_file_is_refused(tmp_path: Path, kind: str, name: str) -> None:
    from spectra.adapt.calib_data import load_texts

    path = hostile(tmp_path / name, kind)
    assert_refused(within(lambda: load_texts(str(path))))


@pytest.mark.parametrize("kind", KINDS)
def test_statistics_file_is_refused(tmp_path: Path, kind: str) -> None:
    from spectra.adapt.stats import load_stats

    path = hostile(tmp_path / "stats.safetensors", kind)
    assert_refused(within(lambda: load_stats(path)))


@pytest.mark.parametrize("kind", KINDS)
def test_analysis_json_is_refused(tmp_path: Path, kind: str) -> None:
    from spectra.analysis.results import Analysis

    path = hostile(tmp_path / "analysis.json", kind)
    assert_refused(within(lambda: Analysis.from_json(path)))


def test_index_that_is_too_big_is_refused_without_reading_it(model: Path) -> None:
    from spectra.formats.safetensors import MAX_HEADER_BYTES

    index = model / "model.safetensors.index.json"
    with index.open("r+b") as fh:  # sparse: claims 100 MB + 1, holds a few KB
        fh.truncate(MAX_HEADER_BYTES + 1)
    result = within(lambda: _open_catalog(model))
    assert isinstance(result, SourceError) and "more than the" in str(result), result


def test_cli_inspect_on_a_fifo_index_exits_2(model: Path) -> None:
    from typer.testing import CliRunner

    from spectra.cli.main import app

    hostile(model / "model.safetensors.index.json", "fifo")
    result = within(lambda: CliRunner().invoke(app, ["inspect", str(model)]))
    assert result.exit_code == 2, result.output
    assert "FIFO" in result.output


def test_regular_inputs_still_read(model: Path, tmp_path: Path) -> None:
    names = _open_catalog(model)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    write_safetensors(tmp_path / "one.safetensors", {"w": torch.ones(2, 2)})
    assert _open_catalog(tmp_path / "one.safetensors") == ["w"]
    assert json.loads(read_input(model / "config.json", 10_000))["model_type"] == "llama"


@pytest.mark.parametrize("kind", ("fifo", "zero"))
def test_calibration_model_files_are_checked_before_transformers(model: Path, kind: str) -> None:
    pytest.importorskip("transformers")
    from spectra.adapt.calib_model import load_model

    hostile(model / "config.json", kind)
    assert_refused(within(lambda: load_model(model, device="cpu")))


# -- claims a sparse file backs: refused before the allocator ----------------------------------
def _sparse_safetensors(
    path: Path, real: dict[str, torch.Tensor], claim: tuple[str, int, int]
) -> Path:
    """`real` tensors (F32) followed by `claim` = (name, m, n) of BF16 whose bytes are a hole:
    the file is as long as the header says, so every range check passes."""
    import struct

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, pos = [], 0
    for name, t in real.items():
        data = t.to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [pos, pos + len(data)],
        }
        blobs.append(data)
        pos += len(data)
    name, m, n = claim
    header[name] = {"dtype": "BF16", "shape": [m, n], "data_offsets": [pos, pos + 2 * m * n]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
        try:
            fh.truncate(8 + len(raw) + pos + 2 * m * n)
        except OSError as exc:  # a file system without large sparse files
            pytest.skip(f"cannot make a sparse file: {exc}")
    return path


def test_terabyte_matrix_in_a_sparse_file_is_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: a header claiming a 10^12-element matrix in a 2 TB sparse file passed every
    range check and reached the allocator after a MemoryBudgetWarning: MemoryError, exit 1."""
    import tracemalloc

    from spectra import AnalyzeOptions, analyze

    monkeypatch.setattr("spectra.device.host_memory_bytes", lambda: 64 * 2**30)
    path = _sparse_safetensors(
        tmp_path / "model.safetensors", {}, ("model.layers.0.self_attn.q_proj.weight", 10**6, 10**6)
    )
    tracemalloc.start()
    try:
        result = within(lambda: analyze(str(path), AnalyzeOptions(), cache=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, SourceError), result
    assert "more than half of this machine's 64.0 GiB" in str(result), result
    assert peak < 64 * 2**20, peak


def test_terabyte_tensor_read_is_refused_by_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spectra.sources.checkpoint import Checkpoint

    monkeypatch.setattr("spectra.device.host_memory_bytes", lambda: 64 * 2**30)
    path = _sparse_safetensors(tmp_path / "m.safetensors", {}, ("w", 10**6, 10**6))
    with Checkpoint.open(path) as ckpt:
        with pytest.raises(SourceError, match="in memory at once"):
            ckpt.read("w")


def test_cli_report_on_a_terabyte_claim_exits_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spectra.cli.main import app

    path = _sparse_safetensors(
        tmp_path / "model.safetensors", {}, ("model.layers.0.self_attn.q_proj.weight", 10**6, 10**6)
    )
    out = tmp_path / "out"
    result = within(
        lambda: CliRunner().invoke(app, ["report", str(path), "--out", str(out), "--no-cache"])
    )
    assert result.exit_code == 2, result.output
    assert "in memory at once" in result.output and "internal error" not in result.output


def _hostile_adapter(folder: Path, claim_bytes: int) -> Path:
    write_lora_adapter(folder, {"model.layers.0.q.weight": (8, 8)})
    from safetensors.torch import load_file

    real = load_file(str(folder / "adapter_model.safetensors"))
    cols = 32768
    _sparse_safetensors(
        folder / "adapter_model.safetensors",
        real,
        ("base_model.model.lm_head.weight", claim_bytes // (2 * cols), cols),
    )
    return folder


def test_adapter_claiming_8_gb_of_extra_tensors_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: `convert` loaded every non-LoRA tensor of the trained adapter whole: an 8 GB
    claim in a sparse file was read into memory."""
    import tracemalloc

    from spectra.formats.peft import read_peft_adapter
    from spectra.jobs.convert import convert_to_lora

    monkeypatch.setattr("spectra.device.host_memory_bytes", lambda: 16 * 2**30)
    init = write_lora_adapter(tmp_path / "init", {"model.layers.0.q.weight": (8, 8)})
    trained = _hostile_adapter(tmp_path / "trained", 8 * 2**30)
    tracemalloc.start()
    try:
        with pytest.raises(SourceError, match="more than half of this machine"):
            read_peft_adapter(trained)
        with pytest.raises(SourceError, match="more than half of this machine"):
            convert_to_lora(init, trained, tmp_path / "out", base="base")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak
    assert not (tmp_path / "out").exists()
    # the same adapter with a real (small) extra tensor is read
    small = _hostile_adapter(tmp_path / "small", 2 * 32768 * 4)
    assert "base_model.model.lm_head.weight" in read_peft_adapter(small).other
