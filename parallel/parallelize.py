"""Apply every parallelism to a meta-device model, in DESIGN.md's fixed order, and give the
trainer what it needs: the local model chunks, the step's forward/backward over microbatches,
gradient completion, clipping and the reductions of loss and token counts.

    pipeline split → tensor/sequence parallel → context parallel → expert parallel (or FSSDP)
    → activation checkpointing → compile → data parallel (FSDP2 / HSDP / DDP)

Only the stages that exist so far are applied; each lives in its own module.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from parallel.activation_checkpoint import apply_ac
from parallel.collectives import all_gather_along, all_gather_tensor, all_reduce_grads
from parallel.compile import apply_compile
from parallel.context import apply_cp
from parallel.data_parallel import apply_ddp, apply_fsdp
from parallel.expert import apply_ep
from parallel.strategies.fssdp.layer import FSSDPExperts, MaterializedMemory, apply_fssdp
from parallel.grad_norm import clip_grad_norm_
from parallel.groups import Groups
from parallel.materialize import canonical_name, materialize
from parallel.microbatch import SequentialExecutor
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.partition import rank_stages, stage_layers
from parallel.pipeline.zero_bubble import WeightGradStore, defer_weight_grads
from parallel.reduce import DataReducer
from parallel.sharding import ShardingPlan
from parallel.tensor import apply_tp


@dataclass
class Parallelized:
    chunks: list[nn.Module]  # this rank's model chunks (one unless pipelining with vpp > 1)
    stages: list[int]  # the pipeline stage of each chunk
    loss_fn: Callable  # (logits, labels) -> sum of token losses on this rank's part
    plan: ShardingPlan
    groups: Groups
    parallel_cfg: object
    init_full: Callable
    store: WeightGradStore | None = None
    positions: torch.Tensor | None = None  # this rank's token positions under context parallelism
    moe_layers: dict[int, nn.Module] = field(default_factory=dict)  # global layer index -> MoE block
    model_args: object = None  # runtime.model.ModelArgs of the whole model
    fssdp_memory: MaterializedMemory | None = None  # FSSDP's materialised expert bytes on this rank
    executor: object = field(default=None, repr=False)

    @property
    def topology(self):
        return self.groups.topology

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

    @property
    def manual_ddp(self) -> bool:
        """DDP done by hand after the step's backward: pipelined chunks, and MoE models (whose
        experts reduce over EDP, not the dense group) have no DDP wrapper."""
        return self.parallel_cfg.dp_impl.value == "ddp" and (self.topology.pp > 1 or bool(self.moe_layers))

    def materialize(self, device: torch.device, seed: int) -> None:
        """Real storage with layout-independent values; DDP wraps the materialised model."""
        for chunk in self.chunks:
            materialize(chunk, self.init_full, device, seed, self.plan)
        dp = self.groups["dp_cp"]
        if self.parallel_cfg.dp_impl.value == "ddp" and dp is not None and not self.manual_ddp:
            self.chunks[0] = apply_ddp(self.chunks[0], dp, device)

    def build_executor(self, device: torch.device, tracer, seq_len: int, micro_batch: int) -> None:
        t, p = self.topology, self.parallel_cfg
        positions = self.positions if self.positions is not None else torch.arange(seq_len)
        positions = positions.to(device)
        if t.pp == 1:
            self.executor = SequentialExecutor(self.chunks[0], self.loss_fn, positions, device, tracer)
            return
        # Stage boundaries carry this rank's activations: its CP share of the sequence, and its
        # SP share of that; a ladder model also sends the two branch outputs still to be added.
        seq_local = len(positions) // t.tp if p.sp else len(positions)
        shape = (micro_batch, seq_local, self.model_args.dim)
        if self.model_args.residual == "ladder":
            shape = (3, *shape)
        dtype = next(self.chunks[0].parameters()).dtype
        self.executor = PipelineExecutor(
            self.chunks, self.stages, t.pp * p.vpp, p.schedule, p.vpp, p.pp_group_size or t.pp, self.groups,
            self.loss_fn, shape, dtype, positions, device, tracer, self.store)

    def local_batches(self, batches):
        """This rank's part of each microbatch: under context parallelism, its tokens of each
        sequence (and their targets); otherwise the microbatches as they are."""
        if self.positions is None:
            return batches
        pos = self.positions.cpu()
        return [type(b)(b.tokens[:, pos], b.labels[:, pos]) for b in batches]

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The whole vocabulary's logits from this rank's part (tensor parallelism splits the
        head by vocabulary rows), for generation."""
        return all_gather_along(logits, -1, self.groups["tp"]) if self.groups["tp"] is not None else logits

    def set_global_microbatches(self, n: int) -> None:
        """The step's MoE balancing losses are means over all `n` microbatches of the global batch,
        whichever rank runs them."""
        for m in self.moe_layers.values():
            m.loss_scale = 1.0 / n

    def forward_backward(self, batches, normalizer: float, autocast) -> torch.Tensor:
        """Run this rank's microbatches (from `local_batches`); returns its loss sum."""
        return self.executor.forward_backward(batches, normalizer, autocast)

    def reduce_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank count over the ranks that hold different data."""
        return DataReducer([self.groups["dp_cp"]]).sum(t)

    def reduce_loss(self, t: torch.Tensor) -> torch.Tensor:
        """Sum per-rank loss sums: over data ranks, and from the last pipeline stage to all."""
        return DataReducer([self.groups["dp_cp"], self.groups["pp"]]).sum(t)

    def any_rank(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag OR-ed over every rank (one small all-reduce on the default group)."""
        if dist.get_world_size() == 1:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather_ranks(self, values: list[float], device: torch.device) -> list[list[float]]:
        """Every rank's `values`, by rank (one small all-gather on the default group)."""
        world = dist.get_world_size()
        if world == 1:
            return [list(values)]
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        out = torch.empty(world * len(values), dtype=torch.float64, device=device)
        all_gather_tensor(out, mine)
        return out.view(world, len(values)).tolist()

    def mutates_state_before(self, step: int) -> bool:
        """Whether begin_step(step) changes parameters or optimizer state (FSSDP re-sharding):
        a pending checkpoint copy must finish first."""
        every = self.parallel_cfg.fssdp.reshard_every
        return bool(self.fssdp_layers()) and bool(every) and step > 0 and step % every == 0

    def fssdp_layers(self) -> list[FSSDPExperts]:
        return [m.experts for m in self.moe_layers.values() if isinstance(m.experts, FSSDPExperts)]

    def begin_step(self, step: int, optimizer) -> None:
        """Before the step's first forward: FSSDP re-plans ownership every N steps (moving rows
        and optimizer state) and plans this step's replicas."""
        cfg = self.parallel_cfg.fssdp
        for layer, m in self.moe_layers.items():
            if isinstance(m.experts, FSSDPExperts):
                if cfg.reshard_every and step > 0 and step % cfg.reshard_every == 0:
                    m.experts.reshard(optimizer, self.plan, f"layers.{layer}.feed_forward.experts")
                m.experts.plan_step()

    def finish_grads(self) -> None:
        """After the step's last backward: complete every gradient that is still partial."""
        for experts in self.fssdp_layers():
            experts.finish()
        by_group: dict[str, list] = {}
        for n, p in self.named_parameters():
            if self.plan.partial_grad(n):
                by_group.setdefault(self.plan.partial_grad(n), []).append(p)
        for name, params in by_group.items():
            if self.groups[name] is not None:
                all_reduce_grads(params, self.groups[name])
        if self.manual_ddp:
            experts = {id(p) for m in self.moe_layers.values() for p in m.experts.parameters()}
            named = self.parameters()
            for group, params in (("dp_cp", [p for p in named if id(p) not in experts]),
                                  ("edp", [p for p in named if id(p) in experts])):
                if self.groups[group] is not None:
                    all_reduce_grads(params, self.groups[group])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        pp = self.groups["pp"]
        entries = [(p, tuple(self.groups[g] for g in self.plan.split_groups(n)) + (pp,))
                   for n, p in self.named_parameters()]
        return clip_grad_norm_(entries, max_norm)

    def moe_step(self) -> dict:
        """After the optimizer step: the step's auxiliary and z losses and each MoE layer's
        global expert load (tokens per expert), the aux-loss-free bias update from those loads,
        and fresh statistics for the next step. Every rank calls it (it reduces)."""
        args = self.model_args
        if args.moe is None:
            return {}
        n_layers, moe = args.n_layers, args.moe
        # Rows of every MoE layer of the model; each pipeline stage fills its own.
        loads = torch.zeros(n_layers, moe.num_experts, dtype=torch.float64)
        losses = torch.zeros(2, dtype=torch.float64)
        for layer, m in self.moe_layers.items():
            loads[layer] = m.step_counts
            losses += torch.stack([m.step_aux, m.step_z])
        # Counts and losses are already summed over the ranks sharing a microbatch's tokens (TP
        # with SP, and CP); data ranks hold different microbatches, pipeline ranks other layers.
        DataReducer([self.groups["dp"], self.groups["pp"]]).sum(loads)
        if self.groups.index("cp") != 0 or self.groups.index("tp") != 0:
            losses.zero_()  # counted once per token group
        DataReducer([self.groups["dp_cp"], self.groups["tp"], self.groups["pp"]]).sum(losses)
        for layer, m in self.moe_layers.items():
            m.update_bias(loads[layer])
            m.reset_step_stats()
            if isinstance(m.experts, FSSDPExperts):
                m.experts.observe(loads[layer].tolist())
        moe_rows = [i for i in range(n_layers) if args.is_moe(i)]
        return {"aux_loss": losses[0].item(), "z_loss": losses[1].item(),
                "expert_load": {str(i): loads[i].tolist() for i in moe_rows}}

    def pipeline_bubble(self, tracer) -> float | None:
        """The last step's measured bubble, averaged over pipeline ranks (None without tracing)."""
        if self.topology.pp == 1 or tracer.bubble is None:
            return None
        t = torch.tensor([tracer.bubble], dtype=torch.float64)
        dist.all_reduce(t, group=self.groups["pp"])
        return t.item() / self.topology.pp


def split_for_pipeline(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """A copy of the meta-device `model` holding only `layers` (keyed by their global index),
    the embedding if it is the first stage and the norm and head if it is the last."""
    chunk = copy.deepcopy(model)
    for key in list(chunk.layers.keys()):
        if int(key) not in layers:
            del chunk.layers[key]
    if not first:
        chunk.tok_embeddings = None
    if not last:
        chunk.norm = chunk.output = None
    return chunk


def parallelize(model: nn.Module, groups: Groups, parallel, loss_fn: Callable, seq_len: int,
                node_size: int = 0, compile_mode: str | None = None,
                mp_policy: MixedPrecisionPolicy | None = None) -> Parallelized:
    """Rewrite the meta-device `model` into this rank's chunks. `loss_fn` is the single-process
    loss, replaced where a parallelism computes it differently (vocabulary-parallel with TP).
    `compile_mode`: torch.compile each block in that mode (None: eager). `mp_policy`: FSDP2's
    mixed precision (parameters gathered in bf16, gradients reduced in `parallel.reduce_dtype`)."""
    topo, plan = groups.topology, ShardingPlan()
    init_full = model.init_full
    # 1. Pipeline split.
    if topo.pp > 1:
        layers = stage_layers(model.args.n_layers, topo.pp, parallel.vpp, parallel.pp_layers,
                              parallel.pp_count_embedding_head)
        stages = rank_stages(topo.pp, parallel.vpp, groups.index("pp"))
        n = topo.pp * parallel.vpp
        chunks = [split_for_pipeline(model, layers[s], s == 0, s == n - 1) for s in stages]
    else:
        chunks, stages = [model], [0]
    # 2. Tensor and sequence parallelism.
    if topo.tp > 1:
        for chunk in chunks:
            loss_fn = apply_tp(chunk, groups["tp"], groups.index("tp"), topo.tp, parallel.sp, plan)
    # 3. Context parallelism.
    positions = None
    if topo.cp > 1:
        for chunk in chunks:
            positions = apply_cp(chunk, groups, parallel.cp_impl, seq_len)
    # 4. Expert parallelism or FSSDP (and MoE statistics over the ranks sharing tokens).
    moe_layers, memory = {}, None
    if model.args.moe is not None:
        if parallel.moe_backend == "fssdp":
            ep_ranks = groups.ranks["ep"]
            node_of = (lambda d: ep_ranks[d] // node_size) if node_size else (lambda d: 0)
            memory = MaterializedMemory()
        for chunk in chunks:
            found = apply_fssdp(chunk, groups, plan, parallel.fssdp, parallel.sp, node_of, memory) \
                if parallel.moe_backend == "fssdp" else apply_ep(chunk, groups, plan, parallel.sp)
            moe_layers.update({moe.layer: moe for moe in found})
    store = None
    if topo.pp > 1 and parallel.schedule == "zero_bubble":
        store = WeightGradStore()
        for chunk in chunks:
            defer_weight_grads(chunk, store)
    # 5. Activation checkpointing.
    for chunk in chunks:
        apply_ac(chunk, parallel.activation_checkpoint.value)
    # 6. Compile each block.
    if compile_mode is not None:
        for chunk in chunks:
            apply_compile(chunk, compile_mode)
    # 7. Data parallelism (DDP wraps after materialisation; pipelined DDP reduces by hand).
    if groups["dp_cp"] is not None and parallel.dp_impl.value == "fsdp":
        mesh = groups.hsdp_mesh() if topo.dp_replicate > 1 else groups.device_mesh("dp_cp")
        # Inside a pipeline schedule a chunk stays gathered from forward to its last backward.
        reshard = parallel.reshard_after_forward and topo.pp == 1
        expert_mesh = groups.device_mesh("edp") if groups["edp"] is not None else None
        for chunk in chunks:
            experts = [m.experts for m in moe_layers.values() if any(m is x for x in chunk.modules())]
            apply_fsdp(chunk, mesh, reshard_after_forward=reshard, expert_mesh=expert_mesh, experts=experts,
                       mp_policy=mp_policy)
    return Parallelized(chunks, stages, loss_fn, plan, groups, parallel, init_full, store, positions, moe_layers,
                        model.args, memory)
