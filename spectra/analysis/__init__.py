"""spectra.analysis."""
