"""The planner against the real thing: the parameter elements it says each rank holds are those
parallelize() gives it, for every parallelism that splits them."""
import pytest

from launch.config import compose
from launch.spawn import run_ranks
from launch.planner.layouts import Layout
from launch.planner.memory import rank_elements
from runtime.model import ModelArgs
from tests.training import SCRATCH_RUN_DIR

MOE = ["model=tiny_moe", "model.n_layers=4"]
LAYOUTS = {  # name: (world, overrides)
    "dp2-fsdp": (2, ["model=tiny"]),
    "dp2-ddp": (2, ["model=tiny", "parallel.dp_impl=ddp"]),
    "tp2-sp": (2, ["model=tiny", "parallel.tp=2", "parallel.sp=true"]),
    "tp4-kv-replicated": (4, ["model=tiny", "parallel.tp=4", "model.n_kv_heads=2"]),
    "pp2-vpp2": (2, ["model=tiny", "parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"]),
    "cp2": (2, ["model=tiny", "parallel.cp=2"]),
    "moe-ep2": (2, MOE + ["parallel.ep=2"]),
    "moe-ep2-dp4": (4, MOE + ["parallel.ep=2"]),
    "moe-tp2-ep2-etp2": (4, MOE + ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2"]),
    "moe-pp2-ep2": (4, MOE + ["parallel.pp=2", "parallel.ep=2"]),
}


def _held(rank, world, layouts):
    """Per layout: (parameter elements this rank holds, its pipeline rank)."""
    from launch.train import setup

    out = []
    for overrides in layouts:
        run = setup(compose([*overrides, "checkpoint.pool_mb=8", SCRATCH_RUN_DIR]))
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in run.parallel.parameters())
        out.append((local, run.groups.index("pp")))
    return out


@pytest.mark.parametrize("world", sorted({w for w, _ in LAYOUTS.values()}))
def test_elements_per_rank_are_what_parallelize_gives(world):
    names = [n for n, (w, _) in LAYOUTS.items() if w == world]
    per_rank = run_ranks(_held, world, args=([LAYOUTS[n][1] for n in names],))
    for i, name in enumerate(names):
        cfg = compose([*LAYOUTS[name][1], SCRATCH_RUN_DIR])
        lay, args = Layout.from_config(cfg, world), ModelArgs.from_config(cfg.model)
        for ranks in per_rank:
            held, pp_rank = ranks[i]
            expected = rank_elements(args, lay.tp, lay.pp, lay.vpp, lay.cp, lay.dp, lay.ep, lay.etp,
                                     cfg.parallel.dp_impl.value == "fsdp", pp_rank)
            assert held == expected, (name, held, expected)


def _probe(rank, world):
    import torch

    from parallel.strategies.holmes.placement import RankInfo
    from launch.planner.probe import probe
    from runtime.model import ModelArgs

    args = ModelArgs.from_config(compose(["model=tiny", SCRATCH_RUN_DIR]).model)
    ranks = [RankInfo(node=0, local_rank=i, nic="ib") for i in range(world)]
    return probe(ranks, torch.device("cpu"), torch.float32, args, seconds=0.1)


def test_the_probe_measures_what_the_planner_reads():
    from launch.planner.planner import CalibrationData

    first, other = run_ranks(_probe, 2)
    assert other is None  # rank 0 writes the calibration
    cal = CalibrationData.from_probe({**first, "floor_bytes": 1.0, "memory_bytes": 2.0}, "tiny")
    assert cal.device_flops > 0 and cal.device_flops_shared > 0 and cal.memory_bandwidth > 0
    assert set(cal.links) == {"intra"} and cal.links["intra"] > 0 and cal.latency_s > 0
    # Every collective the step-time model uses has a measured cost against its ring, and a call
    # a fixed cost.
    assert set(cal.collective_cost) == {"reduce_scatter", "all_reduce", "all_to_all", "ring_pass"}
    assert all(v > 0 for v in cal.collective_cost.values()) and cal.collective_call_s >= 0
    rates = cal.link_rates(compose(["run_dir=unused"]).cluster)
    assert rates.cost == cal.collective_cost and rates.call_s == cal.collective_call_s
    # FSDP2's hooks and copies, measured on a block sharded over the pair.
    assert set(cal.fsdp_cost) == {"hook_s", "gather_s", "reduce_s"}
    assert all(v >= 0 for v in cal.fsdp_cost.values()) and cal.fsdp_cost["hook_s"] > 0
