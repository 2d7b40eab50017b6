"""spectra.jobs: the jobs users run, one module each, read top-down.

- report.py: `analyze()`, HT-SR metrics of every weight matrix (`spectra report`).
- compare.py: `compare()`, a fine-tune or PEFT LoRA adapter against its base (`spectra compare`).
- init.py: `init_adapter()` / `run_init()` (`InitOptions`, `CalibrationRequest`): SVD- or
  data-initialized LoRA adapters, residual base and manifest (`spectra init`).
- convert.py: `convert_to_lora()`: a trained PiSSA-style adapter to a plain LoRA on the original
  base (`spectra convert`).

Each job takes a frozen options dataclass, opens its source, asks the stages (sources, linalg,
analysis, adapt) for what it needs and returns a result or writes its outputs (export); under
torchrun it splits its matrices over the ranks itself (spectra.distributed is only the runtime:
environment, partition, gather, failure protocol) and returns the result on rank 0, None on the
others (init: calibration methods run on rank 0 alone).
"""
