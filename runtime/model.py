"""A Llama-style decoder-only Transformer in plain PyTorch.

RMSNorm, rotary position embeddings, grouped-query attention (or DeepSeek's multi-head latent
attention, runtime/mla.py), SwiGLU feed-forward or Mixture of Experts (runtime/moe.py), an
output head, and optionally DeepSeek-V3's multi-token prediction blocks after the main ones. The
model knows nothing of ranks: parallel code in `parallel/` rewrites or wraps its modules. It is
splittable by construction — blocks live in a ModuleDict keyed by their global index, and a
pipeline stage that does not hold the embedding or the head sets them to None — and its
attention reshapes by head size, never by head count, so a tensor-parallel shard of a
projection simply yields fewer heads.

What parallel code and initialisation need to know about each parameter is declared next to
the module that owns it, as class attributes read by `declared`:

    tp_plan     how tensor parallelism treats a child (parallel/tensor.py); the outermost
                declaration covering a parameter decides. "column": output features split;
                "row": input features split, the output a partial sum; "kv_column": column, or
                a replicated copy when there are fewer KV heads than ranks; "vocab": split by
                vocabulary rows; "norm": replicated, its gradient partial under sequence
                parallelism; "partial": replicated, its gradient partial over TP (the ranks see
                different tokens); "experts": expert parallelism's (parallel/expert.py).
    tp_regions  the children whose input is gathered and output reduced (Megatron's f and g).
    init_plan   each parameter's initial value (`init_full`); the innermost declaration
                decides: "ones", "zeros", "normal", "residual" (an output projection into the
                residual stream, scaled by depth), "embedding", "head".

A parameter nobody declared is an error naming it, never a silent default.

    python -c "from runtime.model import *; print(Transformer(ModelArgs.tiny()))"
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers import (AttentionInputs, RMSNorm, RopeScaling, apply_rotary, attention_after,  # noqa: F401
                            causal_attention, document_mask, document_positions, rotary_frequencies,
                            rotary_tables)
from runtime.loss import IGNORE_INDEX, AlsoMinimise, cross_entropy_sum
from runtime.mla import MLAArgs, MultiLatentAttention
from runtime.moe import MoE, MoEArgs


@dataclass(frozen=True)
class ModelArgs:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    padded_vocab: int = 0  # embedding and head rows, ≥ vocab_size (0 = vocab_size); the rest never score
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int = 0  # per attention head; 0 = dim // n_heads
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before the rotation (Qwen3)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    tie_embeddings: bool = False  # the output head is the embedding matrix
    rope_scaling: RopeScaling | None = None
    mla: MLAArgs | None = None  # multi-head latent attention instead of grouped-query attention
    moe: MoEArgs | None = None  # Mixture-of-Experts feed-forward blocks
    moe_every: int = 1  # layer i is MoE when i % moe_every == 0 and i ≥ moe_first_dense
    moe_first_dense: int = 0
    residual: str = "standard"  # standard | ladder
    ladder_layers: int = 0  # with residual=ladder: how many of the last layers are ladder (0 = all)
    mtp_depth: int = 0  # multi-token prediction: blocks n_layers .. n_layers+depth−1 predict tokens 2.. ahead
    mtp_loss_weight: float = 0.1  # λ: their mean loss's weight in the objective

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "padded_vocab", max(self.padded_vocab, self.vocab_size))

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe_first_dense and layer % self.moe_every == 0

    @property
    def rope_dim(self) -> int:
        """The rotated dimensions of a head: all of it, or MLA's decoupled rotary part."""
        return self.mla.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def head_uses_embeddings(self) -> bool:
        """Whether the part with the head needs the embedding matrix: as the head (tied), or to
        embed the tokens ahead for multi-token prediction."""
        return self.tie_embeddings or self.mtp_depth > 0

    @property
    def ladder_start(self) -> int:
        """The first ladder layer (n_layers when the model has none)."""
        if self.residual != "ladder":
            return self.n_layers
        return self.n_layers - (self.ladder_layers or self.n_layers)

    @classmethod
    def from_config(cls, cfg, tp: int = 0) -> "ModelArgs":
        """The model of config `cfg`; with `tp`, its vocabulary padded for that tensor-parallel
        size (a multiple of model.pad_vocab_to_multiple_of × tp, as Megatron-Core pads)."""
        base = {f: getattr(cfg, f) for f in cls.__dataclass_fields__
                if f not in ("moe", "moe_every", "moe_first_dense", "rope_scaling", "padded_vocab", "mla")}
        if tp:
            multiple = cfg.pad_vocab_to_multiple_of * tp
            base["padded_vocab"] = -(-cfg.vocab_size // multiple) * multiple
        base["residual"] = str(base["residual"])
        r = cfg.rope_scaling
        if r.type != "none":
            base["rope_scaling"] = RopeScaling(str(r.type), r.factor, r.original_max_position_embeddings,
                                               r.low_freq_factor, r.high_freq_factor, r.beta_fast, r.beta_slow,
                                               r.mscale, r.mscale_all_dim)
        a = cfg.mla
        if a.kv_lora_rank:
            base["mla"] = MLAArgs(a.kv_lora_rank, a.q_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim)
        m = cfg.moe
        if m.num_experts == 0:
            return cls(**base)
        moe = MoEArgs(num_experts=m.num_experts, top_k=m.top_k, expert_ffn_dim=m.expert_ffn_dim or cfg.ffn_dim,
                      shared_experts=m.shared_experts, score=str(m.score), n_group=m.n_group,
                      topk_group=m.topk_group, routed_scaling_factor=m.routed_scaling_factor,
                      renormalize=m.renormalize, aux_loss_coef=m.aux_loss_coef,
                      sequence_aux_loss=m.sequence_aux_loss,
                      z_loss_coef=m.z_loss_coef, bias_update_rate=m.bias_update_rate,
                      capacity_factor=m.capacity_factor, force_balance=m.force_balance)
        return cls(**base, moe=moe, moe_every=m.every, moe_first_dense=m.first_dense)

    @classmethod
    def tiny(cls) -> "ModelArgs":
        return cls(n_layers=4, dim=256, n_heads=8, n_kv_heads=4, ffn_dim=688, vocab_size=256)


def declared(root: nn.Module, name: str, table: str, innermost: bool) -> str:
    """The style `table` ("tp_plan" or "init_plan") declares for parameter or buffer `name` (a
    canonical name under `root`): the value of the outermost (or innermost) module on the path
    whose table has a key that is a prefix of the rest of the path. KeyError names what lacks one."""
    parts, module, found = name.split("."), root, None
    for i in range(len(parts)):
        plan = getattr(type(module), table, {})
        for j in range(len(parts), i, -1):
            if ".".join(parts[i:j]) in plan:
                found = plan[".".join(parts[i:j])]
                break
        if found is not None and not innermost:
            return found
        module = module[parts[i]] if isinstance(module, nn.ModuleDict) else getattr(module, parts[i], None)
        if module is None or not isinstance(module, nn.Module):
            break
    if found is None:
        raise KeyError(f"{name} has no {table} declaration: declare it in its module's {table} (runtime/model.py)")
    return found


class Attention(nn.Module):
    # q_norm / k_norm: one weight per head dimension, shared by the heads; under TP each rank's
    # heads give part of its gradient.
    tp_plan = {"wq": "column", "wk": "kv_column", "wv": "kv_column", "wo": "row", "q_norm": "partial",
               "k_norm": "partial"}
    init_plan = {"wq": "normal", "wk": "normal", "wv": "normal", "wo": "residual", "wq.bias": "zeros",
                 "wk.bias": "zeros", "wv.bias": "zeros"}

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        # Replaceable by parallel code (context parallelism swaps in ring attention).
        self.core = causal_attention

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache=None) -> torch.Tensor:
        """`cache` (runtime.generate.LayerCache) keeps earlier positions' keys and values for
        generation; new queries attend to them and to themselves causally."""
        b, s, _ = x.shape
        # Head counts follow from the projection widths, so a sharded projection just has fewer.
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, inputs.cos, inputs.sin), apply_rotary(k, inputs.cos, inputs.sin)
        if cache is not None and cache.length:
            past = cache.length
            k, v = cache.append(k, v)
            out = attention_after(q, k, v, past)
        else:
            if cache is not None:
                cache.append(k, v)
            out = self.core(q, k, v, inputs.documents)  # [b, s, hq, d]
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    tp_plan = {"w1": "column", "w3": "column", "w2": "row"}
    init_plan = {"w1": "normal", "w3": "normal", "w2": "residual"}

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    tp_plan = {"attention_norm": "norm", "ffn_norm": "norm"}
    tp_regions = ("attention", "feed_forward")

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        if args.mla:
            mscale = args.rope_scaling.softmax_mscale if args.rope_scaling else 1.0
            self.attention = MultiLatentAttention(args.dim, args.n_heads, args.mla, args.norm_eps, mscale)
        else:
            self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if args.is_moe(layer):
            hidden = args.moe.expert_ffn_dim
            self.feed_forward = MoE(args.dim, args.moe, lambda: FeedForward(args.dim, hidden * args.moe.shared_experts))
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, branch: str | None = None, cache=None) -> torch.Tensor:
        """The block, or one of its two residual branches alone (`branch="attention"` or
        `"mlp"`: the branch's output, not added to x), which the ladder wiring adds later."""
        if branch == "attention":
            return self.attention(self.attention_norm(x), inputs, cache)
        if branch == "mlp":
            return self.feed_forward(self.ffn_norm(x))
        h = x + self.attention(self.attention_norm(x), inputs, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class MTPBlock(Block):
    """One depth of multi-token prediction (DeepSeek-V3 §2.2): from the previous depth's hidden
    state h (the main model's, after its final norm, for the first) and the embedding of the
    token this depth reads, h' = eh_proj [RMSNorm(embedding); RMSNorm(h)], then a Transformer
    block; `head_norm` precedes the output head the depths share with the main model."""

    tp_plan = {**Block.tp_plan, "enorm": "norm", "hnorm": "norm", "head_norm": "norm",
               "eh_proj": "norm"}  # eh_proj: replicated like a norm, outside any TP region
    init_plan = {"eh_proj": "normal"}

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.head_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, embedding: torch.Tensor) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(embedding), self.hnorm(x)], dim=-1))
        return super().forward(x, inputs)


def tokens_ahead(labels: torch.Tensor, k: int) -> torch.Tensor:
    """labels [b, s] moved k positions left (position i: label i+k), IGNORE_INDEX past the end."""
    if k == 0:
        return labels
    return torch.cat([labels[:, k:], labels.new_full((labels.shape[0], k), IGNORE_INDEX)], dim=1)


def ladder_blocks(blocks, x, pending_attention, pending_mlp, inputs, cache=None):
    """Ladder residual (Zhang, Mishra et al., 2025) over consecutive blocks: each branch reads the
    stream without the previous branch's output, which is added only afterwards —
    r_j = r_{j−1} + h_j(r_{j−2}). Per block: add the previous attention output, run attention,
    add the previous MLP output, run the MLP. Returns (stream, attention output, MLP output):
    the last two are still to be added. With one device the all-reduces these outputs wait for
    in tensor parallelism are the identity, so this is the architecture itself."""
    for block in blocks:
        if pending_attention is not None:
            x = x + pending_attention
        pending_attention = block(x, inputs, branch="attention", cache=cache.layer(block) if cache else None)
        if pending_mlp is not None:
            x = x + pending_mlp
        pending_mlp = block(x, inputs, branch="mlp")
    return x, pending_attention, pending_mlp


class Transformer(nn.Module):
    tp_plan = {"tok_embeddings": "vocab", "output": "vocab", "norm": "norm"}
    init_plan = {"tok_embeddings": "embedding", "output": "head"}

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # The summed token losses of logits; tensor parallelism replaces it (`loss_fn` adds MTP's).
        self.token_loss = functools.partial(cross_entropy_sum, vocab_size=args.vocab_size)
        # Padded rows (args.padded_vocab) are never looked up and their logits never score.
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.padded_vocab, args.dim)
        # Multi-token prediction's blocks follow the main ones (DeepSeek-V3's checkpoints number
        # them so too); a pipeline keeps them on the last stage.
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in range(args.n_layers)}
                                    | {str(i): MTPBlock(args, i) for i in range(args.n_layers, args.n_layers + args.mtp_depth)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.padded_vocab, bias=False)
        if args.tie_embeddings:  # one parameter, named tok_embeddings.weight
            self.output.weight = self.tok_embeddings.weight
        # Runs the ladder blocks; tensor parallelism swaps in one that overlaps the all-reduces.
        self.ladder = ladder_blocks
        # This step's (main, weighted MTP) token-loss sums (`loss_fn`), read and reset by a step hook.
        self.mtp_sums = torch.zeros(2, dtype=torch.float64, device="cpu")

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None, cache=None, labels: torch.Tensor | None = None):
        """tokens: [b, s] ids, or this pipeline part's input activations: [b, s, dim], or, for a
        ladder model, [3, b, s, dim] (the stream and the two branch outputs still to be added).

        positions: [s] original token positions (default 0..s-1 for the s positions of `tokens`;
        a part whose input activations are sequence-sharded must pass them). `documents` [b, S]:
        the document index of every token of the whole sequence (data.document_mask): positions
        restart at each document and attention stays inside it. `cache`
        (runtime.generate.KVCache) holds earlier positions during generation. Returns
        [b, s, padded_vocab] logits (the columns past vocab_size are padding: loss functions and
        generation drop them), or the activations to pass on when this part has no head.
        With multi-token prediction and `labels` [b, s] (training), the part with the head returns
        (logits, [each MTP depth's logits]) for `loss_fn`.
        """
        ladder_state = tokens.dim() == 4
        if positions is None:
            positions = torch.arange(tokens.shape[-2] if tokens.is_floating_point() else tokens.shape[1],
                                     device=tokens.device)
        pending_attention = pending_mlp = None
        if ladder_state:
            h, pending_attention, pending_mlp = tokens.unbind(0)
        else:
            # A later pipeline part gets activations (and may hold the embedding as its tied head).
            h = tokens if tokens.is_floating_point() else self.tok_embeddings(tokens)
        if documents is not None:
            positions = document_positions(documents)[:, positions]
        inputs = AttentionInputs(*rotary_tables(positions, self.args.rope_dim, self.args.rope_theta, h.dtype,
                                                self.args.rope_scaling), documents)
        start, n = self.args.ladder_start, self.args.n_layers
        standard = [b for i, b in self.layers.items() if int(i) < min(start, n)]
        ladder = [b for i, b in self.layers.items() if start <= int(i) < n]
        for block in standard:
            h = block(h, inputs, cache=cache.layer(block) if cache else None)
        if ladder:
            h, pending_attention, pending_mlp = self.ladder(ladder, h, pending_attention, pending_mlp, inputs, cache)
        if self.output is None and self.args.residual == "ladder":
            zero = torch.zeros_like(h)  # a part ending before any ladder block has nothing pending
            return torch.stack([h, zero if pending_attention is None else pending_attention,
                                zero if pending_mlp is None else pending_mlp])
        for pending in (pending_attention, pending_mlp):
            if pending is not None:
                h = h + pending
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        logits = self.output(h)
        if labels is None or not self.args.mtp_depth:
            return logits
        further = []
        for k in range(1, self.args.mtp_depth + 1):  # depth k reads token i+k (label i+k−1)
            block = self.layers[str(n + k - 1)]
            h = block(h, inputs, embedding=self.tok_embeddings(tokens_ahead(labels, k - 1).clamp(min=0)))
            further.append(self.output(block.head_norm(h)))
        return logits, further

    def loss_fn(self, out, labels: torch.Tensor) -> torch.Tensor:
        """The sum of the token losses of one microbatch's output. With multi-token prediction's
        (logits, further) it is still the main loss's value, but its gradient includes λ/D times
        the sum of depth k's token losses against labels k positions ahead: normalised by the
        same target count, the V3 paper's L_MTP = λ/D Σ_k L^k with L^k's 1/T."""
        if not isinstance(out, tuple):
            return self.token_loss(out, labels)
        logits, further = out
        main = self.token_loss(logits, labels)
        extra = sum(self.token_loss(f, tokens_ahead(labels, k)) for k, f in enumerate(further, 1))
        extra = extra * (self.args.mtp_loss_weight / len(further))
        self.mtp_sums += torch.stack([main.detach(), extra.detach()]).double().cpu()  # for the step's metric
        return AlsoMinimise.apply(main, extra)

    # --- initialisation: a function of (seed, parameter name, full shape) alone ---------------

    def init_full(self, name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """The full-size initial value of parameter or buffer `name` (canonical, unwrapped), as
        its module declares (`init_plan`).

        Layout-independent by construction: parallel code calls this with the full shape and
        keeps the slice its rank holds. Drawn in fp32 so fp32 and fp64 runs start equal.
        """
        style = declared(self, name, "init_plan", innermost=True)
        if style == "embedding" and self.args.tie_embeddings:
            style = "head"  # the shared matrix also makes the logits: the head's scale
        if style in ("ones", "zeros"):
            return torch.ones(shape) if style == "ones" else torch.zeros(shape)
        t = torch.empty(shape)
        if style == "embedding":
            return nn.init.normal_(t, std=1.0, generator=generator)
        # Output projections feed the residual stream: scale by depth (GPT-2 / Megatron).
        std = {"head": self.args.dim**-0.5, "residual": 0.02 / math.sqrt(2 * self.args.n_layers),
               "normal": 0.02}[style]
        return nn.init.trunc_normal_(t, std=std, a=-3 * std, b=3 * std, generator=generator)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
