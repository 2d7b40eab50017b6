"""spectra.sources."""
