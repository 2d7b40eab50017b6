from __future__ import annotations

from typer.testing import CliRunner

from spectra import __version__
from spectra.cli.main import app
from spectra.device import resolve_device
from spectra.errors import ValidationError


def test_version_flag() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_resolve_device_cpu_and_bad() -> None:
    assert resolve_device("cpu").type == "cpu"
    try:
        resolve_device("tpu:7")
    except ValidationError as exc:
        assert "tpu:7" in str(exc)
    else:
        raise AssertionError("bad device accepted")
