"""Rehearse an N-rank job in one CPU process, before anyone books the cluster.

    python -m launch.rehearse model=llama3_405b parallel=llama3_405b_8k world_size=16384
    python -m launch.rehearse model=tiny world_size=8 parallel.tp=2 rehearse.ranks=[0,3] --device-memory 80
    python -m launch.rehearse model=deepseek_v3 parallel=deepseek_v3_2048 world_size=2048 --no-step

For each rehearsed rank, the real path of `launch.train` through one optimizer step: the same
validation (the same messages, exit 2), every group of the whole world built by
`parallel.groups.build_groups` over torch's fake process-group backend (a collective returns at
once, nothing is sent), the model on the meta device, `parallelize` with every strategy the
config names, materialised as fake tensors (shapes and dtypes, no storage: parallel/fake.py), the
optimizer and its state, and `run_step`: every microbatch's forward and backward (through the
pipeline's schedule), the loss's reduction, the gradients' completion, clipping and the optimizer
step, and the checkpoint request's choice of blocks. Experts are routed with forced balance
(`model.moe.force_balance`). By default the ranks that differ: the first, middle and last stage of the first pipeline, and with experts the stage
holding the most MoE layers (`rehearse.ranks=[...]` names others).

Reported per rank (a table, then one JSON object as the last line): the bytes of its parameters,
gradients and optimizer state (parallel/footprint.py: counted as a real rank's are), the peak of
live tensor bytes during the step with its phase, and the activations (that peak less the state),
whether the peak fits `--device-memory` GB (default 80) and by how much, the step's collective
calls and bytes sent per process group and kind (parallel/traffic.py, the same counter a real
rank's step gives), the pipeline's simulated bubble, and the checkpoint shard it writes (bytes,
blocks, the engine's host memory: `checkpoint_request`). `--no-step` reports the state and the
checkpoint alone, in seconds. A rank whose rehearsal raises is reported with the rank, the phase and the exception,
exit 2; a rank that does not fit is named after the report, exit 3. docs/scale.md says what is
exact and what is assumed.
"""
from __future__ import annotations

import json
import pickle
import sys
import time
import traceback
from dataclasses import dataclass

import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from launch.config import compose
from launch.train import autocast_dtype, param_dtype
from launch.validate import ConfigError, validate
from parallel.fake import ShapeMode, fake_process_group, symmetric_peers
from parallel.footprint import LiveBytes, state_bytes
from parallel.groups import build_groups
from parallel.mesh import Topology
from parallel.parallelize import parallelize
from parallel.pipeline.partition import rank_stages, stage_layers
from parallel.pipeline.schedules import bubble, build, simulate
from parallel.state import state_blocks
from parallel.strategies.holmes.network import split_for_rates
from parallel.traffic import CollectiveCounter
from runtime.checkpoint import MB
from runtime.data.loader import Batch
from runtime.model import ModelArgs, Transformer
from runtime.optim import build_optimizer, init_optimizer_state
from runtime.trace import Tracer
from runtime.trainer import autocast, forward_backward

EXIT_BAD, EXIT_NO_FIT = 2, 3  # as launch.plan: bad input; a rank that does not fit
USAGE = ("usage: python -m launch.rehearse world_size=N [rehearse.ranks=[r,...]] [--device-memory GB] [--no-step] "
         "[overrides ...]")
GB = 1e9


class RehearsalError(RuntimeError):
    """A rank's rehearsal raised: which rank, in which phase."""


@dataclass
class Options:
    world_size: int
    ranks: list[int] | None
    device_memory_gb: float
    overrides: list[str]
    step: bool = True  # False: the state only, in seconds (no forward, backward or optimizer step)


def parse(argv: list[str]) -> Options:
    world, ranks, memory, overrides, step = None, None, 80.0, [], True
    it = iter(argv)
    for a in it:
        try:
            if a.startswith("world_size="):
                world = int(a.split("=", 1)[1])
            elif a.startswith("rehearse.ranks="):
                ranks = [int(r) for r in a.split("=", 1)[1].strip("[]").split(",") if r.strip()]
            elif a == "--device-memory":
                memory = float(next(it, "none"))
            elif a.startswith("--device-memory="):
                memory = float(a.split("=", 1)[1])
            elif a == "--no-step":
                step = False
            else:
                overrides.append(a)
        except ValueError:
            raise ValueError(f"{a}: expected world_size=N, rehearse.ranks=[r,...] of integers or "
                             f"--device-memory GB\n{USAGE}") from None
    if world is None:
        raise ValueError(f"give the world size as world_size=N\n{USAGE}")
    if world < 1 or not memory > 0:
        raise ValueError(f"world_size={world} must be ≥ 1 and --device-memory {memory:g} GB > 0\n{USAGE}")
    return Options(world, ranks, memory, overrides, step)


def default_ranks(cfg, topo: Topology, args: ModelArgs) -> list[int]:
    """The ranks whose state differs: the first, middle and last stage of the first pipeline (the
    embedding, only layers, the head), and with experts the stage holding the most MoE layers."""
    pipeline = topo.groups("pp")[0]
    picks = {pipeline[0], pipeline[len(pipeline) // 2], pipeline[-1]}
    if args.moe is not None and topo.pp > 1:
        p = cfg.parallel
        layers = stage_layers(args.n_layers, topo.pp, p.vpp, p.pp_layers, p.pp_count_embedding_head)
        moe = [sum(args.is_moe(i) for s in rank_stages(topo.pp, p.vpp, r) for i in layers[s]) for r in range(topo.pp)]
        picks.add(pipeline[moe.index(max(moe))])
    return sorted(picks)


# `parallel.pp_layers=auto` without a device to measure: ranks of equal speed, each an H100's
# dense bf16 rate with 400 Gbit/s (50 GB/s) of data-parallel bandwidth.
REFERENCE_FLOPS, REFERENCE_BANDWIDTH = 989e12, 50e9


def microbatches(cfg, topo: Topology) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * topo.dp)


def run_step(par, optimizer, cfg, batches: list[Batch], live: LiveBytes) -> dict:
    """One optimizer step of `launch.train`'s trainer on these microbatches, each phase named in
    `live`: the trainer's forward and backward (runtime/trainer.py), the loss's reduction, the gradients' completion, clipping, the optimizer step.
    Returns the state bytes before the gradients are dropped. A real rank runs the same for the
    comparison (tests/dist/test_rehearse.py)."""
    live.phase = "forward and backward"
    loss_sum = forward_backward(par, batches, 1.0, autocast("cpu", autocast_dtype(cfg)))
    live.phase = "gradient reduction"
    par.reduce_loss(loss_sum)
    par.finish_grads()
    live.phase = "clipping"
    par.clip_grad_norm_(cfg.optim.grad_clip)
    live.phase = "optimizer step"
    optimizer.step()
    state = state_bytes(par.parameters(), optimizer)
    optimizer.zero_grad(set_to_none=True)
    return state


def checkpoint_request(cfg, par, optimizer) -> dict:
    """The step's checkpoint request on this rank, by `checkpoint.engine`: the blocks its shard
    writes (those it owns, parallel/state.py) and their bytes; the host memory the engine holds
    for them (the lazy engine's pool, beyond which its copy waits for storage before the next
    optimizer step may start; DCP's staged copy of the whole shard; the blocking engine's largest
    block); and what the agreement on the owners the layout leaves open (FSSDP's experts) brings
    every rank (runtime/checkpoint/sync.py owned_blocks: this rank's list, pickled, times the
    world size)."""
    blocks = state_blocks(par, optimizer, experts_by_plan=True)
    written = [b.local.numel() * b.local.element_size() for b in blocks if b.owner == par.groups.rank]
    engine = cfg.checkpoint.engine.value
    host = {"lazy": cfg.checkpoint.pool_mb * MB, "dcp_async": sum(written), "sync": max(written, default=0)}[engine]
    open_blocks = [(b.key, tuple(map(tuple, b.coords()))) for b in state_blocks(par, optimizer) if b.owner is None]
    return {"engine": engine, "bytes": sum(written), "blocks": len(written), "host_bytes": host,
            "exchanged_blocks": len(open_blocks),
            "exchange_bytes": len(pickle.dumps(open_blocks)) * par.groups.topology.world_size}


def in_flight(actions) -> int:
    """The most microbatch-chunks a rank holds at once: forward run, last backward (or weight
    gradient) not yet — what its activations are held for."""
    last = {(a.chunk, a.mb): a for a in actions}
    held, most = set(), 0
    for a in actions:
        if a.kind == "F":
            held.add((a.chunk, a.mb))
        if last[(a.chunk, a.mb)] is a:
            held.discard((a.chunk, a.mb))
        most = max(most, len(held))
    return most


def rehearsed_microbatches(cfg, topo: Topology, pp_rank: int) -> int:
    """How many of the step's microbatches a rehearsal runs: all without a pipeline; with one,
    one more than the fewest (3 or more, so that microbatch 1 is neither the first nor the last)
    for which this rank's schedule holds as many at once as the whole step's. The peak of live
    bytes is then the step's, and each further microbatch repeats microbatch 1's collectives."""
    m = microbatches(cfg, topo)
    if topo.pp == 1:
        return m
    p, v, kind = topo.pp, cfg.parallel.vpp, str(cfg.parallel.schedule)
    group = cfg.parallel.pp_group_size or p
    step = group if kind == "interleaved_1f1b" else 1
    if m % step:
        return m
    most = in_flight(build(kind, p, v, m, pp_rank, group))
    for m1 in range(max(3, step), m, step):
        if in_flight(build(kind, p, v, m1, pp_rank, group)) == most:
            return min(m, m1 + step)  # and one more: a forward then runs while the most are held
    return m


def extrapolate(table: dict, per_microbatch: dict, times: int) -> dict:
    """`table` with `per_microbatch`'s calls and bytes added `times` more times."""
    out = {g: {k: dict(e) for k, e in kinds.items()} for g, kinds in table.items()}
    for g, kinds in per_microbatch.items():
        for k, e in kinds.items():
            entry = out.setdefault(g, {}).setdefault(k, {"calls": 0, "bytes": 0})
            entry["calls"] += times * e["calls"]
            entry["bytes"] += times * e["bytes"]
    return out


def simulated_bubble(cfg, topo: Topology) -> float | None:
    """The schedule's bubble over its busy time, every forward 1 and backward 2 (weight gradients
    split 1 + 1 under zero-bubble): parallel/pipeline/schedules.py's simulator."""
    if topo.pp == 1:
        return None
    p, v, m = topo.pp, cfg.parallel.vpp, microbatches(cfg, topo)
    kind = str(cfg.parallel.schedule)
    return bubble(simulate([build(kind, p, v, m, r) for r in range(p)], p, v))


def _empty_values(name, full_shape, blocks):
    return [torch.empty([b.stop - b.start for b in block]) for block in blocks]


def rehearse_rank(cfg, topo: Topology, rank: int, step: bool = True) -> dict:
    """One rank of the job, on fake tensors over a fake process group (parallel/fake.py): its
    state bytes, the step's peak of live bytes and its collectives (without `step`: the state,
    gradients counted as the parameters they belong to, which is what backward allocates)."""
    phase, seconds, clock = "process groups", {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = round(time.perf_counter() - clock, 3), time.perf_counter()

    try:
        with fake_process_group(rank, topo.world_size), symmetric_peers():
            groups = build_groups(topo, "cpu", cfg.parallel.timeout_s,
                                  embedding_group=cfg.model.tie_embeddings or cfg.model.mtp_depth > 0)
            lap("groups")
            phase = "model"
            with torch.device("meta"):  # as launch.train builds it
                model = Transformer(ModelArgs.from_config(cfg.model, tp=cfg.parallel.tp)).to(param_dtype(cfg))
            phase = "parallelize"
            fake = ShapeMode()
            # The strategies rewrite the meta-device model as in a run; its storage is fake tensors.
            par = parallelize(model, groups, cfg, torch.device("cpu"), Tracer(cfg.trace, rank, cfg.run_dir),
                              values=_empty_values, storage=lambda: fake)
            lap("parallelize")
            with fake:
                phase = "optimizer"
                optimizer = build_optimizer(par.parameters(), cfg.optim, cfg.train.lr, torch.device("cpu"))
                init_optimizer_state(optimizer)
                if not step:
                    state = state_bytes(par.parameters(), optimizer)
                    state["gradients"] = state["parameters"]
                    lap("optimizer")
                    phase = "checkpoint request"
                    checkpoint = checkpoint_request(cfg, par, optimizer)
                    lap("checkpoint")
                    return {"rank": rank, **state, "peak": sum(state.values()), "peak_phase": "the state alone",
                            "activations": None, "collectives": {}, "checkpoint": checkpoint, "microbatches_run": 0,
                            "seconds": seconds}
                phase = "step"
                tokens = torch.zeros((cfg.train.micro_batch_size, len(par.positions)), dtype=torch.long)
                m, m1 = microbatches(cfg, topo), rehearsed_microbatches(cfg, topo, groups.index("pp"))
                before = state_bytes(par.parameters(), optimizer)
                with CollectiveCounter(groups) as counter, LiveBytes(before["parameters"] + before["optimizer"]) as live:
                    if par.pipeline is not None:
                        par.pipeline.on_action = lambda a: setattr(counter, "microbatch", None if a is None else a.mb)
                    state = run_step(par, optimizer, cfg, [Batch(tokens, tokens)] * m1, live)
                    phase = live.phase
                collectives = counter.table if m1 == m else extrapolate(counter.table, counter.per_microbatch[1], m - m1)
                lap("step")
                phase = "checkpoint request"
                checkpoint = checkpoint_request(cfg, par, optimizer)
                lap("checkpoint")
            return {"rank": rank, **state, "peak": live.peak, "peak_phase": live.peak_phase,
                    "activations": max(0, live.peak - sum(state.values())), "collectives": collectives,
                    "checkpoint": checkpoint, "microbatches_run": m1, "seconds": seconds}
    except Exception as e:
        raise RehearsalError(f"rank {rank}: {phase}{_strategy(e)}: {type(e).__name__}: {e}") from e


def _strategy(e: BaseException) -> str:
    """The strategy (parallelize's `apply_*`) an exception came from, if any: " (apply_ep)"."""
    names = [f.f_code.co_name for f, _ in traceback.walk_tb(e.__traceback__) if f.f_code.co_name.startswith("apply_")]
    return f" ({names[-1]})" if names else ""


def rehearse(opts: Options) -> dict:
    """The job's report: every rehearsed rank's (ConfigError before any rank when the config is
    invalid). A model with experts is routed with forced balance (`model.moe.force_balance`):
    which expert a token goes to is data, which a rehearsal has not."""
    cfg = compose([*opts.overrides, "run_dir=unused"])
    topo = validate(cfg, opts.world_size)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_config(cfg.model, tp=cfg.parallel.tp))
    if cfg.parallel.pp_layers == "auto":
        cfg.parallel.pp_layers = split_for_rates(cfg, model, topo, [REFERENCE_FLOPS] * topo.pp,
                                                 [REFERENCE_BANDWIDTH] * topo.pp)
    ranks = opts.ranks if opts.ranks is not None else default_ranks(cfg, topo, model.args)
    bad = [r for r in ranks if not 0 <= r < opts.world_size]
    if bad:
        raise ConfigError([f"rehearse.ranks={bad}: ranks are 0 … world_size − 1 = {opts.world_size - 1}"])
    if cfg.model.moe.num_experts:
        cfg.model.moe.force_balance = True
    reports = []
    for r in ranks:
        report = rehearse_rank(cfg, topo, r, opts.step)
        report["fits"] = report["peak"] <= opts.device_memory_gb * GB
        report["headroom_gb"] = opts.device_memory_gb - report["peak"] / GB
        reports.append(report)
    return {"world_size": opts.world_size, "device_memory_gb": opts.device_memory_gb,
            "microbatches": microbatches(cfg, topo), "pipeline_bubble": simulated_bubble(cfg, topo),
            "routing": "forced balance" if cfg.model.moe.num_experts else None, "ranks": reports}


def table(job: dict) -> str:
    """Memory per rank, then what each rank sends per process group (bytes and calls)."""
    lines = [f"{'rank':>6}{'parameters':>12}{'gradients':>11}{'optimizer':>11}{'activations':>13}{'peak':>9}"
             f"  fits {job['device_memory_gb']:g} GB   peak during"]
    for r in job["ranks"]:
        lines.append(f"{r['rank']:>6}" + "".join(f"{r[k] / GB:>{w - 1}.2f}G" if r[k] is not None else f"{'—':>{w}}"
                                                 for k, w in (("parameters", 12), ("gradients", 11), ("optimizer", 11),
                                                              ("activations", 13), ("peak", 9)))
                     + f"  {'yes' if r['fits'] else 'NO '} ({r['headroom_gb']:+.1f} GB)   {r['peak_phase']}")
    if any(r["collectives"] for r in job["ranks"]):
        lines.append("sent per step (bytes, calls) by process group:")
    for r in (r for r in job["ranks"] if r["collectives"]):
        per_group = {g: (sum(k["bytes"] for k in kinds.values()), sum(k["calls"] for k in kinds.values()))
                     for g, kinds in r["collectives"].items()}
        lines.append(f"{r['rank']:>6}  " + ", ".join(f"{g} {b / GB:.3f}G/{c}" for g, (b, c) in sorted(per_group.items())))
    for r in job["ranks"]:
        c = r["checkpoint"]
        beyond = c["bytes"] - c["host_bytes"] if c["engine"] == "lazy" else 0
        lines.append(f"{r['rank']:>6}  checkpoint ({c['engine']}): writes {c['bytes'] / GB:.3f}G in {c['blocks']} blocks, "
                     f"host {c['host_bytes'] / GB:.3f}G" + (f" (the copy waits for storage to take {beyond / GB:.3f}G)"
                                                           if beyond > 0 else "")
                     + (f"; agreeing on FSSDP's owners brings every rank {c['exchange_bytes'] / GB:.3f}G"
                        if c["exchanged_blocks"] else ""))
    if job["pipeline_bubble"] is not None:
        lines.append(f"pipeline: {job['microbatches']} microbatches, simulated bubble {job['pipeline_bubble']:.1%} "
                     "of the busy time (F = 1, B = 2)")
    if job["routing"]:
        lines.append("experts: routing with forced balance (every expert receives the same share)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(argv)
        start = time.perf_counter()
        job = rehearse(opts)
    except (ValueError, ConfigError, RehearsalError) as e:
        print(f"quintet: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"quintet: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD)
    print(table(job))
    print(f"rehearsed {len(job['ranks'])} of {opts.world_size} ranks in {time.perf_counter() - start:.1f} s")
    print(json.dumps(job), flush=True)
    short = [r for r in job["ranks"] if not r["fits"]]
    if short:
        print("quintet: the layout does not fit --device-memory " f"{opts.device_memory_gb:g} GB: "
              + "; ".join(f"rank {r['rank']} needs {r['peak'] / GB:.3g} GB ({-r['headroom_gb']:.3g} GB more; "
                          f"peak in: {r['peak_phase']})" for r in short)
              + "; try more ranks, activation checkpointing (parallel.activation_checkpoint=full) or a shorter "
                "train.seq_len", file=sys.stderr)
        sys.exit(EXIT_NO_FIT)


if __name__ == "__main__":
    main()
