"""Generation memory of multi-head latent attention against grouped-query attention's KV cache.

DeepSeek-V3's attention shape (128 heads; a 1536 query and 512 key/value latent, 128 + 64 rotary
query/key and 128 value dimensions per head; YaRN) against the same model with grouped-query
attention caching full keys and values: 128 KV heads of 128 (every query head its own, as MLA
gives it), and, as a second contender, 8 KV heads of 128 (Llama 3's grouping). The hidden size
is cut to 512 and the model to 2 layers with a small MLP: neither changes what a cache holds per
token, only the compute to fill it. Each model prefills 4,096 tokens into its cache, then
decodes 16 more one at a time. Reported: the values cached per token and layer, the cache's
bytes at 4,096 + 16 tokens (every tensor the cache holds, fp32), the ratio to MLA's, and the
milliseconds per decoded token. The memory that grows with the context is the cache's; the
weights and a step's transient tensors are the same at any context length.

    python -m benchmarks.mla_cache        # ~3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import time

import torch

from parallel.materialize import initial_values, materialize
from runtime.generate import KVCache
from runtime.mla import MLAArgs
from runtime.model import ModelArgs, RopeScaling, Transformer

SHAPE = dict(n_layers=2, dim=512, n_heads=128, ffn_dim=512, vocab_size=1024,
             rope_scaling=RopeScaling("yarn", 40.0, 4096, mscale=1.0, mscale_all_dim=1.0))
CONTENDERS = {
    "MLA (DeepSeek-V3)": dict(n_kv_heads=128, mla=MLAArgs(512, 1536, 128, 64, 128)),
    "GQA, 128 KV heads of 128": dict(n_kv_heads=128, head_dim=128),
    "GQA, 8 KV heads of 128": dict(n_kv_heads=8, head_dim=128),
}


def build(changes: dict) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ModelArgs(**SHAPE, **changes))
    materialize(model, initial_values(model.init_full, 0), torch.device("cpu"))
    return model.eval()


@torch.no_grad()
def measure(model: Transformer, context: int, decode: int) -> dict:
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, context + decode), generator=torch.Generator().manual_seed(0))
    cache = KVCache()
    model(tokens[:, :context], torch.arange(context), cache=cache)
    start = time.perf_counter()
    for i in range(context, context + decode):
        model(tokens[:, i:i + 1], torch.tensor([i]), cache=cache)
    ms = (time.perf_counter() - start) / decode * 1e3
    held = [t for layer in cache.layers.values() for t in (layer.k, layer.v)]
    per_token_layer = sum(t[0, 0].numel() for t in held) // len(cache.layers)
    return {"values_per_token_layer": per_token_layer, "cache_bytes": sum(t.nbytes for t in held), "decode_ms": ms}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--decode", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {name: measure(build(changes), args.context, args.decode) for name, changes in CONTENDERS.items()}
    mla = results["MLA (DeepSeek-V3)"]["cache_bytes"]
    print(f"{args.context} cached tokens (+{args.decode} decoded), {SHAPE['n_layers']} layers, fp32")
    print(f"{'':28}{'values/token/layer':>20}{'cache MB':>10}{'MLA / this':>12}{'decode ms/token':>17}")
    for name, r in results.items():
        print(f"{name:28}{r['values_per_token_layer']:>20}{r['cache_bytes'] / 1e6:>10.1f}"
              f"{mla / r['cache_bytes']:>12.4f}{r['decode_ms']:>17.1f}")


if __name__ == "__main__":
    main()
