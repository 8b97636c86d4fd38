"""Greedy generation with a key/value cache.

    tokens = generate(model, prompt, max_new_tokens=32)

The prompt is run once (prefill), filling each layer's cache with its keys and values; then
each new token runs alone, attending to the cache. `gather_logits` turns the model's logits
into the whole vocabulary (tensor parallelism splits them over ranks).
"""
from __future__ import annotations

import torch


class LayerCache:
    """One attention layer's keys and values so far: [b, positions, heads, head_dim]."""

    def __init__(self):
        self.k = self.v = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


class KVCache:
    def __init__(self):
        self.layers: dict[int, LayerCache] = {}

    def layer(self, block) -> LayerCache:
        return self.layers.setdefault(id(block), LayerCache())


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, gather_logits=lambda logits: logits) -> torch.Tensor:
    """Greedy decoding: prompt [b, s] ids -> [b, s + max_new_tokens] ids."""
    cache = KVCache()
    tokens = prompt
    logits = gather_logits(model(prompt, torch.arange(prompt.shape[1]), cache=cache))
    for step in range(max_new_tokens):
        next_token = logits[:, -1, :model.args.vocab_size].argmax(dim=-1, keepdim=True)  # never a padded row
        tokens = torch.cat([tokens, next_token], dim=1)
        if step + 1 == max_new_tokens:
            break
        position = torch.tensor([tokens.shape[1] - 1])
        logits = gather_logits(model(next_token, position, cache=cache))
    return tokens
