"""Per-step metrics: `<run_dir>/metrics.jsonl`, a progress display, and Weights & Biases.

Only the rank that owns the sink (rank 0) writes anything. metrics.jsonl gets one JSON object
per optimizer step, flushed at once, so a run that is still going can be read, and one per
event, which has no step: a launch's start (its FLOP and peak accounting), a checkpoint requested
or committed, a hang reported by the collective monitor (`{"event": "hang", ...}`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("quintet")


def _records(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a running run, caught mid-write
            break
    return records


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The per-step records."""
    return [r for r in _records(run_dir) if "event" not in r]


def read_events(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records without a step (launch starts, checkpoints, hangs), or those of one kind."""
    return [r for r in _records(run_dir) if "event" in r and kind in (None, r["event"])]


class Progress:
    """One updating line on a terminal; a plain line every `every` steps otherwise."""

    def __init__(self, total: int, every: int, stream=None):
        self.total, self.every = total, max(every, 1)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()

    def update(self, m: dict) -> None:
        step = m["step"]
        eta = (self.total - step) * m["step_time_s"]
        mfu = f"  mfu {m['mfu']:.1%}" if "mfu" in m else ""
        val = f"  val_loss {m['val_loss']:.4f}  val_ppl {m['val_ppl']:,.2f}" if "val_loss" in m else ""
        text = (f"step {step}/{self.total}  loss {m['loss']:.4f}{val}  grad_norm {m['grad_norm']:.3f}  "
                f"lr {m['lr']:.2e}  {m['tokens_per_s']:,.0f} tok/s{mfu}  eta {eta:,.0f}s")
        if self.tty:
            end = "\n" if step == self.total or val else ""  # an evaluation's line stays on screen
            self.stream.write("\r\033[K" + text + end)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total or step == 1 or val:
            log.info(text)


class MetricsSink:
    def __init__(self, run_dir: str, active: bool, total_steps: int, log_every: int,
                 wandb_cfg=None, config: dict | None = None, draw_report=None):
        """`draw_report(run_dir) -> {name: png path}` (runtime/report.py's write_report): the
        figures sent to wandb when the run closes."""
        self.active, self.draw_report = active, draw_report
        self.path = Path(run_dir) / "metrics.jsonl"
        self.progress = Progress(total_steps, log_every)
        self.wandb = None
        self.last_step = 0
        self._lock = threading.Lock()
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg is not None and wandb_cfg.mode.value != "disabled":
            self.wandb = _start_wandb(run_dir, wandb_cfg, config or {})

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step`: a resumed run rewrites them, so none repeats."""
        if not self.active or not self.path.exists():
            return
        kept = [json.dumps(m) for m in _records(self.path.parent) if "event" in m or m["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, metrics: dict) -> None:
        if not self.active:
            return
        self._append(metrics)
        self.last_step = metrics["step"]
        self.progress.update(metrics)
        if self.wandb is not None:
            self.wandb.log(wandb_row(metrics), step=metrics["step"])

    def event(self, record: dict) -> None:
        """A record without a step: a checkpoint requested or committed (the commit may come
        from a background thread), a hang (from the monitor's watchdog while the training thread
        is stuck), the start of a launch. wandb gets a hang as `monitor/hang` and in the summary;
        the others reach it as the report's figures."""
        if not self.active:
            return
        self._append(record)
        if self.wandb is not None and record["event"] == "hang":
            self.wandb.log({"monitor/hang": 1})
            self.wandb.summary["monitor/hang"] = json.dumps(record)

    def _append(self, record: dict) -> None:
        with self._lock, self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def note(self, message: str) -> None:
        """An event worth a line in the log (rank 0 only), e.g. stopping on a signal."""
        if self.active:
            logging.getLogger("quintet").warning(message)

    def close(self, send_report: bool = True) -> None:
        """Finish the wandb run, after sending it the report's figures (not when the process is
        about to exit on a hang: drawing is not worth the delay there)."""
        if self.wandb is not None:
            if send_report and self.draw_report is not None:
                self._send_report()
            self.wandb.finish()
            self.wandb = None

    def _send_report(self) -> None:
        """The report's figures (runtime/report.py, also written to <run_dir>/report/) as wandb
        images at the last step."""
        import wandb

        try:
            paths = self.draw_report(self.path.parent)
        except Exception as e:  # noqa: BLE001 - the run's records stand; a figure is not worth failing it
            log.warning("could not draw the report for wandb: %s", e)
            return
        images = {f"report/{name}": wandb.Image(str(path)) for name, path in paths.items()}
        self.wandb.log(images, step=self.last_step)


def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def wandb_row(metrics: dict) -> dict:
    """Scalars for wandb: MoE expert loads become each expert's share of its layer's tokens and
    the layer's max/mean load (1 = balanced)."""
    row = {}
    for key, value in metrics.items():
        if key == "expert_load":
            for layer, counts in value.items():
                total = sum(counts) or 1.0
                row[f"moe/layer{layer}/max_over_mean"] = max(counts) * len(counts) / total
                row.update({f"moe/layer{layer}/expert{e}": c / total for e, c in enumerate(counts)})
        elif key.endswith("_ranks") and key != "slow_ranks":  # memory_gib_ranks → memory_gib/rank0, ...
            row.update({f"{key.removesuffix('_ranks')}/rank{r}": v for r, v in enumerate(value)})
        elif key == "slow_ranks":
            row["monitor/slow_ranks"] = len(value)
            row.update({f"monitor/slow_rank{r}": 1 for r in value})
        elif key not in ("step", "time") and isinstance(value, (int, float)) and _finite(value):
            row[key] = value
    return row


def _start_wandb(run_dir: str, cfg, config: dict):
    import wandb  # imported only when used: it is slow to import

    run_dir = os.path.abspath(run_dir)
    # A stable id per run directory, so a resumed run continues the same wandb run.
    run_id = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
    return wandb.init(
        mode=cfg.mode.value, project=cfg.project, entity=cfg.entity,
        name=cfg.name or os.path.basename(run_dir), id=run_id, resume="allow",
        dir=run_dir, config=config,
        # No console capture or code upload: quintet's own log and config.yaml are the record.
        settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True),
    )


class StepTimer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.t0 = now - self.t0, now
        return elapsed
