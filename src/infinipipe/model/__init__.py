"""The chunk-aware LLaMA-style decoder."""
