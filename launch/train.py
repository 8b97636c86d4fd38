"""Train a Transformer: the Hydra main of quintet. Reads top to bottom like docs/architecture.md's
"How a run flows".

    python -m launch.train train.steps=20                                  # one process
    torchrun --standalone --nproc-per-node 2 -m launch.train parallel.dp=2 # two processes
    python -m launch.train --cfg job                                       # print the config
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from launch import config as launch_config
from launch import env as launch_env
from launch import run_lock
from launch.preflight import EXIT_CHECKPOINT_WRITE, exit_every_rank, preflight, stop
from launch.validate import ConfigError
from parallel.strategies.holmes import network
from parallel.collectives import any_rank, gather_ranks
from parallel.groups import build_groups
from parallel.monitor import CollectiveMonitor
from parallel.strategies.holmes.placement import placement_warnings
from parallel.state import state_blocks
from parallel.parallelize import parallelize
from runtime.accounting import MemoryMeter, StepAccounting, format_flops, peak_flops
from runtime.checkpoint import CheckpointError, CheckpointWriteError, build_checkpointer, resume
from runtime.host_memory import keep_freed_memory
from runtime.data import BatchLoader, build_datasets, load_tokenizer
from runtime.flops import flops_per_token
from runtime.metrics import MetricsSink
from runtime.model import ModelArgs, Transformer, num_params
from runtime.optim import build_optimizer, init_optimizer_state
from runtime.report import write_report
from runtime.trace import Tracer
from runtime.trainer import Schedule, Trainer

log = logging.getLogger("quintet")


def select_device(cfg, local_rank: int) -> torch.device:
    kind = cfg.train.device.value
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(launch: launch_env.LaunchEnv, device: torch.device, timeout_s: float) -> None:
    """Join the job's process group: env:// under torchrun, an in-memory store for one process.

    A single process is a world of one, so every later step has one code path.
    """
    if dist.is_initialized():  # tests start ranks themselves
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not launch.is_distributed:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    # Collectives go over the interface on the route to the master, unless the user said otherwise.
    if launch.master_addr and not (os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")):
        interface = launch_env.socket_interface(launch.master_addr)
        if interface:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    if launch.rank == 0:
        log.info("rendezvous %s:%s (%s), %d ranks, interface %s", launch.master_addr, launch.master_port,
                 launch.launcher, launch.world_size,
                 os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME") or "default")
    if launch.launcher == "slurm":
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    else:
        # torchrun keeps one rendezvous store across the restarts of a job (--max-restarts): a
        # fast worker of a restart would read a dead peer's gloo/NCCL address, left by the attempt
        # before, ahead of the new one. Each attempt gets keys of its own.
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"quintet/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def param_dtype(cfg) -> torch.dtype:
    return torch.float64 if cfg.train.dtype.value == "float64" else torch.float32


def autocast_dtype(cfg) -> torch.dtype | None:
    return torch.bfloat16 if cfg.train.dtype.value == "bfloat16" else None


@dataclass
class TrainingRun:
    """Everything `setup` assembles on this rank; `run` trains with it."""

    cfg: DictConfig
    groups: object
    parallel: object  # parallel.parallelize.ParallelModel
    optimizer: torch.optim.Optimizer
    trainer: Trainer
    metrics: MetricsSink
    start_step: int


def setup(cfg: DictConfig) -> TrainingRun:
    """Steps 1-6 of a run on this rank; the caller has validated nothing yet."""
    # 1. Validate on every rank before any process group exists: the config, the files it
    # names, and that no other job uses its directories.
    launch = launch_env.detect()
    topo = preflight(cfg, launch)

    # 2-3. Join the job and build the rank groups.
    device = select_device(cfg, launch.local_rank)
    if device.type == "cpu":
        keep_freed_memory()  # steps reuse their activations' pages instead of faulting them in again
    init_distributed(launch, device, cfg.parallel.timeout_s)
    rank = dist.get_rank()
    # Logical ranks go to processes by NIC class and node (Holmes), and each group gets the
    # transport of its members' class.
    procs = network.process_ranks(cfg.cluster, topo.world_size, launch.node_rank, launch.local_rank,
                                  launch_env.nic_class())
    topo = network.place(topo, procs, cfg.cluster, cfg.parallel.placement)
    if rank == 0:
        for warning in placement_warnings(topo, procs):
            log.warning("placement: %s", warning)
        if topo.placement is not None and topo.placement != tuple(range(topo.world_size)):
            log.info("placement (%s): logical rank i runs on process %s", cfg.parallel.placement, list(topo.placement))
    # Per-group transports only where classes mix: a homogeneous cluster keeps NCCL's and the
    # user's own settings untouched.
    nics = [p.nic for p in procs] if len({p.nic for p in procs}) > 1 else None
    groups = build_groups(topo, device.type, cfg.parallel.timeout_s, nics=nics, classes=cfg.cluster.classes,
                          embedding_group=cfg.model.tie_embeddings or cfg.model.mtp_depth > 0,
                          node_size=launch.local_world_size)
    torch.manual_seed(cfg.seed)

    # 4-5. The model on the meta device, parallelised in parallelize's fixed order, then real
    # storage with the same initial values as one process.
    args = ModelArgs.from_config(cfg.model, tp=cfg.parallel.tp)  # the vocabulary padded for tp
    with torch.device("meta"):
        model = Transformer(args).to(param_dtype(cfg))
    n_params = num_params(model)
    if cfg.parallel.pp_layers == "auto":
        cfg.parallel.pp_layers = network.auto_pp_layers(cfg, model, topo, groups, procs, device)
        if rank == 0:
            log.info("pipeline layers per stage (auto): %s", list(cfg.parallel.pp_layers))
    tracer = Tracer(cfg.trace, rank, cfg.run_dir)
    par = parallelize(model, groups, cfg, device, tracer)
    if rank == 0:
        log.info("model %s: %.2fM parameters; world %d (%s); device %s; run_dir %s", cfg.model.name,
                 n_params / 1e6, topo.world_size, " ".join(f"{k}={v}" for k, v in topo.sizes().items()
                                                           if k != "world" and v > 1) or "one rank",
                 device, cfg.run_dir)

    # 6. Optimizer, schedule, data, checkpoints; resume when a checkpoint exists.
    optimizer = build_optimizer(par.parameters(), cfg.optim, cfg.train.lr, device)
    schedule = Schedule(cfg.train.lr, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    loader, valid_loader = build_loaders(cfg, args.vocab_size, groups.index("dp"), topo.dp)
    checkpointer = build_checkpointer(cfg.checkpoint, rank, cfg.parallel.timeout_s, on_gpu=device.type == "cuda",
                                      model=OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True))
    init_optimizer_state(optimizer)  # resume fills it; checkpoints store it

    def state() -> list:
        return state_blocks(par, optimizer)

    resumed = resume_from_checkpoint(cfg, checkpointer, state(), rank)
    start_step = resumed.trainer_state["step"] if resumed is not None else 0
    # The run's record of itself, written once it is certain to be this run's directory and model.
    if rank == 0:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    metrics = MetricsSink(cfg.run_dir, active=rank == 0, total_steps=cfg.train.steps,
                          log_every=cfg.logging.every, wandb_cfg=cfg.logging.wandb,
                          config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                          draw_report=write_report)
    metrics.truncate_after(start_step)
    if resumed is not None:
        metrics.event({"event": "resume", "step": start_step, "time": time.time(), "path": str(resumed.path),
                       "skipped": [{"checkpoint": name, "why": why} for name, why in resumed.skipped]})

    monitor = build_monitor(cfg, groups, metrics)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    trainer = Trainer(
        parallel=par, optimizer=optimizer, schedule=schedule, loader=loader,
        checkpointer=checkpointer, metrics=metrics, tracer=tracer,
        device=device, steps=cfg.train.steps, grad_clip=cfg.optim.grad_clip,
        autocast_dtype=autocast_dtype(cfg),
        tokens_per_step=tokens_per_step, state=state, any_rank=functools.partial(any_rank, device=device),
        skip_nonfinite=cfg.train.skip_nonfinite, monitor=monitor,
        valid_loader=valid_loader, eval_every=cfg.eval.every, eval_batches=cfg.eval.batches,
        accounting=build_accounting(cfg, args, device, launch.local_world_size, tokens_per_step, monitor, metrics,
                                    start_step))
    return TrainingRun(cfg, groups, par, optimizer, trainer, metrics, start_step)


def build_loaders(cfg, vocab_size: int, dp_rank: int, dp_size: int):
    """The training loader and the validation loader (None without validation data) of this
    data-parallel rank: the same datasets (runtime/data/dataset.py) on every rank."""
    d, t = cfg.data, cfg.train
    tokenizer = load_tokenizer(str(d.tokenizer))
    datasets = build_datasets(d, tokenizer, vocab_size, t.seq_len, cfg.seed)

    def loader(sequences):
        return BatchLoader(sequences, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size, tokenizer.eod_id,
                           d.document_mask, d.mask_eod_loss)

    return loader(datasets.train), None if datasets.valid is None else loader(datasets.valid)


def resume_from_checkpoint(cfg, checkpointer, blocks: list, rank: int):
    """The newest checkpoint that verifies, loaded into `blocks` (runtime/checkpoint/resume.py),
    or None for a fresh start; rank 0 says what it skipped and where it resumed."""
    resumed = resume(checkpointer, blocks, cfg.checkpoint.fallback) if cfg.checkpoint.resume else None
    if resumed is not None and rank == 0:
        for name, why in resumed.skipped:
            log.warning("checkpoint %s skipped: %s", name, why)
        log.info("resumed from %s at step %d", resumed.path, resumed.trainer_state["step"])
    return resumed


def build_monitor(cfg, groups, metrics: MetricsSink) -> CollectiveMonitor | None:
    """The collective monitor (hangs and slow ranks) of a job of 2+ ranks, its groups named."""
    world = groups.topology.world_size
    if not cfg.monitor.enabled or world == 1:
        return None
    names: dict[str, list[str]] = {}
    for name, ranks in groups.ranks.items():
        names.setdefault(",".join(map(str, ranks)), []).append(name)
    return CollectiveMonitor(groups.rank, world, hang_timeout_s=cfg.monitor.hang_timeout_s,
                             window=cfg.monitor.window, slow_fraction=cfg.monitor.slow_fraction,
                             run_dir=cfg.run_dir, group_names={k: "/".join(v) for k, v in names.items()},
                             on_hang=lambda event: (metrics.event(event), metrics.close(send_report=False)))


def build_accounting(cfg, args: ModelArgs, device: torch.device, local_world_size: int, tokens_per_step: int,
                     monitor, metrics: MetricsSink, start_step: int) -> StepAccounting:
    """Model FLOPs per token against the sum of the devices' peaks (a collective), and the
    launch's start record in metrics.jsonl."""
    dtype = autocast_dtype(cfg) or param_dtype(cfg)
    peak, source = peak_flops(device, dtype, local_world_size, cfg.logging.peak_tflops)
    gather = functools.partial(gather_ranks, device=device)
    peak_total = sum(p for (p,) in gather([peak]))
    flops = flops_per_token(args, cfg.train.seq_len)
    world = dist.get_world_size()
    metrics.event({"event": "start", "step": start_step, "time": time.time(), "world_size": world,
                   "flops_per_token": flops, "peak_tflops_per_device": peak / 1e12,
                   "peak_tflops_total": peak_total / 1e12, "peak_source": source})
    if dist.get_rank() == 0:
        log.info("model FLOPs %.3g per token; MFU against %s per device (%s)", flops, format_flops(peak), source)

    def raise_peak(achieved: float) -> float:
        return peak_flops(device, dtype, local_world_size, cfg.logging.peak_tflops, refresh=True, at_least=achieved)[0]

    # A probed peak is measured again; a configured or datasheet one can only be raised.
    remedy = "measured again" if source.startswith("matmul probe") else "raised to what the step achieved"

    def on_new_peak(record: dict) -> None:
        metrics.event(record)
        metrics.note(f"MFU {record['mfu_against_old_peak']:.1%} > 100%: the peak of "
                     f"{format_flops(record['old_peak_tflops_total'] * 1e12 / world)} per device ({source}) is below "
                     f"what a step achieved; {remedy}: {format_flops(record['peak_tflops_per_device'] * 1e12)}")

    # Where calls block until the transfer is done (gloo), the monitor's timing of them is the
    # step's communication time.
    comm = monitor.take_blocked_s if monitor is not None and device.type == "cpu" else None
    return StepAccounting(flops_per_token=flops, tokens_per_step=tokens_per_step, world_size=world,
                          peak_flops_total=peak_total, memory=MemoryMeter(device),
                          gather=gather, comm_seconds=comm,
                          raise_peak=raise_peak, on_new_peak=on_new_peak)


def run(cfg: DictConfig) -> None:
    """Train as configured, on this rank."""
    r = setup(cfg)
    # 7. The loop.
    try:
        r.trainer.fit(r.start_step, cfg.train.stop_at_step)
    finally:
        r.metrics.close()


def train(cfg: DictConfig) -> None:
    """`run` with the user-facing failure contract: one message, the same exit code on every
    rank — 2 for a bad config or a checkpoint that cannot be resumed, 4 for a checkpoint that
    could not be written."""
    try:
        run(cfg)
    except ConfigError as e:
        stop(str(e))
    except CheckpointWriteError as e:
        stop(f"the run stopped: {e}", EXIT_CHECKPOINT_WRITE)
    except CheckpointError as e:  # raised alike on every rank (runtime/checkpoint/resume.py)
        stop(f"cannot resume: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        run_lock.release_all()  # a job that ends (not one that crashes) marks its directories free


_task_started = False


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    train(cfg)


def main() -> None:
    launch_config.register()
    if launch_env.detect().rank != 0:
        # Only rank 0 writes Hydra's files (.hydra/, train.log) into the shared run_dir.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    try:
        _hydra_main()
    except SystemExit as e:
        # Hydra exits 1 when composition fails (a wrong type, an unknown key or group option):
        # that is bad input too, and bad input exits 2.
        if not _task_started and e.code not in (0, None):
            exit_every_rank()
        raise


if __name__ == "__main__":
    main()
