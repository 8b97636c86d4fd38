"""Rehearse an N-rank job in one CPU process, before anyone books the cluster.

    python -m launch.rehearse model=llama3_405b world_size=16384 parallel.tp=8 parallel.pp=16 \\
        parallel.sp=true "parallel.pp_layers=[7,8,8,8,8,8,8,8,8,8,8,8,8,8,8,7]" train.seq_len=8192
    python -m launch.rehearse model=tiny world_size=8 parallel.tp=2 rehearse.ranks=[0,3] --device-memory 80

For each rehearsed rank, the real path of `launch.train` up to its first step: the same
validation (the same messages, exit 2), every group of the whole world built by
`parallel.groups.build_groups` over torch's fake process-group backend (a collective returns at
once, nothing is sent), the model on the meta device, `parallelize` with every strategy the
config names, materialised as fake tensors (shapes and dtypes, no storage), the optimizer and its
state, and — for a dense model — the step's forward and backward with the gradient reduction
(one microbatch, or the pipeline schedule's whole step). By default the ranks that differ: the
first, middle and last pipeline stage of the first pipeline (`rehearse.ranks=[...]` names others).

Reported per rank (a table, then one JSON object as the last line): the bytes of its parameters,
gradients and optimizer state (parallel/footprint.py: what a real rank of that layout holds,
counted the same way), whether that state fits `--device-memory` GB (default 80) and by how much,
and the step's collective calls and bytes sent per process group and kind (parallel/traffic.py,
the same counter a real rank's step gives). A rank whose rehearsal raises is reported with the
rank, the phase and the exception, exit 2.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from launch.config import compose
from launch.validate import ConfigError, validate
from parallel.footprint import state_bytes
from parallel.groups import build_groups
from parallel.mesh import Topology
from parallel.parallelize import parallelize
from parallel.strategies.holmes.network import split_for_rates
from parallel.traffic import CollectiveCounter
from runtime.data.loader import Batch
from runtime.model import ModelArgs, Transformer
from runtime.optim import build_optimizer, init_optimizer_state
from runtime.trace import Tracer

EXIT_BAD = 2
USAGE = ("usage: python -m launch.rehearse world_size=N [rehearse.ranks=[r,...]] [--device-memory GB] "
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


def parse(argv: list[str]) -> Options:
    world, ranks, memory, overrides = None, None, 80.0, []
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
            else:
                overrides.append(a)
        except ValueError:
            raise ValueError(f"{a}: expected world_size=N, rehearse.ranks=[r,...] of integers or "
                             f"--device-memory GB\n{USAGE}") from None
    if world is None:
        raise ValueError(f"give the world size as world_size=N\n{USAGE}")
    return Options(world, ranks, memory, overrides)


def default_ranks(topo: Topology) -> list[int]:
    """The first, middle and last stage of the first pipeline: the ranks whose state differs
    (the embedding, only layers, the head)."""
    pipeline = topo.groups("pp")[0]
    return sorted({pipeline[0], pipeline[len(pipeline) // 2], pipeline[-1]})


# `parallel.pp_layers=auto` without a device to measure: ranks of equal speed, each an H100's
# dense bf16 rate with 400 Gbit/s (50 GB/s) of data-parallel bandwidth.
REFERENCE_FLOPS, REFERENCE_BANDWIDTH = 989e12, 50e9


def run_step(par, cfg, topo: Topology, batch: Batch) -> str:
    """The step's forward and backward and gradient completion (no optimizer step): the
    pipeline schedule's whole step for this rank's microbatches, else one microbatch. Returns
    what it ran. A real rank runs the same for the comparison (tests/dist/test_rehearse.py)."""
    if par.pipeline is not None:
        microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topo.dp)
        par.pipeline.forward_backward([batch] * microbatches, 1.0, contextlib.nullcontext)
        what = f"the pipeline schedule, {microbatches} microbatches"
    else:
        with par.gradient_sync(True):
            par.loss_fn(par.model(batch.tokens, par.positions, None, labels=batch.labels), batch.labels).backward()
        what = "one microbatch"
    par.finish_grads()
    return what


def _empty_values(name, full_shape, blocks):
    return [torch.empty([b.stop - b.start for b in block]) for block in blocks]


def rehearse_rank(cfg, topo: Topology, rank: int) -> dict:
    """One rank of the job, on fake tensors over a fake process group; its state bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if cfg.parallel.dp_impl.value == "ddp" and topo.dp * topo.cp > 1:
        raise RehearsalError(f"rank {rank}: parallelize: parallel.dp_impl=ddp is not rehearsed: DistributedDataParallel "
                             "broadcasts real parameters when it wraps the model, which fake tensors have not; "
                             "rehearse the layout with parallel.dp_impl=fsdp")
    phase = "process groups"
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=topo.world_size)
    try:
        groups = build_groups(topo, "cpu", cfg.parallel.timeout_s,
                              embedding_group=cfg.model.tie_embeddings or cfg.model.mtp_depth > 0)
        phase = "model"
        dtype = torch.float64 if cfg.train.dtype.value == "float64" else torch.float32
        with torch.device("meta"):  # as launch.train builds it
            model = Transformer(ModelArgs.from_config(cfg.model, tp=cfg.parallel.tp)).to(dtype)
        phase = "parallelize"
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        # The strategies rewrite the meta-device model as in a run; its storage is fake tensors.
        par = parallelize(model, groups, cfg, torch.device("cpu"), Tracer(cfg.trace, rank, cfg.run_dir),
                          values=_empty_values, storage=lambda: fake)
        with fake:
            phase = "optimizer"
            optimizer = build_optimizer(par.parameters(), cfg.optim, cfg.train.lr, torch.device("cpu"))
            init_optimizer_state(optimizer)
            step, counter = "no (MoE routing is data-dependent: gradients counted as the parameters)", None
            if cfg.model.moe.num_experts == 0:
                phase = "forward and backward"
                tokens = torch.zeros((cfg.train.micro_batch_size, len(par.positions)), dtype=torch.long)
                with CollectiveCounter(groups) as counter:
                    step = run_step(par, cfg, topo, Batch(tokens, tokens))
            report = {"rank": rank, **state_bytes(par.parameters(), optimizer), "step": step,
                      "collectives": counter.table if counter is not None else None}
            if not step.startswith(("one", "the pipeline")):  # backward gives every parameter a gradient of its shape
                report["gradients"] = report["parameters"]
            return report
    except Exception as e:
        raise RehearsalError(f"rank {rank}: {phase}: {type(e).__name__}: {e}") from e
    finally:
        dist.destroy_process_group()


def rehearse(opts: Options) -> list[dict]:
    """Every rehearsed rank's report (ConfigError before any rank when the config is invalid)."""
    cfg = compose([*opts.overrides, "run_dir=unused"])
    topo = validate(cfg, opts.world_size)
    if cfg.parallel.pp_layers == "auto":
        with torch.device("meta"):
            model = Transformer(ModelArgs.from_config(cfg.model, tp=cfg.parallel.tp))
        cfg.parallel.pp_layers = split_for_rates(cfg, model, topo, [REFERENCE_FLOPS] * topo.pp,
                                                 [REFERENCE_BANDWIDTH] * topo.pp)
    ranks = opts.ranks if opts.ranks is not None else default_ranks(topo)
    bad = [r for r in ranks if not 0 <= r < opts.world_size]
    if bad:
        raise ConfigError([f"rehearse.ranks={bad}: ranks are 0 … world_size − 1 = {opts.world_size - 1}"])
    out = []
    for r in ranks:
        report = rehearse_rank(cfg, topo, r)
        total = report["parameters"] + report["gradients"] + report["optimizer"]
        report["state"] = total
        report["fits"] = total <= opts.device_memory_gb * GB
        report["headroom_gb"] = opts.device_memory_gb - total / GB
        out.append(report)
    return out


def table(reports: list[dict], device_memory_gb: float) -> str:
    lines = [f"{'rank':>6}{'parameters':>13}{'gradients':>12}{'optimizer':>12}{'state':>10}  "
             f"fits {device_memory_gb:g} GB{'sent':>12}{'calls':>8}   step rehearsed"]
    for r in reports:
        kinds = [k for by_kind in (r["collectives"] or {}).values() for k in by_kind.values()]
        sent = f"{sum(k['bytes'] for k in kinds) / GB:>11.2f}G{sum(k['calls'] for k in kinds):>8}" if kinds else f"{'—':>12}{'—':>8}"
        lines.append(f"{r['rank']:>6}{r['parameters'] / GB:>12.2f}G{r['gradients'] / GB:>11.2f}G"
                     f"{r['optimizer'] / GB:>11.2f}G{r['state'] / GB:>9.2f}G  "
                     f"{'yes' if r['fits'] else 'NO'} ({r['headroom_gb']:+.1f} GB){sent}   {r['step']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(argv)
        start = time.perf_counter()
        reports = rehearse(opts)
    except (ValueError, ConfigError, RehearsalError) as e:
        print(f"quintet: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"quintet: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD)
    print(table(reports, opts.device_memory_gb))
    print(f"rehearsed {len(reports)} of {opts.world_size} ranks in {time.perf_counter() - start:.1f} s")
    print(json.dumps({"world_size": opts.world_size, "device_memory_gb": opts.device_memory_gb, "ranks": reports}))


if __name__ == "__main__":
    main()
