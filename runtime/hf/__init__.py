"""Hugging Face checkpoints in and out: `config.json` ↔ the model config (config.py), tensor
names and layouts ↔ quintet's parameters (weights.py), safetensors folders read by slices and
written shard by shard (files.py)."""
