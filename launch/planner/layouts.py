"""The layouts a planner chooses among: every combination of tp, pp, vpp, cp, ep, etp (dp fills
the world), micro-batch size, activation checkpointing, pipeline schedule and MoE backend that
`launch.validate` accepts for the model, batch and world size.

Validity is launch.validate's, not a copy of its rules: each candidate's overrides are merged
onto the base config and validated, so the planner never proposes what `launch.train` refuses.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    ep: int
    etp: int
    micro_batch_size: int
    activation_checkpoint: str  # none | selective | full
    schedule: str  # 1f1b | interleaved_1f1b | zero_bubble
    moe_backend: str  # ep | fssdp

    @classmethod
    def from_config(cls, cfg: DictConfig, world: int) -> "Layout":
        """The layout a composed config describes on `world` ranks."""
        p = cfg.parallel
        return cls(p.tp, p.pp, p.vpp, p.cp, world // (p.tp * p.pp * p.cp), p.ep, p.tp if p.etp == -1 else p.etp,
                   cfg.train.micro_batch_size, p.activation_checkpoint.value, p.schedule, p.moe_backend)

    def overrides(self) -> list[str]:
        """The Hydra overrides that give this layout (sequence parallelism with any TP)."""
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.vpp={self.vpp}",
                f"parallel.cp={self.cp}", f"parallel.dp={self.dp}", f"parallel.ep={self.ep}",
                f"parallel.etp={self.etp}", f"parallel.sp={str(self.tp > 1).lower()}",
                f"parallel.schedule={self.schedule}", f"parallel.moe_backend={self.moe_backend}",
                f"parallel.activation_checkpoint={self.activation_checkpoint}",
                f"train.micro_batch_size={self.micro_batch_size}"]

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}" + (f"v{self.vpp}" if self.vpp > 1 else ""), f"cp{self.cp}",
                 f"dp{self.dp}"]
        if self.ep > 1 or self.moe_backend != "ep":
            parts.append(f"ep{self.ep}" + (f"etp{self.etp}" if self.etp > 1 else "")
                         + ("-fssdp" if self.moe_backend == "fssdp" else ""))
        parts.append(f"mb{self.micro_batch_size}")
        if self.activation_checkpoint != "none":
            parts.append(f"ac-{self.activation_checkpoint}")
        if self.pp > 1:
            parts.append({"1f1b": "1f1b", "interleaved_1f1b": "interleaved", "zero_bubble": "zb"}[self.schedule])
        return " ".join(parts)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: DictConfig, world: int):
    """Every combination of the planner's choices for `world` ranks, before validation."""
    moe = cfg.model.moe.num_experts > 0
    for tp, pp, cp in itertools.product(divisors(world), repeat=3):
        if world % (tp * pp * cp):
            continue
        dp = world // (tp * pp * cp)
        for vpp, schedule in ([(1, "1f1b")] if pp == 1 else [(1, "1f1b"), (1, "zero_bubble"), (2, "interleaved_1f1b")]):
            expert = itertools.product(divisors(tp * cp * dp), sorted({1, tp}), ("ep", "fssdp")) if moe else [(1, tp, "ep")]
            for ep, etp, backend in expert:
                if backend == "fssdp" and (ep == 1 or etp > 1):
                    continue
                per_rank = cfg.train.global_batch_size // dp if cfg.train.global_batch_size % dp == 0 else 0
                for mb in divisors(per_rank) if per_rank else []:
                    for ac in ("none", "selective", "full"):
                        yield Layout(tp, pp, vpp, cp, dp, ep, etp, mb, ac, schedule, backend)


def valid_layouts(cfg: DictConfig, world: int) -> list[tuple[Layout, DictConfig]]:
    """The candidates launch.validate accepts, each with its full config."""
    from launch.validate import ConfigError, validate

    out = []
    for layout in candidates(cfg, world):
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(layout.overrides()))
        try:
            validate(merged, world)
        except ConfigError:
            continue
        out.append((layout, merged))
    return out
