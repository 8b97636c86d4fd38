"""What the planner measures instead of assuming: the bytes autograd saves per token in one of
the model's blocks (and the part selective checkpointing recomputes), on this device.

    from parallel.plan.calibrate import block_activations
"""
from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint

from parallel.materialize import materialize
from runtime.model import ModelArgs, Transformer, rotary_tables


def _saved_bytes(block, x, rope) -> int:
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope)
    return sum(seen.values())


def block_activations(args: ModelArgs, dtype: torch.dtype, tokens: int = 1024,
                      device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(bytes saved per token by one block, the share of it in the attention core), averaged over
    the model's dense and MoE blocks as they occur."""
    kinds = sorted({args.is_moe(i) for i in range(args.n_layers)})
    per_token, attention = [], []
    for moe in kinds:
        layer = next(i for i in range(args.n_layers) if args.is_moe(i) == moe)
        one = ModelArgs(**{**args.__dict__, "n_layers": layer + 1})
        with torch.device("meta"):
            model = Transformer(one)
        model.layers = torch.nn.ModuleDict({str(layer): model.layers[str(layer)]})
        model.tok_embeddings = model.output = None
        materialize(model, model.init_full, device, 0)
        block = model.layers[str(layer)].to(dtype)
        x = torch.randn(1, tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
        rope = rotary_tables(torch.arange(tokens, device=device), args.head_dim, args.rope_theta, dtype)
        full = _saved_bytes(block, x, rope)
        core = block.attention.core
        block.attention.core = functools.partial(torch.utils.checkpoint.checkpoint, core, use_reentrant=False)
        selective = _saved_bytes(block, x, rope)
        block.attention.core = core
        weight = sum(args.is_moe(i) == moe for i in range(args.n_layers))
        per_token += [full / tokens] * weight
        attention += [(full - selective) / full] * weight
    return sum(per_token) / len(per_token), sum(attention) / len(attention)
