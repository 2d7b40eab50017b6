"""`python -m spectra ...` (also what `torchrun -m spectra` runs)."""

from spectra.cli.main import main

main()
