"""Context parallelism: a sequence split over `cp` ranks, attention exact in forward and backward.

Sharding (load-balanced for causal attention): the sequence is cut into 2·cp chunks and rank i
holds chunks i and 2·cp−1−i, so every rank has the same amount of causal attention work. Rotary
embeddings use the tokens' original positions; the loss is over the local tokens, normalised by
the global target count.

Two attention implementations (`parallel.cp_impl`):

- `ring`: ring attention (Liu et al., 2023, "Ring Attention with Blockwise Transformers"; the
  load-balanced causal variant of Megatron-LM / Brandon et al., 2023 "Striped Attention"). KV
  blocks travel around the CP ring with point-to-point sends posted before the attention of the
  current block, so communication overlaps compute. Each block runs PyTorch's fused flash
  attention kernel, which returns its log-sum-exp; blocks are merged by online softmax.
  Backward runs the kernel's backward per block with the merged output and log-sum-exp (the
  true probabilities, as FlashAttention recomputes them) and sends each KV block's gradient
  around the ring with it, home to its owner after a full turn. Memory per rank: O(local
  sequence), not O(sequence²).
  Multi-head latent attention's value heads are narrower than its query/key heads; the kernel
  takes one size, so the values are padded (`RingAttentionCore`).
- `ulysses`: DeepSpeed-Ulysses (Jacobs et al., 2023): an all-to-all turns sequence shards into
  head shards, attention runs over the whole sequence for cp-th of the heads, and an all-to-all
  turns it back. Needs the (TP-local) heads divisible by cp.

    pytest tests/dist/test_context_parallel.py
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime.model import causal_attention, document_mask


def chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    return rank, 2 * cp - 1 - rank


def local_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Original positions of the tokens rank `rank` holds: chunks rank and 2·cp−1−rank."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunk_ids(rank, cp)])


# --- ring attention ------------------------------------------------------------------------------

def _flash(q, k, v, causal: bool, mask=None):
    """One block of attention with PyTorch's fused CPU flash kernel: q [b, hq, cq, d],
    k/v [b, hkv, ck, d] (grouped-query attention built in), `mask` additive [b, 1, cq, ck] or None
    -> (out, log-sum-exp [b, hq, cq])."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask)


def _flash_backward(grad_out, q, k, v, out, lse, causal: bool, mask=None):
    """The block's (dq, dk, dv) given the *merged* output and log-sum-exp of its queries, so its
    probabilities are the true ones (FlashAttention's backward, block by block)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask)


def ring_exchange(t: torch.Tensor, group, ranks: list[int], rank: int):
    """Post a send of `t` to the next rank of the ring and a receive from the previous one."""
    cp = len(ranks)
    buf = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t, ranks[(rank + 1) % cp], group),
           dist.P2POp(dist.irecv, buf, ranks[(rank - 1) % cp], group)]
    return buf, dist.batch_isend_irecv(ops)


def _blocks(rank: int, owner: int, cp: int, c: int, documents, dtype):
    """(query slice, key slice, causal, mask) of every block this rank computes against `owner`'s
    KV: its two query chunks against the owner's two key chunks, skipping keys after the query.
    With `documents` ([b, 2·cp·c], the whole sequence), `mask` is the block's additive document
    mask [b, 1, c, c] (causal inside it on the diagonal), and blocks where no query shares a
    document with any key are skipped; rows of a block whose keys are all masked are handled by
    the merge (their log-sum-exp is −inf)."""
    for qa, a in enumerate(chunk_ids(rank, cp)):
        for kb, b in enumerate(chunk_ids(owner, cp)):
            if b > a:
                continue
            qs, ks = slice(qa * c, (qa + 1) * c), slice(kb * c, (kb + 1) * c)
            if documents is None:
                yield qs, ks, b == a, None
                continue
            allowed = document_mask(documents[:, a * c:(a + 1) * c], documents[:, b * c:(b + 1) * c], causal=b == a)
            if allowed.any():
                mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
                yield qs, ks, False, mask[:, None]


def _merge(out, lse, blk_out, blk_lse, qs, mask) -> None:
    """Online softmax: fold one block's (output, log-sum-exp) into the running ones of queries `qs`."""
    if mask is not None:  # a query row with no key in this block contributes nothing
        blk_lse = blk_lse.masked_fill(torch.isinf(mask).all(-1), float("-inf"))  # mask [b, 1, cq, ck]
    new = torch.logaddexp(lse[..., qs], blk_lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # −inf only where both are
    w_old = (lse[..., qs] - safe).exp().transpose(1, 2).unsqueeze(-1)  # [b, c, hq, 1]
    w_new = (blk_lse - safe).exp().transpose(1, 2).unsqueeze(-1)
    out[:, qs] = out[:, qs] * w_old + blk_out.transpose(1, 2).to(out.dtype) * w_new
    lse[..., qs] = new


class RingAttention(torch.autograd.Function):
    """Causal attention over a sequence split across the CP ring (load-balanced chunks).

    Forward: for cp steps, attend this rank's two query chunks to the KV block in hand (skipping
    key chunks after the query chunk, masking the diagonal), merge into (output, log-sum-exp)
    by online softmax, while the block moves on to the next rank and the previous rank's
    arrives. Backward: the same walk; each block's gradients come from the fused flash backward
    given the merged output and log-sum-exp; dQ accumulates here, dK/dV accumulate in a buffer
    that travels with its KV block and reaches the block's owner after cp steps."""

    @staticmethod
    def forward(ctx, q, k, v, group, ranks, rank, documents):
        cp = len(ranks)
        c = q.shape[1] // 2
        acc = torch.promote_types(q.dtype, torch.float32)
        qt = q.transpose(1, 2)  # [b, hq, s, d]
        kv = torch.stack([k.transpose(1, 2), v.transpose(1, 2)]).contiguous()  # one message per step
        # The output accumulates in [b, s, h, d], the layout the output projection reads.
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(qt.shape[:3], float("-inf"), dtype=acc, device=q.device)  # [b, hq, s]
        for t in range(cp):
            pending = ring_exchange(kv, group, ranks, rank) if t < cp - 1 else None
            for qs, ks, causal, mask in _blocks(rank, (rank - t) % cp, cp, c, documents, q.dtype):
                blk_out, blk_lse = _flash(qt[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], causal, mask)
                _merge(out, lse, blk_out, blk_lse.to(acc), qs, mask)
            if pending is not None:
                kv, works = pending
                for w in works:
                    w.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.ranks, ctx.rank, ctx.documents = group, ranks, rank, documents
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, ranks, rank = ctx.group, ctx.ranks, ctx.rank
        cp, c = len(ranks), q.shape[1] // 2
        acc = torch.promote_types(q.dtype, torch.float32)
        qt, ot, dot = q.transpose(1, 2), out.transpose(1, 2), grad_out.transpose(1, 2).contiguous()
        dq = torch.zeros(qt.shape, dtype=acc, device=q.device)
        kv = torch.stack([k.transpose(1, 2), v.transpose(1, 2)]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # travels with its KV block
        for t in range(cp):
            pending = ring_exchange(kv, group, ranks, rank) if t < cp - 1 else None
            for qs, ks, causal, mask in _blocks(rank, (rank - t) % cp, cp, c, ctx.documents, q.dtype):
                bq, bk, bv = _flash_backward(dot[:, :, qs], qt[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                                             ot[:, :, qs], lse[..., qs], causal, mask)
                dq[:, :, qs] += bq
                dkv[0][:, :, ks] += bk
                dkv[1][:, :, ks] += bv
            # The gradient moves on with its block; after the last step it goes home (one more hop).
            dkv, works = ring_exchange(dkv, group, ranks, rank)
            for w in works:
                w.wait()
            if pending is not None:
                kv, works = pending
                for w in works:
                    w.wait()
        return (dq.to(q.dtype).transpose(1, 2), dkv[0].to(k.dtype).transpose(1, 2),
                dkv[1].to(v.dtype).transpose(1, 2), None, None, None, None)


class RingAttentionCore:
    """The `attention.core` of a CP rank: q, k, v [b, s/cp, h, d] in load-balanced order."""

    def __init__(self, group, ranks: list[int], rank: int):
        self.group, self.ranks, self.rank = group, ranks, rank

    def __call__(self, q, k, v, documents=None):
        dq, dv = q.shape[-1], v.shape[-1]
        if dq == dv:
            return RingAttention.apply(q, k, v, self.group, self.ranks, self.rank, documents)
        # The fused kernel takes one head size (multi-head latent attention has two): the smaller
        # side padded with zeros — queries scaled so the softmax scale stays 1/√dq — and the
        # output's padding columns dropped. Autograd carries the gradients through both.
        d = max(dq, dv)
        if dv < d:
            v = F.pad(v, (0, d - dv))
        else:
            q, k = F.pad(q, (0, d - dq)) * (d / dq) ** 0.5, F.pad(k, (0, d - dq))
        return RingAttention.apply(q, k, v, self.group, self.ranks, self.rank, documents)[..., :dv]


# --- Ulysses -------------------------------------------------------------------------------------

def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    parts = [p.contiguous() for p in x.chunk(n, dim=scatter_dim)]
    send = torch.stack(parts)  # [n, ...]: part j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(list(recv.unbind(0)), dim=gather_dim)


class SeqToHeadAllToAll(torch.autograd.Function):
    """Forward: all-to-all that scatters `scatter_dim` over the CP ranks and gathers
    `gather_dim` (sequence shards → head shards, or back). Backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


class UlyssesAttentionCore:
    """The `attention.core` of a CP rank with all-to-all attention."""

    def __init__(self, group, seq_len: int, cp: int):
        self.group = group
        gathered = torch.cat([local_positions(seq_len, cp, r) for r in range(cp)])
        self.order = torch.argsort(gathered)  # gathered sequence → original order
        self.back = torch.argsort(self.order)
        self.cp = cp

    def __call__(self, q, k, v, documents=None):
        if k.shape[2] % self.cp:  # fewer KV heads than CP ranks: give each query head its own
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        q, k, v = (SeqToHeadAllToAll.apply(t, 2, 1, self.group)[:, self.order.to(t.device)] for t in (q, k, v))
        out = causal_attention(q, k, v, documents)[:, self.back.to(q.device)]  # [b, s, h/cp, d]
        return SeqToHeadAllToAll.apply(out.contiguous(), 1, 2, self.group)


def apply_cp(model, groups, cfg) -> None:
    """Swap every attention core of `model` for the context-parallel one (`parallel.cp_impl`,
    checked by launch.validate) and give the model this rank's token positions, `positions`
    (its rotary positions and the batch's token selection). A no-op when cp = 1."""
    cp, rank, ranks = groups.size("cp"), groups.index("cp"), groups.ranks["cp"]
    if cp == 1:
        return
    seq_len = cfg.train.seq_len
    for block in model.layers.values():
        if cfg.parallel.cp_impl == "ring":
            block.attention.core = RingAttentionCore(groups["cp"], ranks, rank)
        else:
            block.attention.core = UlyssesAttentionCore(groups["cp"], seq_len, cp)
    model.positions = local_positions(seq_len, cp, rank)
