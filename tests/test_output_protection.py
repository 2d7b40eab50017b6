"""Which folders an output may replace (issue 14, cases 2 and 3).

Case 2: `--force` never replaces a system folder, a parent of the home folder, a source of the
run (the checkpoint itself, a folder holding it), a cache folder, or a folder holding a git
repository or files tracked by the repository around it; it still replaces ordinary output
folders, also inside a source folder or a repository (untracked).

Case 3: a folder created at `--out` while a run works is never removed without `--force`: the
rule is re-checked at the swap, which is atomic (RENAME_NOREPLACE / RENAME_EXCHANGE). These are
logic tests: the folder is created from a progress callback or a hook mid-run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _adapt_fixtures import one_thread  # noqa: F401
from _source_fixtures import write_llama_like
from typer.testing import CliRunner

import spectra.outdir as outdir
from spectra.cli.main import app
from spectra.errors import OutputError
from spectra.jobs.init import InitOptions, init_adapter
from spectra.outdir import MARKER, atomic_output_dir, check_output_dir, replace_refusal

runner = CliRunner()


def _precious(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "precious.txt").write_text("keep me")
    return folder


def _kept(folder: Path) -> bool:
    return (folder / "precious.txt").read_text() == "keep me"


# -- case 2: the one rule --------------------------------------------------------------------
@pytest.mark.parametrize(
    "folder",
    ["/", "/etc", "/usr", "/tmp", "/home", "/var", "/var/log", "/var/tmp", "/usr/lib", "/opt",
     "/root", "/srv", "/boot", "/lib64", "/mnt", "/data"],
)  # fmt: skip
def test_system_folders_are_never_replaced(folder: str) -> None:
    """Only checked (check_output_dir removes nothing): /etc, /usr, /tmp, /home, /var/log, ...
    and any top-level folder are refused even with --force."""
    assert replace_refusal(Path(folder)) is not None, folder
    if Path(folder).is_dir() and any(Path(folder).iterdir()):
        with pytest.raises(OutputError, match="even with --force"):
            check_output_dir(Path(folder), force=True)


def test_the_temp_folder_is_never_replaced_but_its_children_are(tmp_path: Path) -> None:
    import tempfile

    assert replace_refusal(Path(tempfile.gettempdir())) is not None
    assert replace_refusal(_precious(tmp_path / "out")) is None


def test_parents_of_home_are_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "users" / "alice"
    _precious(home)
    monkeypatch.setenv("HOME", str(home))
    for target in (home, home.parent, tmp_path):
        with pytest.raises(OutputError, match="home folder or one of its parents"):
            with atomic_output_dir(target, force=True):
                pass
    assert _kept(home)


def _model(tmp_path: Path) -> Path:
    return write_llama_like(tmp_path / "m", layers=1, hidden=32, intermediate=64, vocab=50)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_report_never_replaces_its_source_or_a_folder_holding_it(tmp_path: Path) -> None:
    """Before: `spectra report m --out m --force` exited 0 and deleted the model."""
    model = _model(tmp_path)
    before = _files(model)
    for out in (model, tmp_path):
        res = runner.invoke(
            app, ["report", str(model), "--out", str(out), "--force", "--no-cache", "-q"]
        )
        assert res.exit_code == 2, res.output
        assert "even with --force" in res.output and "an input or the cache" in res.output
    assert _files(model) == before


def test_report_still_writes_and_replaces_an_output_inside_the_source(tmp_path: Path) -> None:
    model = _model(tmp_path)
    out = model / "report"
    args = ["report", str(model), "--out", str(out), "--no-cache", "-q", "--format", "json"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert (out / "metrics.json").is_file()


def test_report_never_replaces_its_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tmp_path)
    cache = _precious(tmp_path / "cache")
    res = runner.invoke(
        app,
        ["report", str(model), "--out", str(cache), "--cache-dir", str(cache), "--force", "-q"],
    )
    assert res.exit_code == 2 and "even with --force" in res.output, res.output
    assert _kept(cache)
    # the caches the environment names are protected for every writer, flags or not
    env_cache = _precious(tmp_path / "spectra-cache")
    monkeypatch.setenv("SPECTRA_CACHE_DIR", str(env_cache))
    with pytest.raises(OutputError, match="cache folder"), atomic_output_dir(env_cache, force=True):
        pass
    assert _kept(env_cache)


def test_compare_never_replaces_either_source(tmp_path: Path) -> None:
    base = _model(tmp_path)
    tuned = write_llama_like(tmp_path / "t", layers=1, hidden=32, intermediate=64, vocab=50, seed=1)
    before = _files(tuned)
    res = runner.invoke(app, ["compare", str(base), str(tuned), "--out", str(tuned), "--force"])
    assert res.exit_code == 2 and "even with --force" in res.output, res.output
    assert _files(tuned) == before


def test_init_never_replaces_its_source(tmp_path: Path) -> None:
    model = _model(tmp_path)
    before = _files(model)
    with pytest.raises(OutputError, match="even with --force.*an input"):
        init_adapter(model, InitOptions(out=model, rank=2, targets="q", force=True))
    assert _files(model) == before


def test_convert_never_replaces_its_inputs(tmp_path: Path) -> None:
    from spectra.jobs.convert import convert_to_lora

    model = _model(tmp_path)
    res = init_adapter(model, InitOptions(out=tmp_path / "init", rank=2, targets="q"))
    trained = tmp_path / "trained"
    shutil.copytree(res.adapter_dir, trained)
    for out in (tmp_path / "init", trained):
        before = _files(out)
        with pytest.raises(OutputError, match="even with --force"):
            convert_to_lora(tmp_path / "init", trained, out, force=True)
        assert _files(out) == before


def _git(repo: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_tracked_folders_are_never_replaced_ignored_ones_are(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _precious(repo / "src")
    _precious(repo / "demo-report")
    (repo / ".gitignore").write_text("demo-report/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    with pytest.raises(OutputError, match="tracked by the git repository"):
        with atomic_output_dir(repo / "src", force=True):
            pass
    assert _kept(repo / "src")
    with atomic_output_dir(repo / "demo-report", force=True) as tmp:  # ignored: a user output
        (tmp / "new.txt").write_text("new")
    assert (repo / "demo-report" / "new.txt").is_file()
    # a folder holding a repository anywhere below it
    with pytest.raises(OutputError, match="holds a git repository"):
        with atomic_output_dir(tmp_path, force=True):
            pass
    assert _kept(repo / "src")


def test_a_spectra_made_folder_is_still_checked_by_the_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker does not exempt a folder: a spectra output used as a source stays."""
    model = _model(tmp_path)
    (model / MARKER).write_text("")
    with pytest.raises(OutputError, match="an input"):
        with atomic_output_dir(model, force=True, protect=[model]):
            pass
    assert (model / "config.json").is_file()


# -- case 3: re-checked at the swap, atomically ----------------------------------------------
def _no_siblings(out: Path) -> bool:
    return not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.spectra-")]


def test_init_never_removes_a_folder_created_at_out_while_it_runs(tmp_path: Path) -> None:
    """Before: init renamed the folder aside and deleted it (no --force)."""
    model = _model(tmp_path)
    out = tmp_path / "out"

    def appear(done: int, total: int, key: str) -> None:
        if not out.exists():
            _precious(out)

    with pytest.raises(OutputError) as info:
        init_adapter(model, InitOptions(out=out, rank=2, targets="q,v"), progress=appear)
    msg = str(info.value)
    assert "\n" not in msg and "created while spectra ran" in msg and "--force" in msg
    assert _kept(out) and sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert _no_siblings(out)


def test_init_with_force_rechecks_a_folder_created_while_it_runs(tmp_path: Path) -> None:
    """With --force the folder found at the swap is checked by the rule: a repository is kept."""
    model = _model(tmp_path)
    out = tmp_path / "out"

    def appear(done: int, total: int, key: str) -> None:
        if not out.exists():
            _precious(out)
            (out / ".git").mkdir()

    with pytest.raises(OutputError, match="even with --force.*git"):
        init_adapter(model, InitOptions(out=out, rank=2, targets="q", force=True), progress=appear)
    assert _kept(out) and _no_siblings(out)


def test_convert_never_removes_a_folder_created_at_out_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spectra.jobs.convert as convert_job

    model = _model(tmp_path)
    res = init_adapter(model, InitOptions(out=tmp_path / "init", rank=2, targets="q"))
    out = tmp_path / "out"
    real = convert_job.write_peft_adapter

    def write_then_appear(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)  # type: ignore[arg-type]
        _precious(out)

    monkeypatch.setattr(convert_job, "write_peft_adapter", write_then_appear)
    with pytest.raises(OutputError, match="created while spectra ran"):
        convert_job.convert_to_lora(tmp_path / "init", res.adapter_dir, out)
    assert _kept(out) and _no_siblings(out)


def test_an_empty_folder_created_while_writing_is_taken(tmp_path: Path) -> None:
    """An empty folder counts as absent (as at the start): rmdir can remove nothing else."""
    out = tmp_path / "rep"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        out.mkdir()
    assert (out / "a.txt").read_text() == "a" and _no_siblings(out)


def test_report_writer_never_removes_a_folder_created_while_writing(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    with pytest.raises(OutputError, match="created while spectra ran"):
        with atomic_output_dir(out) as tmp:
            (tmp / "a.txt").write_text("a")
            _precious(out)
    assert _kept(out) and _no_siblings(out)


def test_a_folder_swapped_after_the_check_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --force, the folder exchanged out must be the one the rule checked (device and
    inode): one put in its place between the check and the swap is put back, nothing deleted."""
    out = tmp_path / "rep"
    with atomic_output_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    real_check = outdir._check_now

    def check_then_switch(path: Path, *, force: bool, protect: outdir.Protect) -> None:
        real_check(path, force=force, protect=protect)
        if path == out and (out / "old.txt").exists():
            out.rename(tmp_path / "moved")
            _precious(out)

    with pytest.raises(OutputError, match="changed while spectra replaced it"):
        with atomic_output_dir(out, force=True) as tmp:
            monkeypatch.setattr(outdir, "_check_now", check_then_switch)  # at the swap only
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert _kept(out) and sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (tmp_path / "moved" / "old.txt").read_text() == "old"
    assert _no_siblings(out)


def test_swap_uses_an_atomic_exchange_on_linux() -> None:
    import sys

    if sys.platform.startswith("linux"):
        assert outdir.ATOMIC_EXCHANGE
