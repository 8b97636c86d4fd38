"""Multi-head latent attention (DeepSeek-V2, Liu et al., 2024; DeepSeek-V3).

Keys and values come from one compressed latent per token instead of per-head projections:

    c_kv, k_rope = split(wkv_a x)              latent [kv_lora_rank], shared rotary key [rope]
    k_nope, v    = split(wkv_b RMSNorm(c_kv))  per head [nope], [v_head_dim]
    q            = wq x, or wq_b RMSNorm(wq_a x) with a low-rank query (q_lora_rank)
    q_nope, q_rope = split(q)                  per head [nope], [rope]
    attention over keys [k_nope, rope(k_rope)] (k_rope shared by the heads), queries
    [q_nope, rope(q_rope)], values v, softmax scale (nope + rope)^−½ · mscale²  (YaRN)

Generation caches only the normalised latent and the rotated shared key, kv_lora_rank +
qk_rope_head_dim values per token and layer, and attends to them directly: the up-projection of
the keys is absorbed into the queries (q_nope·W_uk c = (W_ukᵀ q_nope)·c) and that of the values
applied after the softmax (DeepSeek-V2 §2.1.2), so no per-head key or value is ever stored.

Tensor parallelism (as Megatron-Core's MLA): the down-projections wq_a and wkv_a and the two
latent norms are replicated — every rank computes the whole latent from the gathered input, and
their gradients, each rank's share through its heads, are summed over TP ("partial"); wq / wq_b
and wkv_b are column-parallel (heads split), wo row-parallel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import torch.nn.functional as F

from runtime.layers import AttentionInputs, RMSNorm, apply_rotary, causal_attention


@dataclass(frozen=True)
class MLAArgs:
    kv_lora_rank: int  # the compressed key/value latent per token
    q_lora_rank: int = 0  # the query's low-rank bottleneck; 0 = one full query projection (V2-Lite)
    qk_nope_head_dim: int = 128  # per head: the query/key part without rotation
    qk_rope_head_dim: int = 64  # per head: the rotated part (the key's is shared by all heads)
    v_head_dim: int = 128  # per head: values

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MultiLatentAttention(nn.Module):
    tp_plan = {"wq": "column", "wq_a": "partial", "q_norm": "partial", "wq_b": "column", "wkv_a": "partial",
               "kv_norm": "partial", "wkv_b": "column", "wo": "row"}
    init_plan = {"wq": "normal", "wq_a": "normal", "wq_b": "normal", "wkv_a": "normal", "wkv_b": "normal",
                 "wo": "residual"}

    def __init__(self, dim: int, n_heads: int, args: MLAArgs, norm_eps: float, softmax_mscale: float = 1.0):
        super().__init__()
        self.args = args
        q_out = n_heads * args.qk_head_dim
        if args.q_lora_rank:
            self.wq = None
            self.wq_a = nn.Linear(dim, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank, norm_eps)
            self.wq_b = nn.Linear(args.q_lora_rank, q_out, bias=False)
        else:
            self.wq, self.wq_a, self.q_norm, self.wq_b = nn.Linear(dim, q_out, bias=False), None, None, None
        self.wkv_a = nn.Linear(dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, norm_eps)
        self.wkv_b = nn.Linear(args.kv_lora_rank, n_heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * args.v_head_dim, dim, bias=False)
        # The kernels scale by qk_head_dim^−½; YaRN's mscale² is folded into the queries.
        self.q_scale = softmax_mscale
        # Replaceable by parallel code (context parallelism swaps in ring or Ulysses attention).
        self.core = causal_attention

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache=None) -> torch.Tensor:
        """`cache` (runtime.generate.LayerCache) keeps earlier positions' latents and rotated keys."""
        a, (b, s, _) = self.args, x.shape
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_rope = q.view(b, s, -1, a.qk_head_dim).split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_rope = apply_rotary(k_rope[:, :, None], inputs.cos, inputs.sin)  # [b, s, 1, rope]
        q_rope = apply_rotary(q_rope, inputs.cos, inputs.sin)
        if self.q_scale != 1.0:
            q_nope, q_rope = q_nope * self.q_scale, q_rope * self.q_scale
        if cache is not None and cache.length:
            past = cache.length
            latent, k_rope = cache.append(latent, k_rope)
            out = self._absorbed(q_nope, q_rope, latent, k_rope, past)
        else:
            if cache is not None:
                cache.append(latent, k_rope)
            k_nope, v = self.wkv_b(latent).view(b, s, -1, a.qk_nope_head_dim + a.v_head_dim).split(
                [a.qk_nope_head_dim, a.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
            out = self.core(torch.cat([q_nope, q_rope], dim=-1), k, v, inputs.documents)  # [b, s, h, v_head_dim]
        return self.wo(out.reshape(b, s, -1))

    def _absorbed(self, q_nope, q_rope, latent, k_rope, past: int) -> torch.Tensor:
        """Attention of the new queries over the cached latents [b, T, r] and rotated keys
        [b, T, 1, rope], as multi-query attention in the latent space: the keys' up-projection
        absorbed into the queries, the values' applied to the attended latent. The heads share
        the one latent key and value, so they are folded into the query rows: nothing of size
        T × heads is ever made."""
        a, (b, s, h, _), total = self.args, q_nope.shape, latent.shape[1]
        w = self.wkv_b.weight.view(h, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)  # [h, nope + v, r]
        w_uk, w_uv = w[:, :a.qk_nope_head_dim], w[:, a.qk_nope_head_dim:]
        q = torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk), q_rope], dim=-1)  # [b, s, h, r + rope]
        k = torch.cat([latent, k_rope[:, :, 0]], dim=-1)  # [b, T, r + rope]
        # Query row (i, head) sits at position past + i and sees the keys up to it.
        seen = torch.arange(total, device=q.device)[None, :] <= (past + torch.arange(s, device=q.device))[:, None]
        attended = F.scaled_dot_product_attention(q.reshape(b, 1, s * h, -1), k[:, None], latent[:, None],
                                                  attn_mask=seen.repeat_interleave(h, dim=0),
                                                  scale=a.qk_head_dim**-0.5)  # [b, 1, s·h, r]
        return torch.einsum("bshr,hvr->bshv", attended.view(b, s, h, -1), w_uv)
