"""Model FLOPs per token: the numerator of MFU.

Counted the way PaLM (Chowdhery et al., 2022, appendix B) and torchtitan count them, so MFU
figures compare across runtimes:

- 6 FLOPs per matrix parameter a token passes through (2 in forward, 4 in backward: the input's
  and the weight's gradient): the attention and MLP projections, the MoE router, the activated
  experts (top_k of them, plus the shared expert) and the output head. The embedding is a
  lookup, not a matrix multiply, and norms are element-wise: neither counts.
- the attention scores and their weighted sum: per layer 6 · seq_len · heads · (qk + v head
  sizes) (Q·Kᵀ and A·V, 2 · seq_len · heads · head size each in forward, times 3 with backward),
  over the whole sequence: the causal mask's skipped half is not subtracted (PaLM, torchtitan
  and torch's FLOP counter all count it).

Model FLOPs, not hardware FLOPs: recomputation under activation checkpointing, padding and
pipeline-bubble work are not counted, so MFU says how much of the peak went into the model.
Multi-token prediction's blocks count as layers, plus their input projection and a second pass
through the head each.
"""
from __future__ import annotations

from runtime.model import ModelArgs


def attention_params(args: ModelArgs) -> int:
    """The matrix parameters of one attention layer."""
    d, h, a = args.dim, args.n_heads, args.mla
    if a is None:
        return d * args.head_dim * (2 * h + 2 * args.n_kv_heads)  # wq, wo; wk, wv
    query = d * a.q_lora_rank + a.q_lora_rank * h * a.qk_head_dim if a.q_lora_rank else d * h * a.qk_head_dim
    return (query + d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
            + h * a.v_head_dim * d)


def matmul_params_per_token(args: ModelArgs) -> int:
    """Matrix parameters one token's forward multiplies by (only the activated experts)."""
    d = args.dim
    attention = attention_params(args)
    dense_mlp = 3 * d * args.ffn_dim
    total = (1 + args.mtp_depth) * args.dim * args.vocab_size + args.mtp_depth * 2 * d * d  # heads; MTP's eh_proj
    for layer in range(args.n_layers + args.mtp_depth):
        total += attention
        if args.is_moe(layer):
            m = args.moe
            expert = 3 * d * m.expert_ffn_dim
            total += d * m.num_experts + m.top_k * expert + expert * m.shared_experts
        else:
            total += dense_mlp
    return total


def attention_flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Forward and backward FLOPs of the attention scores and weighted sum, per token."""
    qk, v = (args.mla.qk_head_dim, args.mla.v_head_dim) if args.mla else (args.head_dim, args.head_dim)
    return 6 * (args.n_layers + args.mtp_depth) * seq_len * args.n_heads * (qk + v)


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Model FLOPs of one token's forward and backward, at sequence length `seq_len`."""
    return 6 * matmul_params_per_token(args) + attention_flops_per_token(args, seq_len)


def active_params(args: ModelArgs, total: int) -> int:
    """Parameters one token uses: all of them but the experts it is not routed to (`total` is
    the model's parameter count; embedding included, as published counts do)."""
    if args.moe is None:
        return total
    m = args.moe
    per_expert = 3 * args.dim * m.expert_ffn_dim
    moe_layers = sum(args.is_moe(i) for i in range(args.n_layers + args.mtp_depth))
    return total - moe_layers * (m.num_experts - m.top_k) * per_expert
