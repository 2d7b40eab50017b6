"""Output safety: killed writers, corrupted cache entries, disk full and permission denied.

- SIGKILL of a child process writing a large output folder (or cache entries) at seeded event
  points of its work (tests/_kill_points.py: the child pauses at the event and is killed there,
  whatever the machine's load): the final folder either does not exist or is complete; a cache
  entry is either absent or exactly what was stored.
- Bytes of cache files truncated or flipped: `get` detects it, reports it, removes the entry,
  and the value is recomputed and stored again.
- ENOSPC / EACCES while writing or renaming: one-line `OutputError` / `CacheError`, nothing
  partial left.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from _fuzz_helpers import FUZZ
from _kill_points import HOOKS, Run, run_to_event
from hypothesis import given
from hypothesis import strategies as st

from spectra.errors import CacheError, OutputError
from spectra.linalg.cache import CACHE_FORMAT, CacheCorruptionWarning, SpectrumCache
from spectra.linalg.spectrum import Spectrum
from spectra.outdir import MARKER, atomic_output_dir, check_output_dir

REPO = Path(__file__).resolve().parents[1]
FILES, CHUNK = 24, 1 << 20


def _content(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (CHUNK // 32)


# Announces two events per file (before it, and between its halves); the hooks add the marker
# file and the renames of atomic_output_dir.
_WRITER = HOOKS + textwrap.dedent(
    """
    import sys, hashlib
    from pathlib import Path
    from spectra.outdir import atomic_output_dir
    out, files, chunk, force = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    with atomic_output_dir(out, force=force) as tmp:
        for i in range(files):
            data = hashlib.sha256(str(i).encode()).digest() * (chunk // 32)
            event("file", i)
            with open(tmp / f"part-{i:03d}.bin", "wb") as fh:
                fh.write(data[: chunk // 2])
                fh.flush()
                event("half", i)
                fh.write(data[chunk // 2 :])
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _write(out: Path, at: str, *, force: bool = False) -> Run:
    """Run the writer into `out`, killed at event `at` ("record": not killed)."""
    return run_to_event(
        _WRITER, [str(out), str(FILES), str(CHUNK), "1" if force else "0"], at, _env()
    )


def _complete(folder: Path) -> bool:
    names = sorted(p.name for p in folder.iterdir())
    want = sorted([MARKER] + [f"part-{i:03d}.bin" for i in range(FILES)])
    if names != want:
        return False
    return all((folder / f"part-{i:03d}.bin").read_bytes() == _content(i) for i in range(FILES))


def test_sigkill_never_leaves_a_partial_output_folder(tmp_path: Path) -> None:
    record = _write(tmp_path / "full", "record")
    assert _complete(tmp_path / "full")
    events = len(record.lines)  # 2 per file, the marker file, the rename into place
    assert events == 2 * FILES + 2, record.lines
    rng = random.Random(1234)
    for it in range(5):
        out = tmp_path / f"out{it}"
        run = _write(out, f"any:{rng.randrange(events)}")
        assert run.killed and run.lines, it
        assert not out.exists() or _complete(out), f"iteration {it} ({run.lines[-1]}): partial"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{it}.")]
        assert all("spectra-tmp" in n for n in leftovers), leftovers


def test_sigkill_during_forced_replace_keeps_old_or_new(tmp_path: Path) -> None:
    """With --force over an earlier output: afterwards the final folder is the old one, the new
    complete one, or (killed between the two renames) absent with the old one kept as a sibling.
    The last kill lands in that two-rename window, the others at seeded events."""

    def old_output(folder: Path) -> None:
        with atomic_output_dir(folder, force=True) as tmp:
            (tmp / "old.txt").write_text("old")

    def is_old(folder: Path) -> bool:
        return sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "old.txt"])

    old_output(tmp_path / "rec")
    record = _write(tmp_path / "rec", "record", force=True)
    events = len(record.lines)  # 2 per file, the marker file, old folder away, new one in
    assert events == 2 * FILES + 3 and _complete(tmp_path / "rec"), record.lines
    rng = random.Random(99)
    out = tmp_path / "out"
    for it in range(4):
        old_output(out)
        run = _write(out, "swap:1" if it == 3 else f"any:{rng.randrange(events)}", force=True)
        assert run.killed, it
        if out.exists():
            assert is_old(out) or _complete(out), f"iteration {it} ({run.lines[-1]}): mixed"
        else:
            olds = list(tmp_path.glob(".out.spectra-old-*"))
            assert olds and (olds[0] / "old.txt").read_text() == "old"
        # the next run recovers by itself: the earlier output is back under its name, no
        # sibling of the killed run is left
        check_output_dir(out, force=True)
        assert out.is_dir() and not list(tmp_path.glob(".out.spectra-*")), it
        assert is_old(out) or _complete(out), it


# -- cache ------------------------------------------------------------------------------------
def _spectrum(i: int, n: int = 256) -> Spectrum:
    g = torch.Generator().manual_seed(i)
    values = torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values
    U = torch.randn(n, 32, generator=g, dtype=torch.float64)
    return Spectrum(values=values, U=U, Vh=None, method="svd", shape=(n, n), params={"i": i})


_CACHER = HOOKS + textwrap.dedent(
    """
    import sys, torch
    from spectra.linalg.cache import SpectrumCache
    from spectra.linalg.spectrum import Spectrum
    cache = SpectrumCache(sys.argv[1])
    for i in range(int(sys.argv[2])):
        g = torch.Generator().manual_seed(i)
        v = torch.rand(256, generator=g, dtype=torch.float64).sort(descending=True).values
        U = torch.randn(256, 32, generator=g, dtype=torch.float64)
        s = Spectrum(values=v, U=U, Vh=None, method="svd", shape=(256, 256), params={"i": i})
        cache.put(cache.entry_key(f"k{i}", {"m": 1}), s)
    """
)


def _same(a: Spectrum, b: Spectrum) -> bool:
    return (
        torch.equal(a.values, b.values)
        and a.U is not None
        and b.U is not None
        and torch.equal(a.U, b.U)
        and a.shape == b.shape
        and a.params == b.params
    )


def test_sigkill_never_leaves_a_servable_bad_cache_entry(tmp_path: Path) -> None:
    """Killed before a seeded commit: of an entry's payload (the earlier entries complete) or of
    its JSON (payload committed, entry not): every entry reads back absent or exact."""
    rng = random.Random(7)
    n = 200
    for it in range(3):
        root = tmp_path / f"c{it}"
        at = f"cache:{rng.randrange(2 * n)}"  # two commits per entry: payload, then JSON
        run = run_to_event(_CACHER, [str(root), str(n)], at, _env(), cache=root)
        assert run.killed, (it, at)
        cache = SpectrumCache(root, on_corrupt=lambda msg: None)
        for i in range(n):
            got = cache.get(cache.entry_key(f"k{i}", {"m": 1}))
            assert got is None or _same(got, _spectrum(i)), f"iteration {it}: entry {i} wrong"


MUTATION = st.sampled_from(["truncate", "flip", "empty", "delete"])


@FUZZ
@given(
    target=st.sampled_from(["payload", "json"]),
    kind=MUTATION,
    pos=st.floats(0, 1),
    bit=st.integers(0, 7),
)
def test_corrupted_cache_entry_is_detected_and_recomputed(
    tmp_path_factory: pytest.TempPathFactory, target: str, kind: str, pos: float, bit: int
) -> None:
    root = tmp_path_factory.mktemp("cache")
    cache = SpectrumCache(root)
    key = cache.entry_key("content", {"mode": "full"})
    cache.put(key, _spectrum(1))
    json_file = next(root.glob(f"v{CACHE_FORMAT}/entries/*/*.json"))
    payload = next(root.glob(f"v{CACHE_FORMAT}/entries/*/*.safetensors"))
    victim = payload if target == "payload" else json_file
    data = victim.read_bytes()
    at = min(int(pos * len(data)), len(data) - 1)
    if kind == "truncate":
        victim.write_bytes(data[:at])
    elif kind == "flip":
        b = bytearray(data)
        b[at] ^= 1 << bit
        victim.write_bytes(bytes(b))
    elif kind == "empty":
        victim.write_bytes(b"")
    else:
        victim.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cache.get(key)
    if got is not None:
        # every byte of both files is covered by a checksum (the JSON's whitespace and key order
        # are not: a flip there that still parses to the same metadata is harmless); anything
        # served must be exact
        assert _same(got, _spectrum(1)), f"served a corrupted entry ({target}, {kind}, {at})"
        return
    if not (kind == "delete" and target == "json"):
        assert any(issubclass(w.category, CacheCorruptionWarning) for w in caught)
        assert not json_file.exists(), "a corrupted entry must be removed"
    cache.put(key, _spectrum(1))
    again = cache.get(key)
    assert again is not None and _same(again, _spectrum(1))


@pytest.mark.parametrize(
    ("old", "new"),
    [("[256, 256]", "[256, 257]"), ('"i": 1', '"i": 7'), ('"svd"', '"gram64"')],
)
def test_edited_cache_metadata_is_not_served(tmp_path: Path, old: str, new: str) -> None:
    """A changed digit of shape/params or a changed method is caught by the metadata checksum."""
    messages: list[str] = []
    cache = SpectrumCache(tmp_path, on_corrupt=messages.append)
    key = cache.entry_key("content", {"mode": "full"})
    cache.put(key, _spectrum(1))
    json_file = next(tmp_path.glob(f"v{CACHE_FORMAT}/entries/*/*.json"))
    text = json_file.read_text()
    assert old in text
    json_file.write_text(text.replace(old, new))
    assert cache.get(key) is None
    assert len(messages) == 1 and "metadata checksum mismatch" in messages[0]
    assert not json_file.exists()


def test_non_utf8_cache_json_is_treated_as_corrupt(tmp_path: Path) -> None:
    cache = SpectrumCache(tmp_path, on_corrupt=lambda msg: None)
    key = cache.entry_key("content", {"mode": "full"})
    cache.put(key, _spectrum(1))
    json_file = next(tmp_path.glob(f"v{CACHE_FORMAT}/entries/*/*.json"))
    json_file.write_bytes(b"\xfb" + json_file.read_bytes()[1:])
    assert cache.get(key) is None
    assert not json_file.exists()
    cache.put(key, _spectrum(1))
    again = cache.get(key)
    assert again is not None and _same(again, _spectrum(1))


# -- disk full, permission denied -------------------------------------------------------------
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_failure_mid_write_is_one_line_and_leaves_nothing(tmp_path: Path, err: int) -> None:
    out = tmp_path / "rep"
    with pytest.raises(OutputError) as info, atomic_output_dir(out) as tmp:
        with (tmp / "big.bin").open("wb") as fh:
            fh.write(b"x" * 100_000)
            raise OSError(err, os.strerror(err), str(tmp / "big.bin"))
    msg = str(info.value)
    assert "\n" not in msg and str(out) in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_failure_at_rename_keeps_the_earlier_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, exchange: bool
) -> None:
    """A forced replacement whose swap fails keeps the earlier output: with RENAME_EXCHANGE (the
    exchange fails) and with the two-rename fallback (the earlier output moved aside, the new one
    fails to move in)."""
    import spectra.outdir as outdir

    out = tmp_path / "rep"
    with atomic_output_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    real_noreplace = outdir._rename_noreplace
    calls = []

    def flaky(src: Path, dst: Path) -> None:
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the first call finds the earlier output there
            raise OSError(err, os.strerror(err))
        real_noreplace(src, dst)

    def exchange_fails(a: Path, b: Path) -> bool:
        raise OSError(err, os.strerror(err))

    if exchange:
        monkeypatch.setattr(outdir, "_exchange", exchange_fails)
    else:
        monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
        monkeypatch.setattr(outdir, "_rename_noreplace", flaky)
    with pytest.raises(OutputError), atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_cache_write_failure_is_a_cache_error_without_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    cache = SpectrumCache(tmp_path)
    key = cache.entry_key("content", {"mode": "full"})

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(CacheError) as info:
        cache.put(key, _spectrum(2))
    monkeypatch.undo()
    assert "\n" not in str(info.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert cache.get(key) is None


# -- checkpoint strings in terminal output --------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
TERMINAL_NAMES = (
    "model.layers.0.\x1b[31mred\x1b[0m.q_proj.weight",
    "model.layers.0.\x1b]8;;http://evil/\x07link.k_proj.weight",
    "model.layers.0.[bold]markup[/bold].v_proj.weight",
    "model.layers.0.<script>alert(1)</script>.o_proj.weight",
)


def _hostile_checkpoint(folder: Path) -> Path:
    from _source_fixtures import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(16, 16, generator=g) for n in TERMINAL_NAMES}
    meta = {"note": "\x1b[2J\x1b[H cleared", "<b>": "</b>"}
    return write_safetensors(folder / "model.safetensors", tensors, metadata=meta)


def test_inspect_prints_hostile_names_inert(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spectra.cli.main import app

    path = _hostile_checkpoint(tmp_path)
    for args in (["inspect", str(path)], ["inspect", str(path), "--json"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert not _CONTROL.search(result.output.replace("\n", "")), repr(result.output)
    as_json = CliRunner().invoke(app, ["inspect", str(path), "--json"]).output
    assert "[bold]markup[/bold]" in as_json and "\\u001b[31mred" in as_json


def test_error_line_with_hostile_file_name_is_inert(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spectra.cli.main import app

    shard = tmp_path / "m" / "model-\x1b]0;pwned\x07\x1b[31m.safetensors"
    shard.parent.mkdir()
    shard.write_bytes(b"\x01\x00")  # truncated: the error message names the file
    result = CliRunner().invoke(app, ["inspect", str(shard.parent)])
    assert result.exit_code == 2
    assert not _CONTROL.search(result.output.replace("\n", "")), repr(result.output)
    assert "pwned" not in result.output  # the OSC title payload goes with its sequence
    assert result.output.count("\n") == 1 and "model-" in result.output


def test_side_files_never_copy_from_outside_the_checkpoint(tmp_path: Path) -> None:
    from spectra.export.residual import copy_side_files

    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    src, dst = tmp_path / "ckpt", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    (src / "config.json").write_text("{}")
    (src / "notes.txt").symlink_to(secret)
    copy_side_files(src, dst, [])
    copied = [p.read_text() for p in dst.rglob("*") if p.is_file()]
    assert "private key" not in copied


def test_report_on_a_lone_surrogate_name_is_one_line_exit_2(tmp_path: Path) -> None:
    """Such a name used to crash the PNG plots with an internal error (exit 1); the sources now
    refuse it as the reference reader does."""
    import json
    import struct

    from typer.testing import CliRunner

    from spectra.cli.main import app

    header = json.dumps(
        {
            "model.layers.0.\ud800.q_proj.weight": {
                "dtype": "F32",
                "shape": [2, 2],
                "data_offsets": [0, 16],
            }
        }
    ).encode()
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 2, result.output
    assert "not valid Unicode" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """`spectra report` (CliRunner, stdout and stderr together) on escape/formula names."""
    from _source_fixtures import write_safetensors
    from typer.testing import CliRunner

    from spectra.cli.main import app

    root = tmp_path_factory.mktemp("hostile-report")
    g = torch.Generator().manual_seed(0)
    names = (
        "model.layers.0.\x1b[31mred\x1b[0m.q_proj.weight",
        '=HYPERLINK("http://evil").k_proj.weight',
    )
    ckpt = write_safetensors(
        root / "ck" / "model.safetensors", {n: torch.randn(24, 24, generator=g) for n in names}
    )
    out = root / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(
            app, ["report", str(ckpt.parent), "--out", str(out), "--no-cache", "--device", "cpu"]
        )
    assert result.exit_code == 0, result.output
    # outside pytest, warnings are printed to stderr: count them as terminal output
    return result.output + "".join(f"{w.message}\n" for w in caught), out


def test_report_terminal_output_has_no_raw_escape(hostile_report: tuple[str, Path]) -> None:
    output, _ = hostile_report
    assert "\x1b" not in output, repr(output)


def test_report_csv_is_inert(hostile_report: tuple[str, Path]) -> None:
    _, out = hostile_report
    text = (out / "metrics.csv").read_text()
    assert "\x1b" not in text
    assert not any(
        cell.startswith(("=", "+", "@")) for line in text.splitlines() for cell in line.split(",")
    )
