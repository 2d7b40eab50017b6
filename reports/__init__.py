"""spectra.reports: plots, HTML, Markdown, JSON/CSV rendering of results."""
