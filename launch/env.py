"""Where this process sits in the job, read from the launcher's environment.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and TORCHELASTIC_RUN_ID;
Slurm sets SLURM_JOB_ID. Without either, the process is a world of one.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    run_id: str | None  # a name every rank of this job agrees on, or None
    launcher: str  # "torchrun" | "single"

    @property
    def is_distributed(self) -> bool:
        return self.launcher != "single"


def _int(env: dict, key: str, default: int) -> int:
    value = env.get(key)
    return default if value in (None, "") else int(value)


def detect(env: dict | None = None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_int(env, "RANK", 0),
            world_size=_int(env, "WORLD_SIZE", 1),
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
            run_id=_job_id(env),
            launcher="torchrun",
        )
    return LaunchEnv(0, 1, 0, 1, _job_id(env), "single")


def _job_id(env: dict) -> str | None:
    if env.get("SLURM_JOB_ID"):
        # A requeued Slurm job keeps its id, so it finds its own checkpoints again.
        return f"slurm-{env['SLURM_JOB_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        # torchrun --standalone draws a fresh id per launch; --rdzv-id names it; restarts
        # under --max-restarts keep it.
        return run_id
    return None


class RunDirError(ValueError):
    pass


@functools.cache
def default_run_dir() -> str:
    """`runs/<job id>`, the same on every rank; `runs/<time>-<pid>` for a single process.

    A per-rank timestamp would give each rank its own directory, so a multi-process launch
    without a job id (torchrun's static rendezvous with no --rdzv-id) must name run_dir.
    Cached: one process resolves one name however often Hydra asks.
    """
    launch = detect()
    if launch.run_id is not None:
        return os.path.join("runs", launch.run_id)
    if launch.world_size == 1:
        return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    raise RunDirError(
        f"run_dir is not set and this torchrun launch of {launch.world_size} processes has no "
        "run id to share (TORCHELASTIC_RUN_ID=none, no SLURM_JOB_ID); pass run_dir=<dir>, or "
        "launch with `torchrun --standalone` or `--rdzv-id <name>`"
    )
