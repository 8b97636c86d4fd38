"""Where this process sits in the job, read from the launcher's environment.

- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT and
  TORCHELASTIC_RUN_ID;
- Slurm, when `srun` starts one task per rank without torchrun, sets SLURM_PROCID,
  SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID and SLURM_JOB_NODELIST (the first host is the master);
- without either, the process is a world of one.

`nic_class` tells this node's kind of network card (Holmes placement). `socket_interface` finds the network interface on the route to the master, which gloo and NCCL
are told to use (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME) unless set already.
"""
from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    run_id: str | None  # a name every rank of this job agrees on, or None
    launcher: str  # "torchrun" | "slurm" | "single"
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int = 0  # which node of the job this process runs on

    @property
    def is_distributed(self) -> bool:
        return self.launcher != "single"


def _int(env: dict, key: str, default: int) -> int:
    value = env.get(key)
    return default if value in (None, "") else int(value)


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list: "gpu[01-03,07],login1" -> gpu01, gpu02, gpu03, gpu07, login1."""
    hosts, depth, token = [], 0, ""
    for ch in nodelist + ",":
        if ch == "," and depth == 0:
            if token:
                match = re.fullmatch(r"(.*?)\[(.*)\](.*)", token)
                if not match:
                    hosts.append(token)
                else:
                    prefix, ranges, suffix = match.groups()
                    for part in ranges.split(","):
                        lo, _, hi = part.partition("-")
                        for n in range(int(lo), int(hi or lo) + 1):
                            hosts.append(f"{prefix}{n:0{len(lo)}d}{suffix}")
            token = ""
            continue
        depth += (ch == "[") - (ch == "]")
        token += ch
    return hosts


def detect(env: dict | None = None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(rank=_int(env, "RANK", 0), world_size=_int(env, "WORLD_SIZE", 1),
                         local_rank=_int(env, "LOCAL_RANK", 0), local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
                         run_id=_job_id(env), launcher="torchrun", master_addr=env.get("MASTER_ADDR"),
                         master_port=_int(env, "MASTER_PORT", DEFAULT_PORT), node_rank=_int(env, "GROUP_RANK", 0))
    if _int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        per_node = _int(env, "SLURM_NTASKS_PER_NODE", 0) or max(1, _int(env, "SLURM_NTASKS", 1) // max(len(nodes), 1))
        # A port all tasks agree on, different between concurrent jobs.
        port = _int(env, "MASTER_PORT", 0) or 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000
        return LaunchEnv(rank=_int(env, "SLURM_PROCID", 0), world_size=_int(env, "SLURM_NTASKS", 1),
                         local_rank=_int(env, "SLURM_LOCALID", 0), local_world_size=per_node, run_id=_job_id(env),
                         launcher="slurm", master_addr=env.get("MASTER_ADDR") or (nodes[0] if nodes else "localhost"),
                         master_port=port, node_rank=_int(env, "SLURM_NODEID", 0))
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


def socket_interface(master_addr: str) -> str | None:
    """The interface this host uses to reach `master_addr` (the interface holding that address
    when it is this host's own), or None when it cannot be told."""
    try:
        master_addr = socket.gethostbyname(master_addr)
        route = subprocess.run(["ip", "-o", "route", "get", master_addr], capture_output=True, text=True,
                               timeout=5).stdout
    except (OSError, subprocess.SubprocessError, socket.error):
        return None
    dev = re.search(r"\bdev (\S+)", route)
    if dev and dev.group(1) != "lo":
        return dev.group(1)
    # The master is this host: name the interface that carries its address, not loopback,
    # so that peers reach the address this rank advertises.
    try:
        addrs = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in addrs.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3].split("/")[0] == master_addr:
            return fields[1]
    return dev.group(1) if dev else None


def nic_class(env: dict | None = None, sysfs: str = "/sys/class/infiniband") -> str:
    """This node's NIC class: QUINTET_NIC_CLASS when set; else `ib` when an RDMA port has an
    InfiniBand link layer, `roce` when one has an Ethernet link layer (RDMA over Converged
    Ethernet), and plain `ethernet` without RDMA devices."""
    env = os.environ if env is None else env
    if env.get("QUINTET_NIC_CLASS"):
        return env["QUINTET_NIC_CLASS"]
    layers = set()
    root = Path(sysfs)
    for layer in root.glob("*/ports/*/link_layer") if root.is_dir() else ():
        try:
            layers.add(layer.read_text().strip().lower())
        except OSError:
            continue
    if "infiniband" in layers:
        return "ib"
    return "roce" if "ethernet" in layers else "ethernet"


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
