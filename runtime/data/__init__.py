"""Token sources and the deterministic, resumable, data-parallel batch loader."""
from runtime.data.loader import Batch, BatchLoader
from runtime.data.sources import SAMPLE_PATH, DataError, load_tokens, write_tokens

__all__ = ["Batch", "BatchLoader", "SAMPLE_PATH", "DataError", "load_tokens", "write_tokens"]
