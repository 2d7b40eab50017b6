"""spectra.analysis: what the spectra say. Pure functions and result dataclasses, no IO.

Report (HT-SR, docs/methods.md section 2):
- powerlaw.py: Clauset-Shalizi-Newman power-law fit of an ESD; mp.py: Marchenko-Pastur edge;
- htsr.py: per-matrix metrics and warnings (`layer_metrics`); outliers.py: outlier ratio;
- randomized.py: the shuffled-entries control; summary.py: the model summary;
- results.py: `LayerMetrics`, `ModelSummary`, `Analysis` (what `spectra.analyze()` returns).
Compare (fine-tune forensics, docs/methods.md section 3):
- intruders.py: intruder dimensions; drift.py: the update dW and subspace drift;
- pairing.py: name pairing with --map renames; pair.py: one matrix pair (`compare_pair`);
- forensics.py: model-level verdicts; comparison.py: `Comparison`, `CompareOptions`;
- compare_inputs.py: whether FINETUNED is a PEFT adapter folder.
csvsafe.py: CSV text a spreadsheet opens as inert data.

The jobs that run these on a checkpoint are in spectra.jobs (report.py, compare.py).
"""
