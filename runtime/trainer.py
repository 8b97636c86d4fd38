"""The training loop. One optimizer step, top to bottom (`train_step`):

    this rank's microbatches → forward → loss → backward, each microbatch in turn (or, when
    pipelining, the schedule's executor running the same over stages) → gradient completion →
    clipping → checkpoint wait → optimizer step → the strategies' end-of-step hooks → metrics

then `fit` evaluates the validation loss when due, logs, agrees with the other ranks on stopping,
and requests checkpoints.

The loss of a step is the sum of token losses over every target token of the global batch,
divided by the global number of target tokens. Each microbatch's backward uses that global
normaliser, so gradient accumulation and data parallelism (which *sums* gradients) give the
gradient of exactly the loss one process computes on the whole batch.

The parallel side arrives as one record (parallel/parallelize.py's ParallelModel): the model
chunks, the loss function of the chunk with the head, the token positions, the pipeline
executor when there is one, and the generic services of a step (this rank's tokens of a batch,
gradient sync, reductions, gradient completion, clipping, end-of-step hooks).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from runtime.checkpoint.format import CheckpointWriteError
from runtime.data.loader import Batch
from runtime.loss import IGNORE_INDEX
from runtime.metrics import StepTimer
from runtime.optim import lr_at, set_lr
from runtime.preemption import StopRequest
from runtime.trace import Tracer


class NonFiniteError(RuntimeError):
    """More consecutive steps with a NaN/Inf loss or gradient norm than train.skip_nonfinite."""


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
                 autocast_dtype: torch.dtype | None, tokens_per_step: int, accounting, state, any_rank,
                 skip_nonfinite: int = 3, monitor=None, valid_loader=None, eval_every: int = 0,
                 eval_batches: int = 1):
        """`parallel`: this rank's parallelised model (parallel.parallelize.ParallelModel).
        `accounting`: runtime.accounting.StepAccounting, the step's efficiency metrics.
        `state()`: this rank's training state as checkpoint blocks (parallel/state.py).
        `any_rank(flags)`: each flag OR-ed over every rank (parallel.collectives.any_rank)."""
        self.parallel, self.optimizer, self.schedule, self.state = parallel, optimizer, schedule, state
        self.any_rank = any_rank
        self.loader, self.checkpointer, self.metrics, self.tracer = loader, checkpointer, metrics, tracer
        self.device, self.steps, self.grad_clip = device, steps, grad_clip
        self.autocast_dtype, self.tokens_per_step, self.accounting = autocast_dtype, tokens_per_step, accounting
        self.skip_nonfinite, self.nonfinite_in_a_row = skip_nonfinite, 0
        self.monitor = monitor  # parallel.monitor.CollectiveMonitor, installed during fit()
        # Validation: every `eval_every` steps and after the last, `eval_batches` global batches.
        self.valid_loader, self.eval_every, self.eval_batches = valid_loader, eval_every, eval_batches

    def _autocast(self):
        return autocast(self.device.type, self.autocast_dtype)()

    def _on_device(self, batch):
        documents = None if batch.documents is None else batch.documents.to(self.device)
        return batch.tokens.to(self.device), batch.labels.to(self.device), documents

    def forward_backward(self, batches, n_targets: float) -> torch.Tensor:
        """This rank's microbatches through the model and back; returns this rank's loss sum."""
        return forward_backward(self.parallel, [Batch(*self._on_device(b)) for b in batches], n_targets,
                                self._autocast, self.tracer)

    def _global_targets(self, batches) -> float:
        """The number of target tokens of these microbatches over every rank: the loss's normaliser."""
        local = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
        return float(self.parallel.reduce_tokens(torch.tensor(local, dtype=torch.int64, device=self.device)).item())

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` (0-based); returns its metrics."""
        par = self.parallel
        self.accounting.begin_step()
        with self.accounting.waiting_for_data():
            batches = par.local_batches(self.loader.step(step))
        n_targets = self._global_targets(batches)
        with self.tracer.pipeline_step(step):
            loss_sum = self.forward_backward(batches, n_targets)
        loss = par.reduce_loss(loss_sum) / n_targets
        par.finish_grads()
        grad_norm = par.clip_grad_norm_(self.grad_clip)
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        metrics = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}
        # From here the state changes (the optimizer step, the hooks): a pending checkpoint must
        # have copied it first.
        self.checkpointer.wait()
        # The loss and the norm are global (every rank holds the same values), so every rank
        # takes the same decision without a collective.
        if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
            self.nonfinite_in_a_row = 0
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
        # What the strategies do after each step (MoE balancing and statistics, FSSDP
        # re-planning, the pipeline's measured bubble), with the metrics they report.
        for hook in par.step_hooks:
            metrics.update(hook(step + 1, self.optimizer, metrics))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The validation loss: `eval_batches` global batches of the validation data (the same
        sequences at every evaluation and in every layout), forward only, the sum of their token
        losses over their global number of targets, as the training loss is normalised."""
        par, loss_sum, n_targets = self.parallel, torch.zeros((), dtype=torch.float64, device=self.device), 0.0
        for chunk in par.chunks:
            chunk.eval()
        try:
            for k in range(self.eval_batches):
                batches = par.local_batches(self.valid_loader.step(k))
                n_targets += self._global_targets(batches)
                if par.pipeline is not None:
                    loss_sum += par.pipeline.forward_only(batches, self._autocast).double()
                    continue
                for batch in batches:
                    tokens, labels, documents = self._on_device(batch)
                    with self._autocast():
                        loss_sum += par.loss_fn(par.model(tokens, par.positions, documents), labels).double()
        finally:
            for chunk in par.chunks:
                chunk.train()
        loss = (par.reduce_loss(loss_sum) / n_targets).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

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
            if self.eval_every and ((step + 1) % self.eval_every == 0 or step + 1 == self.steps):
                metrics.update(self.evaluate())
                timer.lap()  # evaluation is not training time
            slow = self.monitor.end_step(step + 1) if self.monitor is not None else []
            if slow:
                metrics["slow_ranks"] = slow
            self.metrics.log(metrics)
            self.tracer.flush()
            done = step + 1
            # Every rank takes the same decision: a signal, a clock or a failed background write
            # may be seen a step apart.
            timed = ckpt.saves and ckpt.every_s > 0 and time.monotonic() - last_save >= ckpt.every_s
            preempted, timed, failed = self.any_rank([stop.requested, timed, ckpt.failed])
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


def autocast(device_type: str, dtype: torch.dtype | None):
    """The step's autocast as a context factory: `dtype` (bf16 runs), else none."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


def forward_backward(par, batches, n_targets: float, autocast=contextlib.nullcontext,
                     tracer: Tracer | None = None) -> torch.Tensor:
    """This rank's microbatches (on its device) through the model and back; returns this rank's
    loss sum. With a pipeline its schedule interleaves this rank's stages and microbatches, each
    running the same forward, loss and backward as below across the stages; without one, each
    microbatch in turn, data-parallel gradients reduced in the last one's backward only. Also
    the step a rehearsal runs (launch/rehearse.py)."""
    if par.pipeline is not None:
        return par.pipeline.forward_backward(batches, n_targets, autocast)
    loss_sum = torch.zeros((), device=par.positions.device)
    span = tracer.span if tracer is not None else (lambda *a, **k: contextlib.nullcontext())
    for i, b in enumerate(batches):
        with par.gradient_sync(i == len(batches) - 1):
            with span(f"F mb{i}", "forward", mb=i), autocast():
                # The sum of token losses (the labels also feed multi-token prediction's tokens ahead).
                loss = par.loss_fn(par.model(b.tokens, par.positions, b.documents, labels=b.labels), b.labels)
            with span(f"B mb{i}", "backward", mb=i):
                (loss / n_targets).backward()
        loss_sum = loss_sum + loss.detach()
    return loss_sum
