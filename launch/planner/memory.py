"""Memory per rank of a layout: the parameters, gradients and AdamW state each rank holds, by
how tensor, pipeline, expert and data parallelism split them.

The split follows what parallelize() does (parallel/tensor.py, expert.py, data_parallel.py,
pipeline/partition.py): column- and row-parallel projections, the embedding and the head over
tp (KV projections too, unless there are fewer KV heads than ranks: then every rank keeps the
whole projection); norms and the
router whole; experts over ep (experts) and etp (hidden); a pipeline rank holds its stages'
layers, the first stage the embedding, the last the final norm and head; FSDP2 shards dense
parameters over dp·cp and experts over edp on dim 0, padding each to a multiple of the ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.pipeline.partition import rank_stages, stage_layers
from runtime.model import ModelArgs

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 4, "float64": 8}  # bf16 runs keep fp32 master weights


@dataclass(frozen=True)
class Tensor2D:
    """A parameter as (rows sharded by FSDP, elements per row) after TP/EP slicing."""

    rows: int
    cols: int
    expert: bool = False


def _attention_tensors(args: ModelArgs, tp: int) -> list[Tensor2D]:
    d, hd, h, a = args.dim, args.head_dim, args.n_heads, args.mla
    if a is None:
        kv_split = tp if args.n_kv_heads % tp == 0 else 1  # fewer KV heads than ranks: a full copy each
        return [Tensor2D(h * hd // tp, d), Tensor2D(args.n_kv_heads * hd // kv_split, d),
                Tensor2D(args.n_kv_heads * hd // kv_split, d), Tensor2D(d, h * hd // tp)]  # wq, wk, wv, wo
    # Latent attention: the down-projections and latent norms whole on every TP rank, the rest split.
    query = ([Tensor2D(a.q_lora_rank, d), Tensor2D(a.q_lora_rank, 1), Tensor2D(h * a.qk_head_dim // tp, a.q_lora_rank)]
             if a.q_lora_rank else [Tensor2D(h * a.qk_head_dim // tp, d)])
    return query + [Tensor2D(a.kv_lora_rank + a.qk_rope_head_dim, d), Tensor2D(a.kv_lora_rank, 1),
                    Tensor2D(h * (a.qk_nope_head_dim + a.v_head_dim) // tp, a.kv_lora_rank),
                    Tensor2D(d, h * a.v_head_dim // tp)]


def _block_tensors(args: ModelArgs, layer: int, tp: int, ep: int, etp: int) -> list[Tensor2D]:
    d = args.dim
    out = _attention_tensors(args, tp) + [Tensor2D(d, 1), Tensor2D(d, 1)]  # attention, two norms
    if args.is_moe(layer):
        m = args.moe
        local_e, hidden = m.num_experts // ep, m.expert_ffn_dim // etp
        out += [Tensor2D(m.num_experts, d)]  # router
        out += [Tensor2D(local_e, d * hidden, expert=True)] * 3  # w1, w3 [E, d, h]; w2 [E, h, d]
        if m.shared_experts:
            shared = m.expert_ffn_dim * m.shared_experts
            out += [Tensor2D(shared, d)] * 2 + [Tensor2D(d, shared)]  # whole on every TP rank (its router's tokens)
    else:
        out += [Tensor2D(args.ffn_dim // tp, d)] * 2 + [Tensor2D(d, args.ffn_dim // tp)]
    return out


def rank_elements(args: ModelArgs, tp: int, pp: int, vpp: int, cp: int, dp: int, ep: int, etp: int,
                  fsdp: bool, pp_rank: int, pp_layers=None, experts_only: bool = False) -> int:
    """Parameter elements pipeline rank `pp_rank` holds (every tp/dp/ep coordinate holds as
    many, up to FSDP's padding); `experts_only`: of them, the experts (reduced over EDP)."""
    world_stage = tp * cp * dp
    edp = world_stage // (etp * ep)
    tensors: list[Tensor2D] = []
    stages = stage_layers(args.n_layers, pp, vpp, pp_layers)
    for stage in rank_stages(pp, vpp, pp_rank):
        for layer in stages[stage]:
            tensors += _block_tensors(args, layer, tp, ep, etp)
        if stage == 0:
            tensors.append(Tensor2D(args.vocab_size // tp, args.dim))
        if stage == pp * vpp - 1:
            tensors += [Tensor2D(args.dim, 1), Tensor2D(args.vocab_size // tp, args.dim)]
            for layer in range(args.n_layers, args.n_layers + args.mtp_depth):  # multi-token prediction
                tensors += _block_tensors(args, layer, tp, ep, etp) + [Tensor2D(args.dim, 2 * args.dim)]
                tensors += [Tensor2D(args.dim, 1)] * 3
            if args.mtp_depth and pp * vpp > 1 and not args.tie_embeddings:  # its copy of the embedding
                tensors.append(Tensor2D(args.vocab_size // tp, args.dim))
    total = 0
    for t in tensors:
        if experts_only and not t.expert:
            continue
        shards = (edp if t.expert else dp * cp) if fsdp else 1
        total += math.ceil(t.rows / shards) * t.cols
    return total


@dataclass(frozen=True)
class StateBytes:
    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def state_bytes(elements: int, dtype: str) -> StateBytes:
    """Parameters, gradients and AdamW's two moments, in the master precision."""
    size = BYTES_PER_ELEMENT[dtype]
    return StateBytes(elements * size, elements * size, 2 * elements * size)


def in_flight(pp: int, vpp: int, schedule: str, microbatches: int) -> float:
    """Microbatches whose activations the busiest pipeline rank (the first) holds at its peak,
    in units of one microbatch through all of the rank's layers: 1 without a pipeline; 1F1B
    (and ZB-H1, whose deferred weight gradients keep only inputs) warm up pp microbatches;
    interleaving adds (pp−1)/(pp·vpp) (Narayanan et al., 2021, §2.2)."""
    if pp == 1:
        return 1.0
    depth = min(pp, microbatches)
    if schedule == "interleaved_1f1b":
        return min(depth * (1 + (pp - 1) / (pp * vpp)), microbatches)
    return float(depth)


def activation_bytes(per_token_layer: float, args: ModelArgs, tokens: int, tp: int, pp: int, vpp: int,
                     schedule: str, microbatches: int, ac: str, attention_share: float, dtype_bytes: int) -> float:
    """Activations the first pipeline rank holds at its peak. `per_token_layer`: bytes autograd
    saves per token in one block without parallelism (measured, planner/calibrate.py);
    `attention_share`: the part of it selective checkpointing recomputes. With TP, sequence
    parallelism splits all of a block's activations over tp (Korthikanti et al., 2022)."""
    layers = args.n_layers / pp
    per_layer = per_token_layer * tokens / tp
    if ac == "full":  # each block keeps its input; one block's activations live during recompute
        kept = layers * tokens * args.dim * dtype_bytes / tp
        return in_flight(pp, vpp, schedule, microbatches) * kept + per_layer
    if ac == "selective":
        per_layer *= 1 - attention_share
    return in_flight(pp, vpp, schedule, microbatches) * layers * per_layer


def logits_bytes(args: ModelArgs, tokens: int, tp: int) -> float:
    """The head's output, its fp32 log-softmax and their gradient, on the last stage."""
    return 3 * tokens * args.vocab_size / tp * 4
