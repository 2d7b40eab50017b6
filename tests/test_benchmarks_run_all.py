"""`make bench` runs benchmarks/run_all.py: it must know every benchmark and flags it accepts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_all():  # noqa: ANN202 - the module
    spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_has_quick_arguments_its_parser_declares() -> None:
    run_all = _run_all()
    scripts = run_all.scripts()  # raises for a bench_*.py without quick arguments
    assert {p.stem for p in scripts} == set(run_all.QUICK)
    for script in scripts:
        source = script.read_text(encoding="utf-8")
        for flag in (a for a in run_all.QUICK[script.stem] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{script.name} declares no {flag}"
