"""A per-rank timeline in Chrome trace format (viewable in Perfetto or chrome://tracing).

With `trace=true` each rank records intervals — forward, backward, weight-gradient and
communication waits per microbatch and chunk — into `<run_dir>/trace/rank<k>.json`, appended
after every step in the trace format's JSON-array form, whose closing bracket is optional: the
file of a run that is still going (or has crashed) opens as it is, and memory holds one step's
events. Recording is local to the rank; when tracing is off every call is a no-op.
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
        # Timestamps on the wall clock (µs since the epoch), advanced by the monotonic counter:
        # ranks' timelines line up with each other and with metrics.jsonl's times.
        self.origin, self.origin_wall = time.perf_counter(), time.time()
        self.step = 0
        self._window: tuple[float, float] | None = None
        self._busy = 0.0
        self._started = False  # the file exists, with its header

    def now_us(self) -> float:
        return (self.origin_wall + time.perf_counter() - self.origin) * 1e6

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

    def flush(self) -> None:
        """Append the events recorded since the last flush to the rank's file (without a run
        directory they stay in `events`)."""
        if not self.enabled or self.path is None or not self.events:
            return
        if not self._started:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}
            self.path.write_text("[\n" + json.dumps(meta) + ",\n")
            self._started = True
        with self.path.open("a") as f:
            f.write("".join(json.dumps(e) + ",\n" for e in self.events))
        self.events.clear()

    def close(self) -> None:
        """Flush, and end the array: a finished run's file is plain JSON."""
        self.flush()
        if self._started:
            with self.path.open("r+b") as f:
                f.seek(-2, os.SEEK_END)  # the last event's ",\n"
                f.truncate()
                f.write(b"\n]\n")
            self._started = False


def read_trace(path: str | os.PathLike) -> list[dict]:
    """The events of a trace file, also while its run is still appending to it."""
    text = Path(path).read_text().rstrip()
    if not text.startswith("["):
        return json.loads(text)["traceEvents"]  # the object form, as other tools write it
    lines = text[1:].removesuffix("]").splitlines()
    events = []
    for line in lines:
        line = line.strip().removesuffix(",")
        if line:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # the last line, caught mid-write
                break
    return events
