"""The layers every attention variant shares: RMSNorm, rotary position embeddings (with Llama
3.1's and YaRN's scaling), and the attention kernels (causal, within documents, after a cache).
Functions of their inputs alone; runtime/model.py and runtime/mla.py build on them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling for a context longer than the one first trained at.

    `llama3` (Llama 3.1): wavelengths beyond original_max_positions / low_freq_factor are
    stretched by `factor`, those below original_max_positions / high_freq_factor kept, and those
    between interpolated. `yarn` (Peng et al., 2023; DeepSeek-V2/V3): the rotation pairs that turn
    fewer than beta_slow times over the original context are interpolated (divided by `factor`),
    those turning more than beta_fast times kept, a linear ramp between; cos and sin are scaled
    by `attention_factor`, and multi-head latent attention multiplies its softmax scale by
    `softmax_mscale` (DeepSeek's mscale_all_dim)."""

    type: str  # llama3 | yarn
    factor: float
    original_max_positions: int
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn
    mscale_all_dim: float = 0.0  # yarn; 0 = none

    def _yarn_mscale(self, m: float) -> float:
        return 1.0 if self.factor <= 1 else 0.1 * m * math.log(self.factor) + 1.0

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (1 but for yarn)."""
        if self.type != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return self._yarn_mscale(self.mscale) / self._yarn_mscale(self.mscale_all_dim)
        return self._yarn_mscale(1.0)

    @property
    def softmax_mscale(self) -> float:
        """The factor on multi-head latent attention's softmax scale: mscale(mscale_all_dim)²."""
        if self.type != "yarn" or not self.mscale_all_dim:
            return 1.0
        return self._yarn_mscale(self.mscale_all_dim) ** 2


class RMSNorm(nn.Module):
    init_plan = {"weight": "ones"}

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32 so bf16 activations keep their scale.
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotary_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                       device=None) -> torch.Tensor:
    """The rotation rate of each pair of a head, [head_dim/2] (fp64), with Llama 3.1's or YaRN's scaling."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    inv_freq = theta**-exponent
    if scaling is None:
        return inv_freq
    s = scaling
    if s.type == "yarn":
        def turning_dim(rotations: float) -> float:  # the pair index that turns `rotations` times
            return head_dim * math.log(s.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(turning_dim(s.beta_fast)), 0)
        high = min(math.ceil(turning_dim(s.beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float64) - low)
                / max(high - low, 0.001)).clamp(0, 1)  # 0: kept, 1: interpolated
        return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)
    wavelen = 2 * math.pi / inv_freq
    low, high = s.original_max_positions / s.low_freq_factor, s.original_max_positions / s.high_freq_factor
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return torch.where(wavelen > low, inv_freq / s.factor, torch.where(wavelen < high, inv_freq, mid))


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                  scaling: RopeScaling | None = None):
    """cos and sin of the rotary angles, [seq, head_dim/2] (or [batch, seq, head_dim/2] for
    positions per sequence), for the given token positions.

    Computed from positions on every call rather than cached in a buffer, so a model built on
    the meta device needs no re-initialisation and context parallelism can pass the original
    (non-contiguous) positions of its sequence shard.
    """
    inv_freq = rotary_frequencies(head_dim, theta, scaling, positions.device)  # [head_dim/2]
    angles = positions.to(torch.float64)[..., None] * inv_freq
    factor = 1.0 if scaling is None else scaling.attention_factor
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x: [batch, seq, heads, head_dim]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [b, s, h, head_dim/2] each
    cos, sin = (t[None, :, None, :] if t.dim() == 2 else t[:, :, None, :] for t in (cos, sin))
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     documents: torch.Tensor | None = None) -> torch.Tensor:
    """Causal scaled-dot-product attention; q: [b, s, hq, d], k/v: [b, s, hkv, d], hkv | hq.
    `documents` [b, s] (the document index of each token): a query sees only earlier keys of its
    own document. Both run PyTorch's fused kernel (flash attention on CPU takes the mask too)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
    mask = None if documents is None else document_mask(documents, documents, causal=True)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def document_mask(q_docs: torch.Tensor, k_docs: torch.Tensor, causal: bool) -> torch.Tensor:
    """[b, sq, sk] True where query i may attend to key j: the same document, and j ≤ i when the
    two spans are the same tokens (`causal`)."""
    allowed = q_docs[:, :, None] == k_docs[:, None, :]
    if causal:
        allowed &= torch.ones(allowed.shape[1:], dtype=torch.bool, device=allowed.device).tril()
    return allowed


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[b, s] the position of each token within its document (Megatron's reset_position_ids)."""
    idx = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


@dataclass
class AttentionInputs:
    """What every attention layer of one forward needs besides its input: the rotary tables of
    the tokens' positions, and the document index of every token of the whole sequence (None:
    one document per sequence), which attention cores turn into their masks."""

    cos: torch.Tensor
    sin: torch.Tensor
    documents: torch.Tensor | None = None  # [b, s, hq, d]


def attention_after(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """Attention of s new queries at positions past..past+s−1 over past + s cached keys (each
    query sees the keys up to its own position); shapes as in causal_attention."""
    s, total = q.shape[1], k.shape[1]
    allowed = torch.arange(total, device=q.device)[None, :] <= (past + torch.arange(s, device=q.device))[:, None]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)
