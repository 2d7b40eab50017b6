"""spectra.formats: one owner per file format, below every stage.

- `files.py` — the one opener of input files: regular files only (no FIFO, device or folder),
  whole-file reads bounded in bytes (`open_input`, `read_input`, `read_json_input`).
- `peft.py` — the PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`):
  the validating reader (`read_adapter_config`, `lora_modules`, `read_peft_adapter`), the writer
  (`write_peft_adapter`), PEFT's scale rule (`lora_scale`) and pattern resolution (`pattern_key`).
- `safetensors.py` — the safetensors header: the validating reader (`read_header`,
  `parse_header`), `TensorRef` (where one tensor's bytes are), the one dtype table (`DTYPES`),
  and the header writer (`header_bytes`) the residual writer uses.
"""
