"""spectra.formats: one owner per file format, below every stage.

- `safetensors.py` — the safetensors header: the validating reader (`read_header`,
  `parse_header`), `TensorRef` (where one tensor's bytes are), the one dtype table (`DTYPES`),
  and the header writer (`header_bytes`) the residual writer uses.
"""
