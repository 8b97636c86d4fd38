"""A real single-node Slurm for tests: munged, slurmctld and slurmd on localhost, with a minimal
slurm.conf, state and sockets in a temporary directory; everything is stopped and removed on
exit. Installs Debian's slurm-wlm and munge when they are missing and we are root with apt-get.

    with LocalSlurm(tmp_path) as slurm:
        job = slurm.sbatch(["slurm/train.sbatch", "train.steps=5"], env={"QUINTET_NPROC_PER_NODE": "2"})
        slurm.wait(job)
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from launch.spawn import scaled

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")


def ensure_installed() -> str | None:
    """None when Slurm can run here (installing it if missing and permitted), else why not."""
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd and munged)"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get is not available to install it"
    def apt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=scaled(600),
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})

    proc = apt("install", "-y", "-q", "slurm-wlm", "munge")
    if proc.returncode:  # a fresh machine may have no package lists yet
        apt("update", "-q")
        proc = apt("install", "-y", "-q", "slurm-wlm", "munge")
    if proc.returncode or not all(shutil.which(b) for b in BINARIES):
        return f"installing slurm-wlm and munge failed: {proc.stderr.strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, workdir: Path, cpus: int = 2):
        self.dir = Path(workdir) / "slurm"
        self.cpus = cpus
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[Path] = []

    def __enter__(self) -> "LocalSlurm":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        munge_socket = d / "munge.sock"
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, timeout=scaled(30))
        self._run(["munged", "--force", f"--socket={munge_socket}", f"--key-file={key}", f"--log-file={d / 'munged.log'}",
                   f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"])
        self._pids.append(d / "munged.pid")
        self.conf.write_text("\n".join([
            # Job ids restart with every fresh state directory; start them at a random point so a
            # job's run directory (runs/slurm-<id>) never meets one left by an earlier instance.
            "ClusterName=quintet", f"FirstJobId={random.randrange(10**6, 6 * 10**7)}",  # below the default MaxJobId
            f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=2000 State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
        self._run(["slurmctld", "-f", str(self.conf)])
        self._pids.append(d / "slurmctld.pid")
        self._run(["slurmd", "-f", str(self.conf)])
        self._pids.append(d / "slurmd.pid")
        deadline = time.monotonic() + scaled(60)
        while time.monotonic() < deadline:
            state = self._out(["sinfo", "-h", "-o", "%t"]).strip()
            if state in ("idle", "mix", "alloc"):
                return
            time.sleep(1)
        raise RuntimeError(f"the local Slurm node did not come up (state {state!r}); see {d}/slurm*.log")

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, timeout=scaled(60), env=self.env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-500:]}"
                               f" (logs in {self.dir})")

    def _out(self, cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(60), env=self.env).stdout

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", "-o", str(self.dir / "job-%j.out"), *args], capture_output=True,
                             text=True, timeout=scaled(60), env={**self.env, **(env or {})}, cwd=cwd, check=True).stdout
        return int(out.strip().split(";")[0])

    def requeue(self, job: int, timeout: float = 60) -> None:
        """Requeue a running job as a preemption would. Slurm holds a requeued job for two minutes
        (its BeginTime); once it is pending we move its start to now, as an operator could."""
        self._run(["scontrol", "requeue", str(job)])
        deadline = time.monotonic() + timeout
        while self._out(["squeue", "-h", "-j", str(job), "-o", "%T"]).strip() != "PENDING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm job {job} did not return to the queue in {timeout:.0f}s")
            time.sleep(0.2)
        self._run(["scontrol", "update", f"jobid={job}", "StartTime=now"])

    def running(self, job: int) -> bool:
        return bool(self._out(["squeue", "-h", "-j", str(job)]).strip())

    def wait(self, job: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.running(job):
            if time.monotonic() > deadline:
                subprocess.run(["scancel", str(job)], env=self.env, timeout=scaled(30))
                raise TimeoutError(f"Slurm job {job} did not finish in {timeout:.0f}s")
            time.sleep(1)

    def output(self, job: int) -> str:
        path = self.dir / f"job-{job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=scaled(30))
        for pid_file in reversed(self._pids):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        for pid_file in self._pids:
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        self._pids.clear()
