"""Text sources, tokenization and deterministic, resumable batches."""
