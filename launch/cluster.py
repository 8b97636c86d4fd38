"""An emulated cluster on one machine: network namespaces as nodes, joined by a bridge.

Each node is a network namespace with its own veth interface and address (10.213.S.i+1/24 on
a private subnet S), attached to a bridge in the root namespace; a node's link can be rate-
limited with `tc … tbf` in both directions (netem is not available). Each node carries a NIC
class label (for the heterogeneous-NIC scheduler). `run` starts one torchrun per node with a
c10d rendezvous on node 0, collects exit codes and logs, enforces a deadline, and every
namespace, veth and bridge this object made is removed on exit — also on failure or interrupt.
Needs root and `ip netns` (tests skip with that reason otherwise).

    with EmulatedCluster(2, rates=[None, "100mbit"]) as cluster:
        results = cluster.torchrun(nproc_per_node=2, args=["parallel.tp=2"], run_dir="runs/x")

    python -m launch.cluster --nodes 2 --nproc-per-node 2 parallel.tp=2 train.steps=5 run_dir=runs/x
"""
from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RDZV_PORT = 29511


class ClusterError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise ClusterError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "emulated cluster needs root (network namespaces, veth, bridges)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "emulated cluster needs iproute2 (ip, tc)"
    probe = f"qprobe{os.getpid() % 100000}"
    if _ip("netns", "add", probe, check=False).returncode:
        return "this machine does not allow `ip netns add`"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class NodeResult:
    node: int
    returncode: int | None  # None: killed at the deadline
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


class EmulatedCluster:
    def __init__(self, nodes: int, rates: list[str | None] | None = None, nic_classes: list[str] | None = None):
        if nodes < 1:
            raise ValueError(f"an emulated cluster needs at least one node, not {nodes}")
        self.nodes = nodes
        self.rates = list(rates) if rates else [None] * nodes
        self.nic_classes = list(nic_classes) if nic_classes else ["ethernet"] * nodes
        if len(self.rates) != nodes or len(self.nic_classes) != nodes:
            raise ValueError(f"rates ({len(self.rates)}) and nic_classes ({len(self.nic_classes)}) need one entry "
                             f"per node ({nodes})")
        token = f"{os.getpid() % 1000:03d}{random.randrange(100):02d}"
        self.subnet = random.randrange(1, 250)
        self.bridge = f"qb{token}"
        self.namespaces = [f"qn{token}n{i}" for i in range(nodes)]
        self.host_ends = [f"qv{token}h{i}" for i in range(nodes)]
        self.node_ends = [f"qv{token}n{i}" for i in range(nodes)]
        self._made: list[tuple[str, str]] = []  # ("netns"|"link", name), in creation order
        self._procs: list[subprocess.Popen] = []

    def address(self, node: int) -> str:
        return f"10.213.{self.subnet}.{node + 1}"

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> "EmulatedCluster":
        atexit.register(self.teardown)
        self._old_term = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()
        signal.signal(signal.SIGTERM, self._old_term)
        atexit.unregister(self.teardown)

    def _on_signal(self, signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def _setup(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("link", "set", self.bridge, "up")
        for i, (ns, host, node) in enumerate(zip(self.namespaces, self.host_ends, self.node_ends)):
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            _ip("link", "add", host, "type", "veth", "peer", "name", node)
            self._made.append(("link", host))
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "up")
            _ip("link", "set", node, "netns", ns)
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", node)
            _ip("netns", "exec", ns, "ip", "link", "set", node, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            if self.rates[i]:
                self._limit(i, self.rates[i])

    def _limit(self, node: int, rate: str) -> None:
        """Token-bucket rate limit on the node's link, both directions."""
        tbf = ["qdisc", "add", "dev", None, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "500ms"]
        for ns, dev in ((None, self.host_ends[node]), (self.namespaces[node], self.node_ends[node])):
            cmd = ["tc", *[dev if a is None else a for a in tbf]]
            full = cmd if ns is None else ["ip", "netns", "exec", ns, *cmd]
            proc = subprocess.run(full, capture_output=True, text=True, timeout=30)
            if proc.returncode:
                raise ClusterError(f"{' '.join(full)}: {proc.stderr.strip()}")

    def teardown(self) -> None:
        """Kill every process started in the namespaces and remove everything made, newest first."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for kind, name in self._made:
            if kind == "netns":
                pids = _ip("netns", "pids", name, check=False).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for kind, name in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)  # a veth's peer goes with it
        self._made.clear()
        self._procs.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this cluster that still exist (empty after teardown)."""
        names = set(_ip("netns", "list", check=False).stdout.split())
        links = _ip("-o", "link", "show", check=False).stdout
        left = [ns for ns in self.namespaces if ns in names]
        left += [n for n in (self.bridge, *self.host_ends) if f" {n}@" in links or f" {n}:" in links]
        return left

    # --- running ---------------------------------------------------------------------------------

    def run(self, argv_of, log_dir: str | os.PathLike, deadline_s: float, env: dict | None = None) -> list[NodeResult]:
        """Run argv_of(node) in every node's namespace at once; wait for all of them until the
        deadline (then kill what is left). Returns each node's exit code and log. Each node's
        environment carries its NIC class label as QUINTET_NIC_CLASS (launch/env.py)."""
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        started, logs = [], []
        for i, ns in enumerate(self.namespaces):
            log = log_dir / f"node{i}.log"
            logs.append(log)
            with open(log, "w") as out:
                proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv_of(i)], stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {}), "QUINTET_NIC_CLASS": self.nic_classes[i]},
                                        start_new_session=True)
            self._procs.append(proc)
            started.append(proc)
        end = time.monotonic() + deadline_s
        codes: list[int | None] = [None] * self.nodes
        while time.monotonic() < end and any(c is None for c in codes):
            for i, proc in enumerate(started):
                if codes[i] is None:
                    codes[i] = proc.poll()
            time.sleep(0.2)
        for i, proc in enumerate(started):
            if codes[i] is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return [NodeResult(i, codes[i], logs[i]) for i in range(self.nodes)]

    def torchrun(self, nproc_per_node: int, args: list[str], run_dir: str, deadline_s: float = 300,
                 module: str = "launch.train", torchrun: str | None = None, static: bool = False) -> list[NodeResult]:
        """`torchrun -m launch.train args` on every node, c10d rendezvous on node 0. c10d numbers
        the nodes in the order they join; `static=True` makes node i node rank i (torchrun's
        static rendezvous), for runs whose rank order must be known in advance."""
        torchrun = torchrun or str(Path(sys.executable).with_name("torchrun"))
        rdzv_id = f"emulated-{self.bridge}"

        def argv(i: int) -> list[str]:
            common = [torchrun, f"--nnodes={self.nodes}", f"--nproc-per-node={nproc_per_node}",
                      f"--local-addr={self.address(i)}"]
            if static:
                rdzv = [f"--node-rank={i}", f"--master-addr={self.address(0)}", f"--master-port={RDZV_PORT}"]
            else:
                # Node 0 hosts the rendezvous store: say so, since torchrun's check by hostname sees
                # the root namespace's name in every namespace.
                rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.address(0)}:{RDZV_PORT}", f"--rdzv-id={rdzv_id}",
                        f"--rdzv-conf=is_host={int(i == 0)}"]
            return [*common, *rdzv, "-m", module, *args, f"run_dir={run_dir}"]

        return self.run(argv, Path(run_dir) / "nodes", deadline_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run launch.train on an emulated cluster of network namespaces")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rate", action="append", default=None, help="per-node link rate (tc tbf), e.g. 100mbit; "
                        "repeat once per node, 'none' for unlimited")
    parser.add_argument("--nic", action="append", default=None, help="per-node NIC class label (QUINTET_NIC_CLASS), "
                        "e.g. ib; repeat once per node")
    parser.add_argument("--static", action="store_true", help="node i is node rank i (static rendezvous)")
    parser.add_argument("--deadline", type=float, default=600)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for launch.train (include run_dir=...)")
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        parser.error(reason)
    run_dirs = [o.split("=", 1)[1] for o in args.overrides if o.startswith("run_dir=")]
    if len(run_dirs) != 1:
        parser.error("give run_dir=<dir> once among the overrides")
    rates = [None if r in (None, "none") else r for r in args.rate] if args.rate else None
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")]
    with EmulatedCluster(args.nodes, rates, args.nic) as cluster:
        results = cluster.torchrun(args.nproc_per_node, overrides, run_dirs[0], args.deadline, static=args.static)
    for r in results:
        print(f"node {r.node}: exit {r.returncode}, log {r.log}")
    sys.exit(max((r.returncode if r.returncode is not None else 124) for r in results))


if __name__ == "__main__":
    main()
