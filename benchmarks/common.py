"""Shared helpers of the benchmark scripts: machine description and the JSON result line."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def median(xs) -> float:
    return statistics.median(xs)


def emit(name: str, results: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps({"benchmark": name, "machine": machine(), **results}))
