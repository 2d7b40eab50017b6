"""Fixtures shared by the adapt/export/init tests (spectra init, calibration, CorDA, EVA, LaMDA++).

`one_thread`: run a test module with one torch intra-op thread, restored afterwards. On the shared
2-core test box a second OpenMP thread mostly spin-waits for a busy core: measured on
tests/test_init_cli.py, 51 s CPU with 2 threads against 18 s with 1, for the same results up to
LAPACK rounding (every tolerance in these tests is far above it). Import it into a test module
(``from _adapt_fixtures import one_thread  # noqa: F401``); it is autouse at module scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield
