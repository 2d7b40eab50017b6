"""spectra.cli: the typer app behind the `spectra` command."""
