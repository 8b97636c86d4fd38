"""Rank every valid layout of a model on a cluster by estimated step time, among those whose
estimated peak memory fits a rank.

    plan = make_plan(cfg, processes, calibration)
    plan.fitting[0]            # the fastest layout that fits
    plan.smallest              # the layout needing the least memory (when nothing fits)

Pure arithmetic over launch.validate's layouts (launch/planner/layouts.py), planner/estimate.py's
memory and planner/steptime.py's time; the only measurement is `calibration`'s.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from parallel.mesh import Topology
from parallel.strategies.holmes.network import GBIT, place
from parallel.strategies.holmes.placement import RankInfo
from launch.planner.calibrate import memory_calibration
from launch.planner.estimate import Calibration, MemoryEstimate, estimate_memory
from launch.planner.layouts import Layout, valid_layouts
from launch.planner.links import LinkRates, Links
from launch.planner.memory import rank_elements
from launch.planner.steptime import DeviceRates, StepTime, estimate_step
from runtime.model import ModelArgs


@dataclass(frozen=True)
class CalibrationData:
    """What `launch.plan --probe` measured (or what the cluster description says)."""

    device_flops: float
    memory_bandwidth: float
    floor_bytes: float
    memory_bytes: float  # what one rank may use
    links: dict[str, float] = field(default_factory=dict)  # intra, a NIC class, cross -> bytes/s
    latency_s: float = 0.0  # of a message, the job otherwise idle
    loaded_latency_s: float = 0.0  # of a message while the other ranks compute
    device_flops_shared: float | None = None  # per rank, every rank computing
    block_overhead_s: float = 0.0
    memory: dict | None = None  # planner/estimate.py's Calibration for the model, less the floor
    collective_cost: dict[str, float] = field(default_factory=dict)  # LinkRates.cost
    collective_call_s: float = 0.0  # LinkRates.call_s
    fsdp_cost: dict[str, float] = field(default_factory=dict)  # probe.fsdp_costs: hook_s, gather_s, reduce_s

    @classmethod
    def from_probe(cls, data: dict, model: str | None) -> "CalibrationData":
        """A probe file's contents; its memory calibration only if it was measured for `model`
        (activations and heap growth are the model's own)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"memory"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   memory=data.get("memory") if data.get("model") == model else None)

    def link_rates(self, cluster) -> LinkRates:
        """Measured links where the probe found them, else the cluster description's rates."""
        nic = {name: self.links.get(name, spec.gbps * GBIT) for name, spec in cluster.classes.items()}
        cross = self.links.get("cross", cluster.cross_gbps * GBIT if cluster.cross_gbps else None)
        return LinkRates(intra_node=self.links.get("intra", float("inf")), nic=nic, cross_class=cross,
                         latency_s=max(self.latency_s, self.loaded_latency_s), cost=self.collective_cost,
                         call_s=self.collective_call_s)


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    config: DictConfig

    def tokens_per_s(self, global_batch_size: int, seq_len: int) -> float:
        return global_batch_size * seq_len / self.time.total


@dataclass
class Plan:
    fitting: list[Estimate]  # fastest first
    too_big: list[Estimate]  # least memory first
    memory_bytes: float

    @property
    def smallest(self) -> Estimate | None:
        return self.too_big[0] if self.too_big else None


def calibration_dtype(name: str) -> torch.dtype:
    """The dtype a run of `train.dtype=name` computes its blocks in."""
    return {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(name, torch.float32)


def make_plan(cfg: DictConfig, processes: list[RankInfo], calibration: CalibrationData,
              layouts: list[tuple[Layout, DictConfig]] | None = None) -> Plan:
    world = len(processes)
    args = ModelArgs.from_config(cfg.model)
    t = cfg.train
    dtype, dp_impl = t.dtype.value, cfg.parallel.dp_impl.value
    if calibration.memory is not None:
        memory_cal = Calibration(floor_bytes=calibration.floor_bytes, **calibration.memory)
    else:
        memory_cal = memory_calibration(args, calibration_dtype(dtype), calibration.floor_bytes)
    fsdp = calibration.fsdp_cost
    device = DeviceRates(calibration.device_flops, calibration.memory_bandwidth, calibration.block_overhead_s,
                         calibration.device_flops_shared, fsdp_hook_s=fsdp.get("hook_s", 0.0),
                         fsdp_gather_s=fsdp.get("gather_s", 0.0), fsdp_reduce_s=fsdp.get("reduce_s", 0.0))
    link_rates = calibration.link_rates(cfg.cluster)
    links_of: dict[tuple, Links] = {}
    fitting, too_big = [], []
    for layout, merged in (layouts if layouts is not None else valid_layouts(cfg, world)):
        key = (layout.tp, layout.pp, layout.cp, layout.dp, layout.ep, layout.etp)
        if key not in links_of:
            topo = Topology.from_config(merged.parallel, world)
            links_of[key] = Links(place(topo, processes, cfg.cluster, cfg.parallel.placement), processes,
                                  link_rates)
        memory = estimate_memory(args, layout, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                 dtype=dtype, dp_impl=dp_impl, calibration=memory_cal)
        fsdp = dp_impl == "fsdp" and layout.dp * layout.cp > 1
        sizes = (args, layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp, layout.ep, layout.etp, fsdp, 0)
        # Pipeline rank 0 stands for all: stages are balanced by layers (the time model takes
        # the heaviest chunk's durations separately).
        step = estimate_step(args, layout, links_of[key], device, seq_len=t.seq_len,
                             global_batch_size=t.global_batch_size, dtype=dtype, dp_impl=dp_impl,
                             reshard_after_forward=cfg.parallel.reshard_after_forward,
                             cp_impl=cfg.parallel.cp_impl, local_elements=rank_elements(*sizes),
                             expert_elements=rank_elements(*sizes, experts_only=True))
        estimate = Estimate(layout, memory, step, merged)
        (fitting if memory.total <= calibration.memory_bytes else too_big).append(estimate)
    fitting.sort(key=lambda e: (e.time.total, e.memory.total))
    too_big.sort(key=lambda e: e.memory.total)
    return Plan(fitting, too_big, calibration.memory_bytes)
