"""One job per run directory: a lock held for the life of the job.

`<dir>/job.lock` names the job that holds it (job id, host, pid, start time, command). Global
rank 0 takes an exclusive `flock` on it, which the kernel drops when the process dies however
it dies, so a lock left by a crashed or killed job is recognised as stale and taken over (the
file stays; the lock on it does not). The other ranks of the job take no lock: they wait until
the file names their own job (their rank 0 has it), and stop if a live lock names another job.
The job id is the one every rank shares — Slurm's job id, torchrun's run id, the rendezvous
address — and survives torchrun restarts and Slurm requeues, so those resume into their
directory; a second job, started while the first runs, gets a clear error instead.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from launch import env as launch_env

LOCK_NAME = "job.lock"
_held: dict[str, int] = {}  # resolved directory -> open descriptor holding its flock (this process)


class RunDirBusy(RuntimeError):
    """The directory is locked by another live job."""


def job_id(env=None) -> str:
    """The identity every rank of this job shares (launch.env's run id, else the rendezvous
    address, else this single process)."""
    env = os.environ if env is None else env
    launch = launch_env.detect(env)
    if launch.run_id is not None:
        return launch.run_id
    if launch.world_size > 1:
        return f"rendezvous {launch.master_addr}:{launch.master_port}"
    return f"process {os.getpid()} on {socket.gethostname()}"


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    command = str(holder.get("command", "?"))
    command = command if len(command) <= 160 else command[:157] + "..."
    return f"job {holder.get('job')!r} (pid {holder.get('pid')} on host {holder.get('host')}, started {started}: {command})"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _locked_by_someone(fd: int) -> bool:
    """Whether a process holds the flock (probed with a shared lock, released at once)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _take(fd: int, patience_s: float) -> bool:
    """The exclusive lock, retried for `patience_s`: the other ranks' probes hold a shared lock
    for an instant, a live job holds it for good."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def acquire(directory: str | os.PathLike, job: str, owner: bool, key: str = "run_dir",
            wait_s: float = 0.5) -> str | None:
    """Take (owner) or join (other ranks) the lock of `directory` for `job`; raises RunDirBusy
    naming the live holder. Returns a note when a stale lock was taken over. Idempotent within
    a process."""
    directory = Path(directory)
    resolved = str(directory.resolve())
    if resolved in _held:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    busy = (f"{key}={directory} is in use by another job: {{}}. Two jobs in one directory would mix their "
            f"metrics and checkpoints; wait for that job to end (or stop it), or choose another {key}")
    if owner:
        if not _take(fd, patience_s=1.0):
            os.close(fd)
            raise RunDirBusy(busy.format(_describe(_read(path))))
        previous = _read(path)
        record = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        _held[resolved] = fd  # held until this process exits (or `release_all`)
        if previous and previous.get("job") != job and not previous.get("released"):
            return f"{key}={directory}: took over the lock of {_describe(previous)}, which is no longer running"
        return None
    # Another rank of the job: its rank 0 takes the lock; a live lock of another job stops it
    # (after `wait_s`, the instant between rank 0 taking the lock and writing its name).
    try:
        deadline = time.monotonic() + wait_s
        while True:
            holder = _read(path)
            locked = _locked_by_someone(fd)
            if holder.get("job") == job and locked:
                return None
            if locked and time.monotonic() > deadline:
                raise RunDirBusy(busy.format(_describe(holder)))
            if not locked and time.monotonic() > deadline + wait_s:
                return None  # rank 0 is late; it takes the lock or reports the holder itself
            time.sleep(0.05)
    finally:
        os.close(fd)


def release_all() -> None:
    """Drop this process's locks, marking them released: the next job in the directory then
    knows this one ended (a crashed job's lock also ends with it, unmarked)."""
    for path in list(_held):
        fd = _held.pop(path)
        try:
            holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
            record = (json.dumps({**holder, "released": time.time()}) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)
