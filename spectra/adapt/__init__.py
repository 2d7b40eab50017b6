"""spectra.adapt."""
