"""spectra.distributed: running report/compare/init under torchrun (torch.distributed)."""
