"""This rank's side of the per-step efficiency figures: the device's peak FLOP/s, peak memory,
and the time the step waited for data (parallel code gathers them over ranks; the trainer turns
them into metrics).

The peak FLOP/s behind MFU comes from, in this order: `logging.peak_tflops`; NVIDIA's dense
datasheet figure for H100/H200 in the run's precision; a matrix-multiply probe on this device,
measured once per machine, precision and processes per node, and kept in
`$XDG_CACHE_HOME/quintet/peak_flops.json` (delete the file to measure again). The probe runs
while every process of the node probes, as they will all compute while training.
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


def peak_flops(device: torch.device, dtype: torch.dtype, local_world_size: int,
               configured_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of this rank's device, where the figure comes from)."""
    if configured_tflops:
        return configured_tflops * 1e12, "logging.peak_tflops"
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name, dtype_name)
        if peak is not None:
            return peak, f"datasheet: {name}, {dtype_name}"
    else:
        name = cpu_name()
    key = f"{platform.node()}|{name}|{dtype_name}|threads={torch.get_num_threads()}|procs={local_world_size}"
    path = _cache_path()
    cache: dict = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(path.read_text())
    if key not in cache:
        cache[key] = probe_peak_flops(device, dtype)
        with contextlib.suppress(OSError):  # a read-only home only costs the next run a probe
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, path)
    return cache[key], f"matmul probe ({name}, {dtype_name}, {torch.get_num_threads()} threads, {local_world_size} " \
                       f"processes per node; {path})"


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

    `gather(values)` returns each rank's list of values (parallel.Parallelized.gather_ranks: one
    small all-gather); `comm_seconds()`, where collective timing exists, this rank's seconds
    blocked in communication since the last call.
    """

    def __init__(self, *, flops_per_token: int, tokens_per_step: int, world_size: int, peak_flops_total: float,
                 memory: MemoryMeter, gather, comm_seconds=None):
        self.flops_per_token, self.tokens_per_step = flops_per_token, tokens_per_step
        self.world_size, self.peak_flops_total = world_size, peak_flops_total
        self.memory, self.gather, self.comm_seconds = memory, gather, comm_seconds
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
        """Collective (every rank calls it at the end of every step)."""
        comm = self.comm_seconds() if self.comm_seconds is not None else None
        ranks = self.gather([self.memory.peak_bytes(), self.data_wait_s, comm or 0.0])
        memory, wait, comm_ranks = (list(column) for column in zip(*ranks))
        tokens_per_s = self.tokens_per_step / step_time_s
        flops = self.flops_per_token * tokens_per_s  # achieved model FLOP/s of the whole job
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
