"""spectra.reports: plots, HTML, Markdown, JSON/CSV rendering of results.

Modules: `report` (the `spectra report` folder: `write_report`, its HTML and Markdown pages),
`compare` (the `spectra compare` folder and terminal summary), `plots` and `compare_plots`
(matplotlib figures to PNG bytes, no pyplot), `html` (self-contained page builder with escaping),
`markdown` (escaped Markdown blocks), `terminal` (rich summary of an analysis). Importing this
package imports none of them (matplotlib is loaded only when a module that draws is imported).
Import names from the module that defines them.
"""
