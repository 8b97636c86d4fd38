"""Emulated slow links on one machine: a wrapper that makes torch.distributed collectives take
the time a slow interconnect would.

Processes on one host talk through shared memory and loopback, so communication costs almost
nothing and overlapping it cannot show. `SlowLink` wraps all_reduce, all_gather and
reduce_scatter (synchronous and asynchronous) so that each completes `latency` after its bytes
have crossed the link at `bandwidth`; the bytes of concurrent collectives share the link (one
transfer's bytes start when the previous one's end), their latencies overlap. Asynchronous collectives
progress in the background: only `wait()` sleeps for what remains. Inside a rank it is
installed with `with SlowLink(...):`. This is the byte-proportional comm wrapper of
docs/architecture.md ("Emulation"); network namespaces with rate-limited links
(launch/cluster.py) are the other option.

`events` records, in order, each collective's posting and the end of its wait, so tests can
judge overlap by order rather than by the clock (`max_in_flight`).
"""
from __future__ import annotations

import time

import torch.distributed as dist

_WRAPPED = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
            "reduce_scatter_tensor")


class _DelayedWork:
    def __init__(self, work, ready_at: float, on_wait):
        self.work, self.ready_at, self.on_wait = work, ready_at, on_wait

    def wait(self, *args, **kwargs):
        result = self.work.wait(*args, **kwargs)
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))
        self.on_wait()
        return result

    def is_completed(self):
        return self.work.is_completed() and time.perf_counter() >= self.ready_at

    def __getattr__(self, name):
        return getattr(self.work, name)


class SlowLink:
    """latency: seconds per collective; bandwidth: bytes per second (0 = unlimited); a
    collective moves `traffic(bytes)` bytes over the link (default: the ring all-reduce's
    2·(n−1)/n of the buffer, counted on the larger of input and output)."""

    def __init__(self, latency: float = 0.0, bandwidth: float = 0.0):
        self.latency, self.bandwidth = latency, bandwidth
        self.busy_until = 0.0
        self.collectives = 0
        self.events: list[tuple[str, int]] = []  # ("post" | "done", collective number), in order
        self._saved = {}

    def _transfer(self, nbytes: int, group) -> float:
        n = dist.get_world_size(group) if group is not None else dist.get_world_size()
        moved = 2 * (n - 1) / n * nbytes if n > 1 else 0
        return moved / self.bandwidth if self.bandwidth else 0.0

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            tensors = [a for a in args if hasattr(a, "nbytes")] + [v for v in kwargs.values() if hasattr(v, "nbytes")]
            nbytes = max((t.nbytes for t in tensors), default=0)
            group = kwargs.get("group")
            now = time.perf_counter()
            self.busy_until = max(now, self.busy_until) + self._transfer(nbytes, group)
            ready = self.busy_until + self.latency
            self.collectives += 1
            number = self.collectives
            self.events.append(("post", number))
            work = fn(*args, **kwargs)
            if kwargs.get("async_op"):
                return _DelayedWork(work, ready, lambda: self.events.append(("done", number)))
            time.sleep(max(0.0, ready - time.perf_counter()))
            self.events.append(("done", number))
            return work

        return wrapped

    def max_in_flight(self) -> int:
        """The most collectives posted and not yet waited for at any point (1: none overlapped)."""
        pending, most = set(), 0
        for kind, number in self.events:
            if kind == "post":
                pending.add(number)
                most = max(most, len(pending))
            else:
                pending.discard(number)
        return most

    def __enter__(self):
        for name in _WRAPPED:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
