"""Typed exceptions. The library raises these; the CLI turns them into one line and exit code 2."""

from __future__ import annotations


class SpectraError(Exception):
    """Base of every error spectra raises on purpose. Its message is one clear line."""

    exit_code: int = 2


class SourceError(SpectraError):
    """A checkpoint cannot be opened or read (missing, malformed, unsafe)."""


class HubError(SourceError):
    """A Hub repo cannot be resolved (offline without cache, unknown repo, no safetensors)."""


class ValidationError(SpectraError, ValueError):
    """A caller passed an argument that is out of range or of the wrong form."""


class CacheError(SpectraError):
    """The spectrum cache cannot be used (unwritable folder, unfixable corrupted entry)."""


class OutputError(SpectraError):
    """An output folder cannot be written (exists, not empty, permission, disk full)."""


class NumericalError(SpectraError):
    """A matrix cannot be decomposed (NaN/Inf entries, empty)."""
