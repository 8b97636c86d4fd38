"""This rank's side of the per-step efficiency figures: the device's peak FLOP/s, peak memory,
and the time the step waited for data (parallel code gathers them over ranks; the trainer turns
them into metrics).

The peak FLOP/s behind MFU comes from, in this order: `logging.peak_tflops`; NVIDIA's dense
datasheet figure for H100/H200 in the run's precision; a matrix-multiply probe on this device.
The probe runs while every process of the node probes, as they will all compute while
training, and takes the best of a few trials. It is trusted — and kept in
`$XDG_CACHE_HOME/quintet/peak_flops.json` for a week — only when the probing process had the
cores it asked for (its CPU time over the trial's wall time and its threads: a busy machine
reads low, and a low peak would put MFU above 100%). The cache key is everything that changes
the figure: host, device, precision, threads, processes per node, cores available and torch's
version. Should a step still do more than the peak (MFU above 1), the step reports a warning,
the peak is measured again and raised to at least what the step achieved, and the cache with it.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import time
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s per GPU, NVIDIA datasheets. fp32 is the non-tensor-core
# figure: torch runs fp32 matrix multiplies without TF32 unless told otherwise.
PEAK_TFLOPS = {
    ("H100 PCIe", "bfloat16"): 756.0, ("H100 PCIe", "float32"): 51.2,
    ("H100", "bfloat16"): 989.4, ("H100", "float32"): 66.9,
    ("H200", "bfloat16"): 989.4, ("H200", "float32"): 66.9,
}
PROBE_SECONDS = 0.3
PROBE_TRIALS = 3
TRUSTED_CPU_SHARE = 0.8  # of the asked-for threads' time the probe must get to be cached
CACHE_TTL_S = 7 * 24 * 3600


def datasheet_peak(device_name: str, dtype: str) -> float | None:
    """The table's FLOP/s for a device name as CUDA reports it ("NVIDIA H100 80GB HBM3")."""
    for (model, precision), tflops in PEAK_TFLOPS.items():  # the more specific names come first
        if precision == dtype and all(word in device_name for word in model.split()):
            return tflops * 1e12
    return None


def probe_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = PROBE_SECONDS,
                     n: int | None = None) -> float:
    """The sustained FLOP/s of n×n matrix products on `device` over about `seconds` (n: 1024 on
    CPU, 8192 on GPU unless given)."""
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, first touch of the output
    _sync(device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        torch.mm(a, b)
        done += 1
        if device.type == "cuda" and done % 10 == 0:
            _sync(device)  # the clock reads finished work, not queued launches
    _sync(device)
    return 2 * n**3 * done / (time.perf_counter() - start)


def measure_peak(device: torch.device, dtype: torch.dtype, trials: int = PROBE_TRIALS,
                 seconds: float = PROBE_SECONDS / PROBE_TRIALS) -> tuple[float, bool]:
    """(the best of `trials` probes, whether it can be trusted): on a CPU only a trial in which
    this process got at least TRUSTED_CPU_SHARE of its threads' time counts as idle enough."""
    best, trusted = 0.0, False
    for _ in range(trials):
        wall, cpu = time.perf_counter(), time.process_time()
        flops = probe_peak_flops(device, dtype, seconds=seconds)
        share = (time.process_time() - cpu) / ((time.perf_counter() - wall) * torch.get_num_threads())
        if device.type != "cpu" or share >= TRUSTED_CPU_SHARE:
            trusted = True
        best = max(best, flops)
    return best, trusted


def format_flops(flops: float) -> str:
    """A FLOP/s figure in the unit that keeps three significant digits (never "0.0 TFLOP/s")."""
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP/s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quintet" / "peak_flops.json"


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it."""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if match:
            return match.group(1).strip()
    return platform.processor() or "cpu"


def _cache_key(device_name: str, dtype_name: str, local_world_size: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.node()}|{device_name}|{dtype_name}|threads={torch.get_num_threads()}|procs={local_world_size}"
            f"|cores={cores}|torch={torch.__version__}")


def peak_flops(device: torch.device, dtype: torch.dtype, local_world_size: int,
               configured_tflops: float | None = None, *, refresh: bool = False,
               at_least: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of this rank's device, where the figure comes from). `refresh` measures
    again instead of reading the cache, and the figure is never below `at_least` (what a step
    was seen to achieve)."""
    if configured_tflops:
        return max(configured_tflops * 1e12, at_least), "logging.peak_tflops"
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name, dtype_name)
        if peak is not None:
            return max(peak, at_least), f"datasheet: {name}, {dtype_name}"
    else:
        name = cpu_name()
    key = _cache_key(name, dtype_name, local_world_size)
    path = _cache_path()
    cache: dict = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(path.read_text())
    entry = cache.get(key)
    fresh = isinstance(entry, dict) and time.time() - entry.get("time", 0) < CACHE_TTL_S
    source = (f"matmul probe ({name}, {dtype_name}, {torch.get_num_threads()} threads, {local_world_size} processes "
              f"per node; {path})")
    if fresh and not refresh:
        return max(float(entry["flops"]), at_least), source
    flops, trusted = measure_peak(device, dtype)
    flops = max(flops, at_least)
    if not trusted and at_least == 0.0:
        return flops, source.replace("; ", "; the machine was busy, so it was not cached; ")
    cache = {k: v for k, v in cache.items() if isinstance(v, dict) and time.time() - v.get("time", 0) < CACHE_TTL_S}
    cache[key] = {"flops": flops, "time": time.time()}
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a probe
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    return flops, source


class MemoryMeter:
    """This process's peak memory since the last `reset`: CUDA's max allocated bytes, or on CPU
    the resident set's high-water mark (VmHWM, which writing 5 to /proc/self/clear_refs resets;
    where that is not allowed, the peak of the process's lifetime)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._status = Path("/proc/self/status")
        self._resettable = device.type == "cpu" and self._write_clear_refs()

    @staticmethod
    def _write_clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            self._write_clear_refs()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self._resettable:
            match = re.search(r"VmHWM:\s+(\d+) kB", self._status.read_text())
            if match:
                return int(match.group(1)) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


class StepAccounting:
    """A step's efficiency metrics from its time and every rank's measurements.

    `gather(values)` returns each rank's list of values (parallel.collectives.gather_ranks: one
    small all-gather); `comm_seconds()`, where collective timing exists, this rank's seconds
    blocked in communication since the last call. `raise_peak(achieved)`, when a step did more
    FLOP/s per device than the peak, returns this rank's device peak measured again and at
    least `achieved`; `on_new_peak(record)` reports it (a warning and a metrics event).
    """

    def __init__(self, *, flops_per_token: int, tokens_per_step: int, world_size: int, peak_flops_total: float,
                 memory: MemoryMeter, gather, comm_seconds=None, raise_peak=None, on_new_peak=None):
        self.flops_per_token, self.tokens_per_step = flops_per_token, tokens_per_step
        self.world_size, self.peak_flops_total = world_size, peak_flops_total
        self.memory, self.gather, self.comm_seconds = memory, gather, comm_seconds
        self.raise_peak = raise_peak or (lambda achieved: achieved)
        self.on_new_peak = on_new_peak or (lambda record: None)
        self.data_wait_s = 0.0

    def begin_step(self) -> None:
        self.memory.reset()
        self.data_wait_s = 0.0

    @contextlib.contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait_s += time.perf_counter() - start

    def metrics(self, step_time_s: float) -> dict:
        """Collective (every rank calls it at the end of every step). Throughput is rank 0's step
        time, so that every rank takes the same decisions from the same figures."""
        comm = self.comm_seconds() if self.comm_seconds is not None else None
        ranks = self.gather([self.memory.peak_bytes(), self.data_wait_s, comm or 0.0, step_time_s])
        memory, wait, comm_ranks, step_times = (list(column) for column in zip(*ranks))
        tokens_per_s = self.tokens_per_step / step_times[0]
        flops = self.flops_per_token * tokens_per_s  # achieved model FLOP/s of the whole job
        if flops > self.peak_flops_total:
            self._new_peak(flops)
        out = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_rank": tokens_per_s / self.world_size,
            "flops_per_token": self.flops_per_token,
            "tflops_per_device": flops / self.world_size / 1e12,
            "mfu": flops / self.peak_flops_total,
            "memory_gib": max(memory) / 2**30,
            "memory_gib_ranks": [m / 2**30 for m in memory],
            "data_wait_s": max(wait),
        }
        if comm is not None:
            out.update(comm_s=sum(comm_ranks) / len(comm_ranks), comm_s_ranks=comm_ranks)
        return out

    def _new_peak(self, flops: float) -> None:
        """A step beat the peak: the peak was measured low (a busy machine, or a configured figure
        below the device's). Measure again, never below what was achieved, on every rank."""
        achieved = flops / self.world_size
        old = self.peak_flops_total
        self.peak_flops_total = sum(p for (p,) in self.gather([self.raise_peak(achieved)]))
        self.on_new_peak({"event": "peak", "time": time.time(), "mfu_against_old_peak": flops / old,
                          "old_peak_tflops_total": old / 1e12, "peak_tflops_total": self.peak_flops_total / 1e12,
                          "peak_tflops_per_device": self.peak_flops_total / self.world_size / 1e12})
