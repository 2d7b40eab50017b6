from __future__ import annotations

from pathlib import Path

import pytest

from spectra.errors import OutputError
from spectra.export.outdir import MARKER, atomic_output_dir


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
