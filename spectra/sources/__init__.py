"""spectra.sources: what to read. Safetensors checkpoints listed from headers, read on demand.

- `checkpoint.py` — `Checkpoint`: a lazy catalog over a file, a sharded folder, a Hub repo id or
  a PEFT adapter folder; lists `TensorRef`s from headers, reads one tensor or a batch on demand.
- `layout.py` — which files make up a local checkpoint (index, shards, config.json), and the
  index-versus-headers check (`IndexMismatchWarning`).
- `reader.py` — bytes to tensors; `ShardStore`/`LocalStore`; shard digests by file identity.
- `hub.py` — Hub repo ids through huggingface_hub: its cache, offline mode, streaming shards;
  `hub_options.py` — `HubOptions` (torch-free), `hub_client.py` — every Hub call, retried.
- `roles.py` — `MatrixRef`, `ROLES`: which tensors are weight matrices and what they are.
- `select.py` — name-glob and role filters; `inventory.py` — what a checkpoint holds, as data.
- `adapters.py`, `adapter_config.py` — PEFT LoRA adapters as low-rank factors.
- `bundled.py` — `bundled_model_path()`, the packaged all-MiniLM-L6-v2.

The safetensors header itself (`TensorRef`, `DTYPES`, `read_header`) lives in
`spectra.formats.safetensors`. Import each name from the module that defines it.
"""
