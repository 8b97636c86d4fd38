"""quintet's parameters as Hugging Face tensors, both ways, block by block.

Each quintet parameter (canonical name, full shape) comes from one Hugging Face tensor or, for a
stacked expert weight, from one tensor per expert:

- `Tensor(name)`: the same matrix. With `heads`, its rows are heads of rotary dimensions:
  quintet rotates interleaved pairs (x[2i], x[2i+1]) of each head, Meta's convention, Hugging
  Face the two halves (x[i], x[i + d/2]), so q/k projections, their biases and the QK-norm
  weights are permuted within each head (the permutation Hugging Face's own Llama conversion
  applies). DeepSeek-V3 rotates interleaved pairs as quintet does: its tensors are read as stored.
- `Experts(names)`: quintet's [E, in, out] stack is the E matrices [out, in] (nn.Linear's
  layout) of `names`, transposed.
- `Zeros()`: no Hugging Face counterpart (the routing-balance bias starts at zero), but in
  DeepSeek-V3, whose router's `e_score_correction_bias` it is.

`read_block` reads only the rows and columns a rank holds (views of the memory-mapped file);
`to_hf` turns a full quintet tensor into its Hugging Face tensors for export.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.model import ModelArgs, Transformer


@dataclass(frozen=True)
class Tensor:
    name: str
    heads: int = 0  # > 0: rows are this many heads of rotary dimensions


@dataclass(frozen=True)
class Experts:
    names: tuple[str, ...]


@dataclass(frozen=True)
class Zeros:
    pass


# Multi-head latent attention: quintet's projections and DeepSeek's (q_proj without a query
# bottleneck, q_a_proj / q_a_layernorm / q_b_proj with one).
_MLA = (("wq", "q_proj"), ("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj"),
        ("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("wkv_b", "kv_b_proj"))


def _ffn_names(arch: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def sources(args: ModelArgs, arch: str) -> dict[str, Tensor | Experts | Zeros]:
    """Every quintet parameter and persistent buffer of the whole model, by canonical name."""
    out: dict = {"tok_embeddings.weight": Tensor("model.embed_tokens.weight"), "norm.weight": Tensor("model.norm.weight")}
    if not args.tie_embeddings:
        out["output.weight"] = Tensor("lm_head.weight")
    gate, up, down = _ffn_names(arch)
    for i in range(args.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        att = theirs + "self_attn."
        out.update({ours + "attention_norm.weight": Tensor(theirs + "input_layernorm.weight"),
                    ours + "ffn_norm.weight": Tensor(theirs + "post_attention_layernorm.weight"),
                    ours + "attention.wo.weight": Tensor(att + "o_proj.weight")})
        if args.mla:
            query = ("wq_a", "q_norm", "wq_b") if args.mla.q_lora_rank else ("wq",)
            out.update({ours + f"attention.{q}.weight": Tensor(att + f"{hf}.weight") for q, hf in _MLA
                        if q in query or q.startswith(("wkv", "kv"))})
        else:
            out.update({ours + "attention.wq.weight": Tensor(att + "q_proj.weight", args.n_heads),
                        ours + "attention.wk.weight": Tensor(att + "k_proj.weight", args.n_kv_heads),
                        ours + "attention.wv.weight": Tensor(att + "v_proj.weight")})
        if args.qkv_bias:
            out.update({ours + "attention.wq.bias": Tensor(att + "q_proj.bias", args.n_heads),
                        ours + "attention.wk.bias": Tensor(att + "k_proj.bias", args.n_kv_heads),
                        ours + "attention.wv.bias": Tensor(att + "v_proj.bias")})
        if args.qk_norm:
            out.update({ours + "attention.q_norm.weight": Tensor(att + "q_norm.weight", 1),
                        ours + "attention.k_norm.weight": Tensor(att + "k_norm.weight", 1)})
        if args.is_moe(i):
            moe = theirs + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
            experts = range(args.moe.num_experts)
            out[ours + "feed_forward.router.weight"] = Tensor(moe + "gate.weight")
            out[ours + "feed_forward.expert_bias"] = (Tensor(moe + "gate.e_score_correction_bias")
                                                      if arch == "deepseek_v3" else Zeros())
            for q, hf in (("w1", gate), ("w3", up), ("w2", down)):
                out[ours + f"feed_forward.experts.{q}"] = Experts(tuple(f"{moe}experts.{e}.{hf}.weight" for e in experts))
                if args.moe.shared_experts:
                    out[ours + f"feed_forward.shared.{q}.weight"] = Tensor(f"{moe}shared_experts.{hf}.weight")
        else:
            for q, hf in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[ours + f"feed_forward.{q}.weight"] = Tensor(f"{theirs}mlp.{hf}.weight")
    return out


def hf_shapes(args: ModelArgs, arch: str) -> dict[str, tuple[int, ...]]:
    """The shape every Hugging Face tensor of this model must have."""
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    out = {}
    for name, src in sources(args, arch).items():
        shape = shapes[name]
        if isinstance(src, Tensor):
            out[src.name] = shape
        elif isinstance(src, Experts):
            out.update({n: (shape[2], shape[1]) for n in src.names})
    return out


def _halves_to_pairs(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from halves (0, d/2, 1, d/2+1, … read as (0,…,d/2−1), (d/2,…)) to
    interleaved pairs: the inverse of `pairs_to_halves`."""
    rest = t.shape[1:]
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(t.shape)


def pairs_to_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from interleaved pairs (0,1),(2,3),… to halves (0,2,…),(1,3,…)."""
    rest = t.shape[1:]
    return t.reshape(heads, t.shape[0] // heads // 2, 2, *rest).transpose(1, 2).reshape(t.shape)


def read_block(src, reader, full_shape: tuple[int, ...], block: tuple[slice, ...]) -> torch.Tensor:
    """The `block` of the quintet tensor `src` describes, read from `reader` (files.Reader)."""
    if isinstance(src, Zeros):
        return torch.zeros([s.stop - s.start for s in block])
    if isinstance(src, Experts):
        e, rows, cols = block  # quintet [E, in, out] <- per expert [out, in]
        return torch.stack([reader.read(src.names[i], (cols, rows)).T for i in range(e.start, e.stop)])
    if not src.heads:
        return reader.read(src.name, block)
    # Rotary rows: read the whole heads covering the block, reorder them, keep the rows asked for.
    head = full_shape[0] // src.heads
    rows, rest = block[0], tuple(block[1:])
    first, last = rows.start // head, -(-rows.stop // head)
    whole = reader.read(src.name, (slice(first * head, last * head), *rest))
    return _halves_to_pairs(whole, last - first)[rows.start - first * head:rows.stop - first * head]


def to_hf(src, parts: list[torch.Tensor]) -> list[tuple[str, list[torch.Tensor]]] | None:
    """The Hugging Face tensors of one quintet tensor given as row slabs (`parts`, in order; one
    part: the whole tensor), each as its own row slabs: no copy where the layouts agree. None when
    a slab cuts through a rotary head (read the tensor whole then); none for `Zeros`."""
    if isinstance(src, Zeros):
        return []
    if isinstance(src, Experts):  # one expert per row of the stack
        stack = [e for part in parts for e in part]
        return [(name, [stack[e].T.contiguous()]) for e, name in enumerate(src.names)]
    if not src.heads:
        return [(src.name, parts)]
    head = sum(p.shape[0] for p in parts) // src.heads
    if any(p.shape[0] % head for p in parts):
        return None
    return [(src.name, [pairs_to_halves(p, p.shape[0] // head) for p in parts])]
