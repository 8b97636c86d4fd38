"""A per-rank timeline in Chrome trace format (viewable in Perfetto or chrome://tracing).

With `trace=true` each rank records intervals — forward, backward, weight-gradient and
communication waits per microbatch and chunk — into `<run_dir>/trace/rank<k>.json`. Recording
is local to the rank; when tracing is off every call is a no-op.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

COMPUTE = ("forward", "backward", "weight")


class Tracer:
    def __init__(self, enabled: bool, rank: int = 0, run_dir: str | None = None):
        self.enabled, self.rank = enabled, rank
        self.path = Path(run_dir) / "trace" / f"rank{rank}.json" if run_dir else None
        self.events: list[dict] = []
        self.origin = time.perf_counter()
        self.step = 0
        self._window: tuple[float, float] | None = None
        self._busy = 0.0

    def now_us(self) -> float:
        return (time.perf_counter() - self.origin) * 1e6

    @contextlib.contextmanager
    def span(self, name: str, cat: str, **args):
        if not self.enabled:
            yield
            return
        start = self.now_us()
        try:
            yield
        finally:
            end = self.now_us()
            self.events.append({"name": name, "cat": cat, "ph": "X", "ts": start, "dur": end - start,
                                "pid": self.rank, "tid": 0, "args": {"step": self.step, **args}})
            if cat in COMPUTE:
                self._busy += end - start

    @contextlib.contextmanager
    def pipeline_step(self, step: int):
        """The span of one step's schedule; afterwards `bubble` is its idle time over busy time."""
        self.step, self._busy = step, 0.0
        start = self.now_us()
        with self.span(f"step {step}", "step"):
            yield
        self._window = (start, self.now_us())

    @property
    def bubble(self) -> float | None:
        """(span − compute) / compute of the last step's schedule on this rank."""
        if not self.enabled or self._window is None or self._busy == 0:
            return None
        span = self._window[1] - self._window[0]
        return (span - self._busy) / self._busy

    def write(self) -> None:
        if not self.enabled or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        tmp.write_text(json.dumps({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}))
        os.replace(tmp, self.path)
