"""Apply every parallelism to a meta-device model in one fixed order, materialise it, and hand
the training step (runtime/trainer.py) what it needs from parallel code: a plain record.

    pipeline split → tensor/sequence parallel → context parallel → expert parallel or FSSDP
    → zero-bubble weight deferral → activation checkpointing → compile → FSDP2/HSDP
    → materialise (the same numbers as one process) → DDP

Each strategy is `apply_<x>(chunk, groups, cfg)`, in `STRATEGIES`: it rewrites a pipeline chunk
in place, records the slices it makes in the chunk's sharding plan (`chunk.sharding`), and does
nothing when its dimension is 1 or it is not chosen. What the step needs afterwards is read off
the rewritten chunks — the loss from the chunk that holds the head, the token positions from
context parallelism, the MoE blocks from the modules — and strategy-specific work at the end of
each step (MoE balancing and statistics, FSSDP re-planning, the pipeline's measured bubble) is
a list of hooks the trainer runs without knowing what they are.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from parallel.activation_checkpoint import apply_ac
from parallel.collectives import all_reduce_grads
from parallel.compile import apply_compile
from parallel.context import apply_cp
from parallel.data_parallel import apply_ddp, apply_fsdp, gradient_sync
from parallel.expert import apply_ep, moe_step
from parallel.grad_norm import clip_grad_norm_
from parallel.groups import Groups
from parallel.materialize import canonical_name, initial_values, materialize
from parallel.pipeline.executor import PipelineExecutor, bubble_hook
from parallel.pipeline.partition import rank_stages, stage_layers
from parallel.pipeline.zero_bubble import apply_zero_bubble
from parallel.reduce import DataReducer
from parallel.sharding import ShardingPlan
from parallel.strategies.fssdp.layer import FSSDPExperts, apply_fssdp, fssdp_step
from parallel.tensor import apply_tp
from runtime.hf.checkpoint import HFFolder
from runtime.moe import MoE

# The order matters: tensor parallelism rewrites the dense modules, expert parallelism or FSSDP
# the MoE blocks; checkpointing and compile wrap the rewritten blocks; FSDP shards last.
STRATEGIES = (apply_tp, apply_cp, apply_ep, apply_fssdp, apply_zero_bubble, apply_ac, apply_compile, apply_fsdp)
# The parameter the first and last pipeline stages both hold when the part with the head needs
# the embedding (`split_for_pipeline`): copies kept equal, one "embedding" group apart.
SHARED_BY_ENDS = "tok_embeddings.weight"


@dataclass
class ParallelModel:
    """This rank's part of the model and the parallel services one training step uses."""

    chunks: list[nn.Module]  # this rank's model chunks (one unless pipelining with vpp > 1)
    stages: list[int]  # the pipeline stage of each chunk
    groups: Groups
    plan: ShardingPlan  # what part of each full parameter this rank holds
    positions: torch.Tensor  # the positions of this rank's tokens in the sequence
    loss_fn: Callable  # (logits, labels) -> the sum of this rank's token losses
    pipeline: PipelineExecutor | None  # the schedule's executor when pipelining, else None
    # Run after every step (optimizer stepped or skipped): hook(steps done, optimizer, metrics)
    # -> metrics to add. Registered by the strategies that need them.
    step_hooks: list[Callable] = field(default_factory=list)
    manual_ddp: bool = False  # data-parallel gradients summed after the step, not during backward

    @property
    def model(self) -> nn.Module:
        """The model on this rank when it holds one chunk (no pipeline or vpp = 1)."""
        if len(self.chunks) != 1:
            raise ValueError(f"this rank holds {len(self.chunks)} pipeline chunks")
        return self.chunks[0]

    def named_parameters(self):
        """(canonical name, parameter) over every local chunk."""
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                yield canonical_name(name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def local_batches(self, batches):
        """This rank's tokens of each microbatch: under context parallelism, its positions of
        each sequence (and their targets; the document index stays whole, as attention masks
        keys from every rank); otherwise the microbatches as they are."""
        if self.groups.size("cp") == 1:
            return batches
        pos = self.positions.cpu()
        return [type(b)(b.tokens[:, pos], b.labels[:, pos], b.documents) for b in batches]

    def gradient_sync(self, enabled: bool):
        """Reduce data-parallel gradients in this backward (`enabled`) or only accumulate them."""
        return gradient_sync(self.chunks[0], enabled)

    def reduce_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank count over the ranks that hold different data."""
        return DataReducer([self.groups["dp_cp"]]).sum(t)

    def reduce_loss(self, t: torch.Tensor) -> torch.Tensor:
        """Sum per-rank loss sums: over data ranks, and from the last pipeline stage to all."""
        return DataReducer([self.groups["dp_cp"], self.groups["pp"]]).sum(t)

    def finish_grads(self) -> None:
        """After the step's last backward: complete every gradient that is still partial."""
        for chunk in self.chunks:
            for experts in (m for m in chunk.modules() if isinstance(m, FSSDPExperts)):
                experts.finish()
        by_group: dict[str, list] = {}
        for n, p in self.named_parameters():
            if self.plan.partial_grad(n):
                by_group.setdefault(self.plan.partial_grad(n), []).append(p)
        for name, params in by_group.items():
            if self.groups[name] is not None:
                all_reduce_grads(params, self.groups[name])
        if self.manual_ddp:
            experts = {id(p) for chunk in self.chunks for m in chunk.modules() if isinstance(m, MoE)
                       for p in m.experts.parameters()}
            named = self.parameters()
            for group, params in (("dp_cp", [p for p in named if id(p) not in experts]),
                                  ("edp", [p for p in named if id(p) in experts])):
                if self.groups[group] is not None:
                    all_reduce_grads(params, self.groups[group])
        if self.groups.handles.get("embedding") is not None:  # the first and last stages' copies
            all_reduce_grads([p for n, p in self.named_parameters() if n == SHARED_BY_ENDS],
                             self.groups["embedding"])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to the global norm over every rank's pieces, each counted once."""
        pp = self.groups["pp"]
        entries = [(p, tuple(self.groups[g] for g in self.plan.split_groups(n)) + (pp,))
                   for n, p in self.named_parameters()]
        # The last stage's copy of the embeddings has the first stage's gradient: scaled, not counted.
        copies = ({id(p) for n, p in self.named_parameters() if n == SHARED_BY_ENDS}
                  if self.groups.handles.get("embedding") is not None and 0 not in self.stages else set())
        return clip_grad_norm_(entries, max_norm, uncounted=copies)


def mtp_step(head_chunk, groups, done: int, optimizer, metrics: dict) -> dict:
    """A step hook: multi-token prediction's weighted loss λ/D Σ_k L^k, normalised as the main
    loss is (its sum over the main loss's sum, times the main loss), then fresh sums."""
    sums = torch.zeros(2, dtype=torch.float64)
    if head_chunk is not None:
        sums += head_chunk.mtp_sums
        head_chunk.mtp_sums.zero_()
    DataReducer([groups["dp_cp"], groups["pp"]]).sum(sums)
    main, extra = sums.tolist()
    return {"mtp_loss": metrics["loss"] * extra / main if main else 0.0}


def split_for_pipeline(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """A copy of the meta-device `model` holding only `layers` (keyed by their global index),
    the embedding if it is the first stage and the norm, head and multi-token prediction blocks
    if it is the last (where the head is the embedding matrix, or MTP embeds tokens, the last
    stage has its own copy of it, kept equal to the first stage's by summing their gradients:
    `ParallelModel.finish_grads`)."""
    chunk = copy.deepcopy(model)
    for key in list(chunk.layers.keys()):
        if int(key) not in layers and not (last and int(key) >= model.args.n_layers):
            del chunk.layers[key]
    if not first and not (last and model.args.head_uses_embeddings):
        chunk.tok_embeddings = None
    if not last:
        chunk.norm = chunk.output = None
    return chunk


def pipeline_chunks(model: nn.Module, groups: Groups, parallel) -> tuple[list[nn.Module], list[int]]:
    """This rank's chunks of the model and their stages (the whole model, stage 0, without a
    pipeline). Chunk c of pipeline rank r is stage c·pp + r."""
    topo = groups.topology
    if topo.pp == 1:
        return [model], [0]
    layers = stage_layers(model.args.n_layers, topo.pp, parallel.vpp, parallel.pp_layers,
                          parallel.pp_count_embedding_head)
    stages = rank_stages(topo.pp, parallel.vpp, groups.index("pp"))
    n = topo.pp * parallel.vpp
    return [split_for_pipeline(model, layers[s], s == 0, s == n - 1) for s in stages], stages


def parallelize(model: nn.Module, groups: Groups, cfg, device: torch.device, tracer, values=None,
                storage=contextlib.nullcontext) -> ParallelModel:
    """Rewrite the meta-device `model` into this rank's chunks (run config `cfg`), give them real
    storage on `device` with the values one process would have (seed `cfg.seed`), and build
    what the step needs. `tracer`: runtime.trace.Tracer (the pipeline's timeline). A rehearsal
    (launch/rehearse.py) passes `values`, another source of initial values (empty blocks), and
    `storage`, the context the parameters are given storage in (a fake-tensor mode)."""
    topo, p = groups.topology, cfg.parallel
    padding = model.args.padded_vocab - model.args.vocab_size
    plan = ShardingPlan(padded_rows={"tok_embeddings.weight": padding, "output.weight": padding} if padding else {})
    # Initial values: a Hugging Face folder's (model=hf), or as the model declares them, by its
    # own modules, not the parallel ones that replace them (a meta-device copy costs no storage).
    if values is None:
        values = initial_values(copy.deepcopy(model).init_full, cfg.seed)
        if cfg.model.get("hf_path"):
            values = HFFolder(cfg.model.hf_path, model.args, fallback=values).values
    chunks, stages = pipeline_chunks(model, groups, p)
    for chunk in chunks:
        chunk.sharding = plan
        for apply in STRATEGIES:
            apply(chunk, groups, cfg)
    seq_len = cfg.train.seq_len
    positions = getattr(chunks[0], "positions", torch.arange(seq_len)).to(device)
    loss_fn = chunks[-1].loss_fn  # the last stage's, when this rank holds it (only it computes the loss)
    head_chunk = chunks[-1] if stages[-1] == topo.pp * p.vpp - 1 else None
    moe_layers = {m.layer: m for chunk in chunks for m in chunk.modules() if isinstance(m, MoE)}
    for m in moe_layers.values():  # the balancing losses are means over the global batch's microbatches
        m.loss_scale = cfg.train.micro_batch_size / cfg.train.global_batch_size
    # Real storage; DDP wraps a materialised model, or is done by hand after the step when the
    # model is pipelined or holds experts (which reduce over EDP, not the dense group).
    with storage():
        for chunk in chunks:
            materialize(chunk, values, device, plan)
    ddp = p.dp_impl.value == "ddp" and groups["dp_cp"] is not None
    manual_ddp = ddp and (topo.pp > 1 or bool(moe_layers))
    if ddp and not manual_ddp:
        chunks[0] = apply_ddp(chunks[0], groups["dp_cp"], device)
    pipeline = None
    if topo.pp > 1:
        # Stage boundaries carry this rank's activations: its CP share of the sequence, and its
        # SP share of that; a ladder model also sends the two branch outputs still to be added.
        seq_local = len(positions) // topo.tp if p.sp else len(positions)
        shape = (cfg.train.micro_batch_size, seq_local, model.args.dim)
        if model.args.residual == "ladder":
            shape = (3, *shape)
        # FSDP2's bf16 policy (apply_fsdp) computes each block in bf16, so its output crosses the
        # boundary in bf16; otherwise the residual stream keeps the parameters' dtype (autocast or not).
        fsdp_bf16 = isinstance(chunks[0], FSDPModule) and cfg.train.dtype.value == "bfloat16"
        act_dtype = torch.bfloat16 if fsdp_bf16 else next(chunks[0].parameters()).dtype
        pipeline = PipelineExecutor(chunks, stages, topo.pp * p.vpp, p.schedule, p.vpp, p.pp_group_size or topo.pp,
                                    groups, loss_fn, shape, act_dtype, positions, device, tracer)
    hooks = []
    if model.args.mtp_depth:
        hooks.append(functools.partial(mtp_step, head_chunk, groups))
    if model.args.moe is not None:  # also on a stage of dense layers only: the step's loads reduce over pp
        hooks.append(functools.partial(moe_step, moe_layers, groups, model.args))
    fssdp = {i: m.experts for i, m in moe_layers.items() if isinstance(m.experts, FSSDPExperts)}
    if fssdp:
        hooks.append(functools.partial(fssdp_step, fssdp, plan, p.fssdp.reshard_every))
    if pipeline is not None and tracer.enabled:
        hooks.append(functools.partial(bubble_hook, tracer, groups))
    return ParallelModel(chunks, stages, groups, plan, positions, loss_fn, pipeline, hooks, manual_ddp)
