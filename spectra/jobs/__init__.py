"""spectra.jobs: the jobs users run, one module each, read top-down.

- report.py: `analyze()`, HT-SR metrics of every weight matrix (`spectra report`).
- compare.py: `compare()`, a fine-tune or PEFT LoRA adapter against its base (`spectra compare`).

Each job takes a frozen options dataclass, opens its source, asks the stages (sources, linalg,
analysis) for what it needs and returns a result; under torchrun it splits its matrices over the
ranks itself (spectra.distributed is only the runtime: environment, partition, gather, failure
protocol) and returns the result on rank 0, None on the others.
"""
