"""spectra.linalg."""
