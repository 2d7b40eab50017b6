from __future__ import annotations

from pathlib import Path

import pytest

from spectra.errors import OutputError
from spectra.outdir import MARKER, atomic_output_dir


def test_writes_complete_folder(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not out.exists()  # nothing under the final name until complete
    assert (out / "a.txt").read_text() == "x"
    assert (out / MARKER).exists()
    assert not [p for p in tmp_path.iterdir() if "spectra-tmp" in p.name]


def test_crash_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_refuses_user_folder_and_replaces_with_force(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not empty.*--force"), atomic_output_dir(out):
        pass
    assert (out / "thesis.tex").read_text() == "precious"
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]


def test_refuses_earlier_output_without_force(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputError, match="earlier spectra output"), atomic_output_dir(out):
        pass


@pytest.mark.parametrize(
    ("err", "words"),
    [(13, "permission denied"), (28, "disk full")],  # EACCES, ENOSPC
)
def test_os_errors_are_one_line_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, words: str
) -> None:
    import os

    out = tmp_path / "rep"
    with pytest.raises(OutputError, match=words), atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        raise OSError(err, os.strerror(err))
    assert list(tmp_path.iterdir()) == []

    def deny(*args: object, **kwargs: object) -> str:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr("tempfile.mkdtemp", deny)
    with pytest.raises(OutputError, match=words), atomic_output_dir(out):
        pass


def test_finished_folder_has_the_umask_mode_not_mkdtemp_private(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o027)
    try:
        with atomic_output_dir(tmp_path / "rep") as tmp:
            (tmp / "a.txt").write_text("x")
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # private while being written
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "rep").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o750


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _earlier_output(folder: Path, text: str) -> None:
    folder.mkdir()
    (folder / MARKER).write_text("")
    (folder / "old.txt").write_text(text)


def test_interrupted_replace_is_restored_by_the_next_run(tmp_path: Path) -> None:
    """Killed between the two renames: no final folder, the earlier one under `-old-<pid>`."""
    from spectra.outdir import recover_interrupted

    out = tmp_path / "rep"
    _earlier_output(tmp_path / f".rep.spectra-old-{_dead_pid()}", "earlier")
    partial = tmp_path / f".rep.spectra-tmp-{_dead_pid()}-abc"
    partial.mkdir()
    (partial / "half.bin").write_bytes(b"x")
    with pytest.raises(OutputError, match="earlier spectra output"):
        with atomic_output_dir(out):  # restored first, so refused without --force
            pass
    assert (out / "old.txt").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    assert recover_interrupted(out) == []  # idempotent


def test_stale_old_sibling_next_to_new_output_is_removed(tmp_path: Path) -> None:
    """Killed after the second rename: the new output is in place, the old one left over."""
    out = tmp_path / "rep"
    _earlier_output(out, "new")
    _earlier_output(tmp_path / f".rep.spectra-old-{_dead_pid()}", "earlier")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "newer.txt").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    assert (out / "newer.txt").read_text() == "y"


def test_siblings_of_a_live_process_are_left_alone(tmp_path: Path) -> None:
    """Another run in progress (its pid alive): its `-old-` and `-tmp-` folders stay."""
    import os

    from spectra.outdir import recover_interrupted

    live = os.getppid()
    _earlier_output(tmp_path / f".rep.spectra-old-{live}", "theirs")
    (tmp_path / f".rep.spectra-tmp-{live}-xyz").mkdir()
    assert recover_interrupted(tmp_path / "rep") == []
    assert len(list(tmp_path.iterdir())) == 2 and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("where", ["cwd", "parent-of-cwd", "git-repo", "home"])
def test_force_never_replaces_protected_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "thesis.tex").write_text("precious")
    target = work
    if where == "cwd":
        monkeypatch.chdir(work)
    elif where == "parent-of-cwd":
        monkeypatch.chdir(work / "sub")
    elif where == "git-repo":
        (work / ".git").mkdir()
    else:
        monkeypatch.setenv("HOME", str(work))
    with (
        pytest.raises(OutputError, match="even with --force"),
        atomic_output_dir(target, force=True),
    ):
        pass
    assert (work / "sub" / "thesis.tex").read_text() == "precious"


def test_force_still_replaces_an_ordinary_user_folder(tmp_path: Path) -> None:
    out = tmp_path / "old-results"
    out.mkdir()
    (out / "x.txt").write_text("x")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "y.txt").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "y.txt"]
