"""Choose the layout: every valid 5D layout of a model on a cluster, ranked by estimated step
time among those whose estimated peak memory fits a rank.

    python -m launch.plan model=tiny_moe cluster=mixed_4x2 train.global_batch_size=32
    python -m launch.plan world_size=8 model=tiny --top 10 --write planned
    python -m launch.plan world_size=8 model=tiny --rehearse      # each of the top layouts rehearsed
    python -m launch.train parallel=planned ...          # the written layout

    torchrun --nproc-per-node 2 ... -m launch.plan --probe calibration.json cluster=mixed_4x2
    python -m launch.plan cluster=mixed_4x2 --calibration calibration.json

The world is the described cluster's processes (`cluster=<name>`), or `world_size=N` ranks on
one node. Rates come from a probe file (`--probe`, run on the cluster itself; launch/planner/
probe.py lists what it measures: FLOP/s alone and with every rank busy, a block's fixed cost,
memory bandwidth, each link class, each collective's cost and a call's, FSDP2's own costs, the
runtime's memory floor); without one, this machine is measured in one process (the floor, FLOP/s
shared among a node's ranks, memory bandwidth, a block's fixed cost) and links are the cluster
description's `gbps`, collectives cost what the ring says and FSDP's copies nothing.
`--memory-gib` overrides the memory a rank may use (default: the probe's, else this machine's
GPU memory or its host memory shared by a node's ranks). `--rehearse` runs each of the `--top`
layouts through launch/rehearse.py (its ranks that differ, one whole step on fake tensors): a
layout whose rehearsed peak does not fit is dropped, and the table shows the rehearsed peak (the
busiest rank's) beside the estimate.

Exit codes: 0 a plan, 2 bad input, 3 no layout fits (the message says by how much).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.config import CONFIG_DIR, compose
from launch.validate import ConfigError
from parallel.strategies.holmes.placement import RankInfo, described_ranks
from launch.planner.estimate import MemoryEstimate
from launch.planner.planner import CalibrationData, Estimate, Plan, calibration_dtype, make_plan
from launch.planner.calibrate import FLOOR_MODEL, memory_calibration
from launch.planner.probe import block_overhead, memory_bandwidth
from runtime.accounting import probe_peak_flops
from runtime.model import ModelArgs

EXIT_BAD_CONFIG, EXIT_NO_FIT = 2, 3
GIB = 2**30


def fail(message: str, code: int = EXIT_BAD_CONFIG) -> None:
    print(f"quintet: {message}", file=sys.stderr)
    sys.exit(code)


def processes_of(cfg, world_size: int | None) -> list[RankInfo]:
    if cfg.cluster.nodes:
        described = described_ranks(cfg.cluster.nodes, sum(n.ranks for n in cfg.cluster.nodes))
        if world_size not in (None, len(described)):
            raise ConfigError([f"world_size={world_size} but cluster={cfg.cluster.name} describes "
                               f"{len(described)} processes; leave world_size out"])
        return described
    if world_size is None:
        raise ConfigError([f"cluster={cfg.cluster.name} describes no nodes: give world_size=N (ranks on one node) "
                           "or a described cluster (cluster=mixed_4x2)"])
    if world_size < 1:
        raise ConfigError([f"world_size={world_size} must be ≥ 1"])
    return [RankInfo(node=0, local_rank=i, nic="ethernet") for i in range(world_size)]


def _train_floor(cfg, run_dir: str, world: int) -> float:
    """Peak bytes of a rank training the floor model (a collective when distributed)."""
    from launch.train import run
    from runtime.metrics import read_metrics

    overrides = [f"{k}={v}" for k, v in [("train.steps", 2), ("checkpoint.every", 0), ("logging.every", 1000),
                                         ("logging.wandb.mode", "disabled"), ("run_dir", run_dir)]]
    floor = OmegaConf.merge(cfg, OmegaConf.from_dotlist([*FLOOR_MODEL, *overrides,
                                                         "parallel.tp=1", "parallel.pp=1", "parallel.cp=1",
                                                         "parallel.ep=1", "parallel.dp=-1",
                                                         "train.micro_batch_size=1",
                                                         f"train.global_batch_size={world}"]))
    run(floor)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the metrics
    return max(max(r["memory_gib_ranks"]) for r in read_metrics(run_dir)) * GIB


def _rank_memory(device: torch.device, ranks_on_node: int) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / ranks_on_node


def local_calibration(cfg, processes: list[RankInfo]) -> CalibrationData:
    """This machine, measured in one process, standing for every rank of the plan."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    per_node = max(sum(p.node == n for p in processes) for n in {p.node for p in processes})
    with tempfile.TemporaryDirectory(prefix="quintet-floor-") as run_dir:
        floor = _train_floor(cfg, run_dir, 1)
    if dist.is_initialized():
        dist.destroy_process_group()
    flops = probe_peak_flops(device, torch.float32, seconds=0.5)
    stream = memory_bandwidth(device)
    share = per_node if device.type == "cpu" else 1  # CPU ranks of a node share its cores
    return CalibrationData(device_flops=flops, memory_bandwidth=stream / share, floor_bytes=floor,
                           memory_bytes=_rank_memory(device, per_node), links={"intra": stream / 3},
                           device_flops_shared=flops / share,
                           block_overhead_s=block_overhead(ModelArgs.from_config(cfg.model), device, flops))


def load_calibration(path: str, processes: list[RankInfo], model: str | None = None) -> CalibrationData:
    """A probe's file, refused when it cannot be read or was measured on other processes."""
    try:
        data = json.loads(Path(path).read_text())
        probed = [tuple(p) for p in data["processes"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError([f"--calibration {path} is not a probe's file ({e!r}); write one with --probe"]) from e
    wanted = [(p.node, p.local_rank, p.nic) for p in processes]
    if probed != wanted:
        raise ConfigError([f"--calibration {path} was probed on processes (node, local rank, nic) {probed}, "
                           f"but this plan is for {wanted}: probe this cluster (--probe)"])
    # What the probe measures on two or more processes; a file without it is an older probe's,
    # and planning with it would price collectives by the ring alone and FSDP's copies at nothing.
    missing = [k for k in ("collective_cost", "collective_call_s", "fsdp_cost") if k not in data]
    if len(probed) > 1 and missing:
        raise ConfigError([f"--calibration {path} was written by an older probe: it lacks {', '.join(missing)}; "
                           "probe this cluster again (--probe)"])
    try:
        return CalibrationData.from_probe(data, model)
    except TypeError as e:  # a field missing or of another version
        raise ConfigError([f"--calibration {path}: {e}; probe again with --probe"]) from e


def run_probe(cfg, out: str) -> None:
    """Every rank of a torchrun/Slurm job: train the floor model, then measure; rank 0 writes `out`."""
    from launch import env as launch_env
    from parallel.strategies.holmes.network import process_ranks
    from launch.planner.probe import probe

    launch = launch_env.detect()
    run_dir = str(Path(cfg.run_dir) / "probe-floor")  # shared by the job's ranks, as a run's is
    floor = _train_floor(cfg, run_dir, launch.world_size)  # joins the job's process group, which stays for the probe
    device = torch.device("cuda", launch.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    ranks = process_ranks(cfg.cluster, launch.world_size, launch.node_rank, launch.local_rank,
                          os.environ.get("QUINTET_NIC_CLASS", "ethernet"))
    per_node = sum(r.node == ranks[launch.rank].node for r in ranks)
    memory = [None] * launch.world_size
    dist.all_gather_object(memory, _rank_memory(device, per_node))
    result = probe(ranks, device, torch.float32, ModelArgs.from_config(cfg.model))
    if result is not None:
        # The model's activations and (on CPU) heap growth, measured beside the cluster's rates.
        dtype = calibration_dtype(cfg.train.dtype.value)
        calibration = dataclasses.asdict(memory_calibration(ModelArgs.from_config(cfg.model), dtype, floor, device))
        calibration.pop("floor_bytes")
        result |= {"floor_bytes": floor, "memory_bytes": min(memory), "date": time.strftime("%Y-%m-%d"),
                   "model": cfg.model.name, "memory": calibration}
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"probe: {json.dumps(result)}", flush=True)
    dist.destroy_process_group()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f}"


def describe_plan(plan: Plan, cfg, top: int, rehearsed: dict | None = None) -> str:
    """The ranked table; with `rehearsed` ({id(estimate): the busiest rank's rehearsed peak}),
    that figure beside the estimate."""
    t = cfg.train
    lines = [f"{len(plan.fitting)} layouts fit {plan.memory_bytes / GIB:.2f} GiB per rank "
             f"({len(plan.too_big)} do not); fastest first (estimates):", ""]
    parts = [f.name for f in dataclasses.fields(MemoryEstimate) if f.name != "pp_rank"]
    header = (f"{'#':>3} {'layout':<44} {'step ms':>8} {'tok/s':>9} {'GiB':>6} "
              + (f"{'rehearsed':>10} " if rehearsed is not None else "") + f"|{'compute':>8}{'tp':>8}{'cp':>8}"
              f"{'ep':>8}{'pp':>8}{'bubble':>8}{'dp':>8}{'optim':>8}{'shared':>8} | MiB: " + " ".join(parts))
    lines += [header, "-" * len(header)]
    for i, e in enumerate(plan.fitting[:top], 1):
        s, m = e.time, e.memory
        lines.append(f"{i:>3} {e.layout.describe():<44} {_ms(s.total)} {e.tokens_per_s(t.global_batch_size, t.seq_len):9.0f} "
                     f"{m.total / GIB:6.3f} " + (f"{rehearsed[id(e)] / GIB:10.3f} " if rehearsed is not None else "")
                     + f"|{_ms(s.compute)}{_ms(s.tp)}{_ms(s.cp)}{_ms(s.ep)}{_ms(s.pp)}"
                     f"{_ms(s.bubble)}{_ms(s.dp)}{_ms(s.optimizer)}{_ms(s.shared)} | "
                     + " ".join(f"{getattr(m, name) / 2**20:.0f}" for name in parts))
    return "\n".join(lines)


def no_fit_message(plan: Plan, cfg, world: int) -> str:
    e = plan.smallest
    if e is None:
        return f"no valid layout of model={cfg.model.name} for {world} ranks (launch.validate refused every one)"
    need, have = e.memory.total, plan.memory_bytes
    return (f"no layout of model={cfg.model.name} fits {have / GIB:.2f} GiB per rank on {world} ranks: the one "
            f"needing least ({e.layout.describe()}) needs {need / GIB:.2f} GiB per rank, {(need - have) / GIB:.2f} "
            f"GiB ({need / have - 1:.0%}) more (parameters, gradients and AdamW "
            f"{(e.memory.parameters + e.memory.gradients + e.memory.optimizer_states) / GIB:.2f}, "
            f"activations {e.memory.activations / GIB:.2f}, runtime floor {e.memory.floor / GIB:.2f}); "
            f"try more ranks, a shorter train.seq_len or a smaller model")


def rehearse_top(plan: Plan, overrides: list[str], world: int, top: int) -> tuple[Plan, dict]:
    """The top layouts rehearsed (launch/rehearse.py): those whose busiest rank's peak fits the
    plan's memory, in the same order, and each one's peak."""
    from launch.rehearse import Options, rehearse

    kept, peaks = [], {}
    for e in plan.fitting[:top]:
        job = rehearse(Options(world, None, plan.memory_bytes / 1e9, [*overrides, *e.layout.overrides()]))
        peaks[id(e)] = max(r["peak"] for r in job["ranks"])
        if peaks[id(e)] <= plan.memory_bytes:
            kept.append(e)
    return dataclasses.replace(plan, fitting=kept), peaks


def write_layout(best: Estimate, cfg, name: str, processes: list[RankInfo]) -> Path:
    """configs/parallel/<name>.yaml: the layout as `parallel=<name>` selects it."""
    path = CONFIG_DIR / "parallel" / f"{name}.yaml"
    parallel = OmegaConf.to_container(best.config.parallel, resolve=True, enum_to_str=True)
    body = {"parallel": parallel, "train": {"micro_batch_size": best.layout.micro_batch_size}}
    t = cfg.train
    header = [
        "# @package _global_",
        f"# Written by `python -m launch.plan` on {time.strftime('%Y-%m-%d')} for model={cfg.model.name}, "
        f"cluster={cfg.cluster.name}, {len(processes)} ranks,",
        f"# train.global_batch_size={t.global_batch_size} train.seq_len={t.seq_len} train.dtype={t.dtype.value}: "
        f"{best.layout.describe()},",
        f"# estimated {best.time.total * 1e3:.1f} ms per step, {best.memory.total / GIB:.2f} GiB per rank.",
        f"# Use: python -m launch.train parallel={name} model={cfg.model.name} cluster={cfg.cluster.name} ...",
    ]
    path.write_text("\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(body)))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=5, help="layouts to print (default 5)")
    parser.add_argument("--write", metavar="NAME", help="write the best as configs/parallel/NAME.yaml")
    parser.add_argument("--calibration", metavar="FILE", help="rates measured by --probe")
    parser.add_argument("--probe", metavar="FILE", help="measure this cluster (under torchrun/Slurm) into FILE")
    parser.add_argument("--memory-gib", type=float, help="memory a rank may use (default: measured)")
    parser.add_argument("--json", action="store_true", help="print the ranked estimates as JSON")
    parser.add_argument("--rehearse", action="store_true",
                        help="rehearse the top layouts (one step on fake tensors) and drop those that do not fit")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        fail(f"unknown option(s) {unknown}; see --help")
    sizes = [o for o in overrides if o.startswith("world_size=")]
    overrides = [o for o in overrides if not o.startswith("world_size=")]
    try:
        world_size = int(sizes[-1].split("=", 1)[1]) if sizes else None
    except ValueError:
        fail(f"{sizes[-1]} is not an integer")
    if args.top < 1 or (args.memory_gib is not None and args.memory_gib <= 0):
        fail(f"--top {args.top} must be ≥ 1 and --memory-gib {args.memory_gib} > 0")
    if args.probe and (args.calibration or args.write or args.memory_gib is not None or args.json):
        fail("--probe measures the cluster and writes its file; plan in a second call with --calibration "
             f"{args.probe} (--calibration, --write, --memory-gib and --json do not go with --probe)")
    if args.write and ("/" in args.write or args.write.endswith(".yaml") or args.write == "default"):
        fail(f"--write {args.write!r}: give a config name (written as configs/parallel/NAME.yaml), not "
             "a path, and not 'default'")
    try:
        has_dir = any(o.startswith("run_dir=") for o in overrides) or args.probe
        cfg = compose(overrides if has_dir else [*overrides, "run_dir=unused"])
        if args.probe:
            run_probe(cfg, args.probe)
            return
        processes = processes_of(cfg, world_size)
        calibration = (load_calibration(args.calibration, processes, cfg.model.name) if args.calibration
                       else local_calibration(cfg, processes))
        if args.memory_gib is not None:
            calibration = dataclasses.replace(calibration, memory_bytes=args.memory_gib * GIB)
        plan = make_plan(cfg, processes, calibration)
    except ConfigError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f"\n{e.__cause__}" if e.__cause__ else ""
        fail(f"{e}{cause}")
    if not plan.fitting:
        fail(no_fit_message(plan, cfg, len(processes)), EXIT_NO_FIT)
    rehearsed = None
    if args.rehearse:
        plan, rehearsed = rehearse_top(plan, overrides, len(processes), args.top)
        if not plan.fitting:
            fail(f"none of the top {args.top} layouts fits {plan.memory_bytes / GIB:.2f} GiB per rank when "
                 "rehearsed; try more ranks, a shorter train.seq_len or activation checkpointing", EXIT_NO_FIT)
    if args.json:
        print(json.dumps([{"layout": e.layout.describe(), "overrides": e.layout.overrides(),
                           "step_s": e.time.total, "time": e.time.__dict__, "memory_bytes": e.memory.total,
                           "memory": e.memory.__dict__,
                           **({"rehearsed_peak_bytes": rehearsed[id(e)]} if rehearsed is not None else {})}
                          for e in plan.fitting[:args.top]]))
    else:
        print(describe_plan(plan, cfg, args.top, rehearsed))
    if args.write:
        path = write_layout(plan.fitting[0], cfg, args.write, processes)
        print(f"\nwrote {path}: python -m launch.train parallel={args.write} model={cfg.model.name} "
              f"cluster={cfg.cluster.name}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
