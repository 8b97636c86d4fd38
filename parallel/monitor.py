"""Collective timing and anomaly diagnosis, after C4 (Alibaba, "C4: A Communication-Driven
Approach", 2024).

`CollectiveMonitor.install()` wraps torch.distributed's collective and point-to-point functions
(what quintet's collectives, FSDP2, the pipeline and the MoE dispatchers call) for calls made by
the training thread. Per call it notes the group, the call's sequence number on that group, the
arrival time and, for blocking calls, the completion time — two clock reads and a few dict
updates, no communication.

Hang: every `poll_s` the ranks' watchdog threads exchange their per-group arrival counts over a
gloo group of their own (a rank stuck in its training thread still answers); when a call has not
completed after `hang_timeout_s`, the watchdog names the members whose count shows they never
arrived at that call (for point-to-point, the peer), reports it
(log, `<run_dir>/diagnosis.jsonl`) and ends the process with exit code 3 — before the backend's
own timeout, so that torchrun's restart can act.

Communication time: the seconds of the training thread's blocking calls, per step
(`take_blocked_s`, the step metrics' `comm_s`).

Slow rank: C4's signature of a straggler is that everyone waits for it and it waits for no one.
Each rank sums the time its blocking collectives spent waiting; every `window` steps the ranks
exchange these sums (one all-gather), and a rank whose wait is below the median of the others'
by more than `slow_fraction` of the window's wall time is named in every rank's step metrics
(`slow_ranks`, hence metrics.jsonl and wandb) and in the log. Windows start after each launch's
first step: that step pays one-off costs (gloo connects a group at its first collective, caches
warm up) unevenly across ranks, and judging it named healthy ranks slow.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from parallel.collectives import all_gather_tensor

log = logging.getLogger("quintet")

# torch ≥ 2.13 names the dim-0 collectives all_gather_single / reduce_scatter_single (FSDP2 calls
# those); the older names, deprecated there, call them in turn.
COLLECTIVES = tuple(name for name in (
    "all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
    "all_to_all_single", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "barrier") if hasattr(dist, name))
POINT_TO_POINT = ("send", "recv", "isend", "irecv")
EXIT_HANG = 3


def patch_communication(wrap) -> dict:
    """Replace torch.distributed's collective and point-to-point functions by `wrap(name, fn,
    parameter names)`; returns the originals, for `restore_communication`."""
    originals = {}
    for name in COLLECTIVES + POINT_TO_POINT:
        fn = originals[name] = getattr(dist, name)
        wrapped = wrap(name, fn, list(inspect.signature(fn).parameters))
        setattr(dist, name, wrapped)
        setattr(c10d, name, wrapped)
    return originals


def restore_communication(originals: dict) -> None:
    for name, fn in originals.items():
        setattr(dist, name, fn)
        setattr(c10d, name, fn)


@dataclass
class _Call:
    op: str
    group: str  # the members' ranks, e.g. "0,1"
    seq: int  # this rank's arrivals at the group so far, this call included
    arrived: float
    peer: int | None = None  # point-to-point: the other side
    work: object = None  # asynchronous calls: the Work to poll


class CollectiveMonitor:
    def __init__(self, rank: int, world_size: int, *, hang_timeout_s: float, window: int, slow_fraction: float,
                 run_dir: str | None = None, group_names: dict[str, str] | None = None, poll_s: float = 0.5,
                 on_hang=None):
        """`on_hang(event)`: also called with a hang's report before the process exits (rank 0's
        metrics sink: metrics.jsonl and wandb)."""
        self.rank, self.world_size = rank, world_size
        self.hang_timeout_s, self.window, self.slow_fraction = hang_timeout_s, window, slow_fraction
        self.run_dir, self.group_names, self.on_hang = run_dir, group_names or {}, on_hang
        self.poll_s = min(poll_s, hang_timeout_s / 4)
        self.arrivals: dict[str, int] = {}
        # The slow-rank window: set by end_step after each launch's first step (None until then).
        self.waited = 0.0  # seconds blocking collectives waited, this window
        self.window_start = 0.0
        self.window_end: int | None = None  # the step of the next verdict
        self.blocked = 0.0  # seconds in blocking calls (collectives and point-to-point), since take_blocked_s
        self._active: _Call | None = None  # the blocking call in progress
        self._inside = False  # in a monitored call: a call it makes is part of it
        self._async: list[_Call] = []
        self._owner = threading.get_ident()
        self._keys: dict = {}
        self._originals: dict = {}
        # Collective from here: every rank builds its monitor. The watchdogs' own group keeps their
        # exchange off the training thread's groups (and off the store, where a blocked
        # rendezvous may hold the lock).
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(4 * hang_timeout_s, 10)))
        self._peers: list[dict] = [{} for _ in range(world_size)]  # everyone's counts, last exchange
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._quiet = False  # the monitor's own all-gather is not monitored

    # --- installing ----------------------------------------------------------------------------

    def install(self) -> "CollectiveMonitor":
        if self._originals:
            return self  # installed already
        self._stop, self.window_end = threading.Event(), None  # a new launch: its first step is the warm-up
        self._originals = patch_communication(self._wrap)
        self._thread = threading.Thread(target=self._watch, name="collective-watchdog", daemon=True)
        self._thread.start()
        return self

    def uninstall(self) -> None:
        """Restore torch.distributed and stop the watchdog (every rank calls it: its exchange is
        collective)."""
        restore_communication(self._originals)
        self._originals.clear()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _wrap(self, name: str, fn, params: list[str]):
        g_at = params.index("group")
        a_at = params.index("async_op") if "async_op" in params else None
        peer_at = params.index("dst" if "dst" in params else "src") if name in POINT_TO_POINT else None
        is_async = name in ("isend", "irecv")

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            # One record per call of the training thread: not the monitor's own exchange, and not
            # a deprecated name's call of its successor (all_gather_into_tensor → _single).
            if self._quiet or self._inside or threading.get_ident() != self._owner:
                return fn(*args, **kwargs)
            group = kwargs.get("group", args[g_at] if len(args) > g_at else None)
            key = self._key(group)
            self.arrivals[key] = seq = self.arrivals.get(key, 0) + 1
            peer = None
            if peer_at is not None:
                peer = kwargs.get(params[peer_at], args[peer_at] if len(args) > peer_at else None)
            call = _Call(name, key, seq, time.perf_counter(), peer)
            asynchronous = is_async or (a_at is not None and kwargs.get("async_op", args[a_at] if len(args) > a_at
                                                                         else False))
            self._inside = True
            if asynchronous:
                try:
                    call.work = work = fn(*args, **kwargs)
                finally:
                    self._inside = False
                self._async.append(call)
                return work
            self._active = call
            try:
                out = fn(*args, **kwargs)
            finally:
                self._active, self._inside = None, False
            elapsed = time.perf_counter() - call.arrived
            self.blocked += elapsed
            if peer is None:
                self.waited += elapsed
            return out

        return timed

    def _key(self, group) -> str:
        key = self._keys.get(group)
        if key is None:
            ranks = range(self.world_size) if group is None else dist.get_process_group_ranks(group)
            key = self._keys[group] = ",".join(map(str, ranks))
        return key

    # --- the step's metrics (the training thread, at the end of a step) --------------------------

    def take_blocked_s(self) -> float:
        """Seconds the training thread spent in blocking torch.distributed calls since the last
        call: the step's communication time where the calls block until done (gloo); NCCL's
        return at once, and asynchronous calls count only their launch."""
        blocked, self.blocked = self.blocked, 0.0
        return blocked

    def end_step(self, step: int) -> list[int]:
        """Every `window` steps after the launch's first (a collective): the ranks the others keep
        waiting for."""
        if self.window <= 0:
            return []
        if self.window_end is None:  # the warm-up step, not judged: the first window starts after it
            self.waited, self.window_start, self.window_end = 0.0, time.perf_counter(), step + self.window
            return []
        if step < self.window_end:
            return []
        gathered = torch.zeros(2 * self.world_size, dtype=torch.float64)
        mine = torch.tensor([self.waited, time.perf_counter() - self.window_start], dtype=torch.float64)
        self._quiet = True
        try:
            all_gather_tensor(gathered, mine)
        finally:
            self._quiet = False
        self.waited, self.window_start, self.window_end = 0.0, time.perf_counter(), step + self.window
        w = gathered[0::2].tolist()
        elapsed = gathered[1::2].max().item()  # one window length for all: every rank reaches one verdict
        # Slow: the other ranks' typical wait exceeds this rank's by a fraction of the window.
        slow = [r for r in range(self.world_size)
                if statistics.median(w[:r] + w[r + 1:]) - w[r] > self.slow_fraction * elapsed]
        if slow:
            detail = ", ".join(f"rank {r} {w[r]:.3f} s" for r in range(self.world_size))
            message = (f"slow rank(s) {slow} over steps {step - self.window + 1}-{step}: the others waited for "
                       f"them at collectives (time waited: {detail}, of {elapsed:.3f} s)")
            if self.rank == 0:  # every rank reaches the same verdict
                self._record({"event": "slow_ranks", "time": time.time(), "step": step, "ranks": slow, "waits_s": w})
                log.warning(message)
        return slow

    # --- hangs (the watchdog thread) -----------------------------------------------------------

    def _watch(self) -> None:
        exchanging = True
        while True:
            stopping = self._stop.wait(self.poll_s)
            if exchanging:
                # The exchange is a collective of the watchdogs: they stop together, once every
                # rank has asked to.
                try:
                    everyone = [None] * self.world_size
                    dist.all_gather_object(everyone, (dict(self.arrivals), stopping), group=self._group)
                    self._peers = [counts for counts, _ in everyone]
                    if all(done for _, done in everyone):
                        return
                except Exception as e:  # noqa: BLE001 - a peer process is gone: watch on alone
                    exchanging = False
                    log.error("collective monitor on rank %d: the watchdogs' exchange failed (%s); a peer "
                              "process has probably died", self.rank, e)
            elif stopping:
                return
            now = time.perf_counter()
            self._async = [c for c in self._async if not c.work.is_completed()]
            stuck = [c for c in ([self._active] + self._async[:1]) if c is not None
                     and now - c.arrived > self.hang_timeout_s]
            if stuck:
                self._report_hang(stuck[0], now)

    def _report_hang(self, call: _Call, now: float) -> None:
        members = [int(r) for r in call.group.split(",")]
        if call.peer is not None:
            missing = [call.peer]
        else:
            missing = [r for r in members if r != self.rank and self._peers[r].get(call.group, 0) < call.seq]
        name = self.group_names.get(call.group, "")
        message = (f"hang: {call.op} #{call.seq} on group [{call.group}]{f' ({name})' if name else ''} has not "
                   f"completed after {now - call.arrived:.1f} s on rank {self.rank}; ranks that never arrived: "
                   f"{missing or 'none known (they arrived; the transfer itself is stuck)'}. Exiting with code "
                   f"{EXIT_HANG} so that the launcher can restart the job from its last checkpoint.")
        event = {"event": "hang", "time": time.time(), "rank": self.rank, "op": call.op, "group": members, "call": call.seq,
                 "missing": missing, "waited_s": now - call.arrived}
        self._record(event)
        log.error(message)
        if self.on_hang is not None:
            try:
                self.on_hang(event)
            except Exception as e:  # noqa: BLE001 - the report above stands; exit regardless
                log.error("could not record the hang in the metrics: %s", e)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os._exit(EXIT_HANG)

    def _record(self, event: dict) -> None:
        if self.run_dir is None:
            return
        line = json.dumps(event) + "\n"
        with open(Path(self.run_dir) / "diagnosis.jsonl", "a") as f:  # one short append per event
            f.write(line)
