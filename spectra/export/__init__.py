"""spectra.export."""
