from __future__ import annotations

import subprocess
import sys

import pytest

import spectra


@pytest.mark.parametrize("name", sorted(spectra._LAZY))
def test_lazy_exports_resolve(name: str) -> None:
    assert getattr(spectra, name) is not None


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = spectra.nope  # type: ignore[attr-defined]


def test_import_configures_nothing() -> None:
    code = (
        # third-party imports first: torch/numpy/scipy install their own filters on import
        "import torch, numpy, scipy, scipy.linalg, scipy.stats, safetensors, huggingface_hub; "
        "import logging, warnings; before = (logging.getLogger().level, list(warnings.filters)); "
        "import spectra, spectra.jobs.report, spectra.jobs.compare, spectra.sources; "
        "after = (logging.getLogger().level, list(warnings.filters)); "
        "assert before == after, (before, after); "
        "import sys; assert 'matplotlib' not in sys.modules and 'typer' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_analyze_top_level_matches_subpackage(minilm_path) -> None:  # noqa: ANN001
    from spectra.jobs.report import analyze

    assert spectra.analyze is analyze
