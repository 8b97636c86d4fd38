"""Tokenizers, token sources, the run's datasets, and the deterministic, resumable,
data-parallel batch loader."""
from runtime.data.dataset import Datasets, build_datasets
from runtime.data.loader import Batch, BatchLoader
from runtime.data.sources import SAMPLE_PATH, DataError
from runtime.data.tokenizer import TokenizerError, load_tokenizer

__all__ = ["Batch", "BatchLoader", "Datasets", "DataError", "SAMPLE_PATH", "TokenizerError", "build_datasets",
           "load_tokenizer"]
