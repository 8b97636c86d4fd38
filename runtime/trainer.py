"""The training loop: microbatches → gradient reduction → clipping → wait → step → metrics →
checkpoint (DESIGN.md Section 2, step 7).

The loss of a step is the sum of token losses over every target token of the global batch,
divided by the global number of target tokens. Each microbatch's backward uses that global
normaliser, so gradient accumulation and data parallelism (which *sums* gradients) give the
gradient of exactly the loss one process computes on the whole batch.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.optim import lr_at, set_lr
from runtime.metrics import StepTimer
from runtime.checkpoint.format import CheckpointWriteError
from runtime.preemption import StopRequest

IGNORE_INDEX = -100


class NonFiniteError(RuntimeError):
    """More consecutive steps with a NaN/Inf loss or gradient norm than train.skip_nonfinite."""


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies, in at least fp32; targets equal to IGNORE_INDEX count 0."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.flatten(0, 1).to(dtype), labels.flatten(),
                           reduction="sum", ignore_index=IGNORE_INDEX)


@dataclass
class Schedule:
    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr_ratio)


class Trainer:
    def __init__(self, *, parallel, optimizer, schedule: Schedule, loader, checkpointer, metrics,
                 tracer, device: torch.device, steps: int, grad_clip: float,
                 autocast_dtype: torch.dtype | None, tokens_per_step: int, accounting, state,
                 skip_nonfinite: int = 3, monitor=None):
        """`parallel`: the parallelised model (parallel.parallelize.Parallelized): the step's
        forward/backward over microbatches, gradient completion, clipping and reductions.
        `accounting`: runtime.accounting.StepAccounting, the step's efficiency metrics.
        `state()`: this rank's training state as checkpoint blocks (parallel/state.py)."""
        self.parallel, self.optimizer, self.schedule, self.state = parallel, optimizer, schedule, state
        self.loader, self.checkpointer, self.metrics, self.tracer = loader, checkpointer, metrics, tracer
        self.device, self.steps, self.grad_clip = device, steps, grad_clip
        self.autocast_dtype, self.tokens_per_step, self.accounting = autocast_dtype, tokens_per_step, accounting
        self.skip_nonfinite, self.nonfinite_in_a_row = skip_nonfinite, 0
        self.monitor = monitor  # parallel.monitor.CollectiveMonitor, installed during fit()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, batches, step: int = 0) -> tuple[torch.Tensor, float]:
        """Run every microbatch of the step; returns (this rank's loss sum, global target count)."""
        batches = self.parallel.local_batches(batches)
        local_targets = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
        n_targets = float(self.parallel.reduce_tokens(
            torch.tensor(local_targets, dtype=torch.int64, device=self.device)).item())
        with self.tracer.pipeline_step(step):
            loss_sum = self.parallel.forward_backward(batches, n_targets, self._autocast)
        return loss_sum, n_targets

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` (0-based); returns its metrics."""
        if self.parallel.mutates_state_before(step):
            self.checkpointer.wait()
        self.accounting.begin_step()
        self.parallel.begin_step(step, self.optimizer)
        with self.accounting.waiting_for_data():
            batches = self.loader.step(step)
        loss_sum, n_targets = self.forward_backward(batches, step)
        loss = self.parallel.reduce_loss(loss_sum) / n_targets
        self.parallel.finish_grads()
        grad_norm = self.parallel.clip_grad_norm_(self.grad_clip)
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        metrics = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}
        # The loss and the norm are global (every rank holds the same values), so every rank
        # takes the same decision without a collective.
        if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
            self.nonfinite_in_a_row = 0
            self.checkpointer.wait()  # a pending checkpoint must have copied the state first
            self.optimizer.step()
        else:
            self.nonfinite_in_a_row += 1
            metrics["skipped"] = True
            if self.nonfinite_in_a_row > self.skip_nonfinite:
                raise NonFiniteError(
                    f"step {step + 1}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}; "
                    f"{self.nonfinite_in_a_row} non-finite steps in a row exceed train.skip_nonfinite="
                    f"{self.skip_nonfinite}. The parameters are those of the last finite step (every "
                    "checkpoint is finite); lower train.lr or raise optim.warmup_steps, then resume")
            self.metrics.note(f"step {step + 1}: non-finite loss {metrics['loss']} or gradient norm "
                              f"{metrics['grad_norm']}; the step is skipped ({self.nonfinite_in_a_row} in a row, "
                              f"at most {self.skip_nonfinite})")
        self.optimizer.zero_grad(set_to_none=True)
        moe = self.parallel.moe_step()
        if moe:  # the language-model loss above; the balancing terms beside it
            metrics.update(total_loss=metrics["loss"] + moe["aux_loss"] + moe["z_loss"], **moe)
        bubble = self.parallel.pipeline_bubble(self.tracer)
        if bubble is not None:
            metrics["pp_bubble"] = bubble
        return metrics

    def fit(self, start_step: int, stop_at_step: int = 0) -> None:
        """Train from `start_step` to the end of the schedule, or to `stop_at_step` (>0), or until
        SIGTERM or SIGINT (then with a final checkpoint); every requested checkpoint is
        committed when this returns."""
        stop = StopRequest().install()
        self.checkpointer.on_publish = self._committed
        if self.monitor is not None:
            self.monitor.install()
        try:
            try:
                self._fit(start_step, stop_at_step, stop)
            except NonFiniteError:
                # Every rank stops at the same step with a finite state: what is in flight commits.
                self.checkpointer.close()
                raise
            self.checkpointer.close()
        finally:
            if self.monitor is not None:
                self.monitor.uninstall()
            stop.uninstall()
            self.tracer.close()

    def _committed(self, step: int) -> None:
        """Rank 0, when the checkpoint of `step` is committed (maybe on a background thread)."""
        self.metrics.event({"event": "checkpoint", "phase": "committed", "step": step, "time": time.time()})

    def _fit(self, start_step: int, stop_at_step: int, stop: StopRequest) -> None:
        timer = StepTimer()
        end = stop_at_step or self.steps
        ckpt = self.checkpointer
        last_save = time.monotonic()
        for step in range(start_step, end):
            metrics = self.train_step(step)
            elapsed = timer.lap()
            metrics.update(time=time.time(), tokens=(step + 1) * self.tokens_per_step, step_time_s=elapsed,
                           **self.accounting.metrics(elapsed))
            slow = self.monitor.end_step(step + 1) if self.monitor is not None else []
            if slow:
                metrics["slow_ranks"] = slow
            self.metrics.log(metrics)
            self.tracer.flush()
            done = step + 1
            # Every rank takes the same decision: a signal, a clock or a failed background write
            # may be seen a step apart.
            timed = ckpt.saves and ckpt.every_s > 0 and time.monotonic() - last_save >= ckpt.every_s
            preempted, timed, failed = self.parallel.any_rank([stop.requested, timed, ckpt.failed], self.device)
            if failed:
                ckpt.close()  # raises this rank's CheckpointWriteError once every write in flight settled
                raise CheckpointWriteError(f"another rank could not commit a checkpoint in {ckpt.dir} (its message "
                                           "says why); `latest` still names the last committed one")
            if ckpt.saves and (timed or preempted or ckpt.due(done, self.steps, stopping=done == end < self.steps)):
                requested = time.time()
                ckpt.request(done, self.state(), {"tokens": done * self.tokens_per_step})
                self.metrics.event({"event": "checkpoint", "phase": "requested", "step": done, "time": requested,
                                    "blocking_s": time.time() - requested})
                last_save = time.monotonic()
                timer.lap()  # a blocking save is not training time; logging above is
            if preempted:
                final = ("the final checkpoint is being committed" if ckpt.saves else
                         "no checkpoint (checkpoint.enabled=false)")
                self.metrics.note(f"stopping after step {done} on {stop.name}; {final}")
                return
