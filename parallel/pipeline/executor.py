"""Run one step's microbatches through this rank's pipeline chunks in the schedule's order.

For each action of `schedules.build(...)` on this rank:
    F(c, mb): input = the microbatch's tokens (stage 0) or a receive from stage s−1; run chunk c;
              send the output to stage s+1, or, on the last stage, compute the loss.
    B(c, mb): output gradient = a receive from stage s+1, or the loss (last stage); backward
              through chunk c; send the input gradient to stage s−1.
    W(c, mb): the weight gradients deferred by B (zero-bubble schedules).
Sends are non-blocking (`isend`, completed at the end of the step); receives block. Activations
travel on the `pp` communicator and gradients on `pp_grad`, each FIFO per pair of ranks, which
is the model `schedules.simulate` verifies deadlock-free. With FSDP, each chunk reduces its
gradients only in its last backward of the step and stays gathered until then.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from parallel.pipeline import schedules


class PipelineExecutor:
    def __init__(self, chunks, stages: list[int], n_stages: int, kind: str, vpp: int, group_size: int,
                 groups, loss_fn, act_shape: tuple[int, ...], act_dtype: torch.dtype, positions: torch.Tensor,
                 device: torch.device, tracer):
        self.chunks, self.stages, self.n_stages = chunks, stages, n_stages
        self.kind, self.vpp, self.group_size = kind, vpp, group_size
        self.pp, self.pp_grad = groups["pp"], groups["pp_grad"]
        self.pp_ranks = groups.ranks["pp"]
        self.p, self.rank = len(self.pp_ranks), groups.index("pp")
        self.loss_fn, self.act_shape, self.act_dtype = loss_fn, act_shape, act_dtype
        self.on_action = None  # called with each action as it starts (None after the last): a rehearsal's tally
        self.positions = positions  # the tokens' positions in the sequence (rotary embeddings)
        self.device, self.tracer = device, tracer
        self._sends: list = []

    def _peer(self, stage: int) -> int:
        return self.pp_ranks[stage % self.p]

    def _recv(self, stage: int, group, what: str, a) -> torch.Tensor:
        t = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
        with self.tracer.span(f"recv {what} {a}", "comm", chunk=a.chunk, mb=a.mb):
            dist.recv(t, src=self._peer(stage), group=group)
        return t

    def _send(self, t: torch.Tensor, stage: int, group) -> None:
        if tuple(t.shape) != self.act_shape or t.dtype != self.act_dtype:
            raise RuntimeError(f"a pipeline stage produced {tuple(t.shape)} {t.dtype}; the stage boundary "
                               f"carries {self.act_shape} {self.act_dtype}")
        t = t.contiguous()
        # A send's buffer lives until the send completes, not to the step's end: a step of many
        # microbatches would otherwise hold a boundary tensor for each.
        self._sends = [(work, buf) for work, buf in self._sends if not work.is_completed()]
        self._sends.append((dist.isend(t, dst=self._peer(stage), group=group), t))

    def _documents(self, batch):
        return None if batch.documents is None else batch.documents.to(self.device)

    def _wait_sends(self) -> None:
        with self.tracer.span("wait sends", "comm"):
            for work, _ in self._sends:
                work.wait()
        self._sends.clear()

    @torch.no_grad()
    def forward_only(self, batches, autocast) -> torch.Tensor:
        """Every microbatch forward through the stages, no backward (validation); returns this
        rank's loss sum (zero unless it holds the last stage). Each rank runs its chunks in
        (microbatch, stage) order; every forward depends only on the previous stage's forward of
        the same microbatch, earlier in that order on its rank, so this cannot deadlock."""
        loss_sum = torch.zeros((), dtype=torch.promote_types(self.act_dtype, torch.float32), device=self.device)
        order = sorted(range(len(self.chunks)), key=lambda c: self.stages[c])
        for mb, batch in enumerate(batches):
            for c in order:
                stage, a = self.stages[c], schedules.Action("F", c, mb)
                x = batch.tokens.to(self.device) if stage == 0 else self._recv(stage - 1, self.pp, "activation", a)
                with autocast():
                    out = self.chunks[c](x, self.positions, self._documents(batch))
                if stage == self.n_stages - 1:
                    loss_sum += self.loss_fn(out, batch.labels.to(self.device))
                else:
                    self._send(out, stage + 1, self.pp)
        self._wait_sends()
        return loss_sum

    def forward_backward(self, batches, normalizer: float, autocast) -> torch.Tensor:
        """Run the step; returns this rank's loss sum (zero unless it holds the last stage)."""
        m = len(batches)
        actions = schedules.build(self.kind, self.p, self.vpp, m, self.rank, self.group_size)
        last_backward = {a.chunk: i for i, a in enumerate(actions) if a.kind == "B"}
        saved: dict[tuple[int, int], tuple] = {}
        loss_sum = torch.zeros((), dtype=torch.promote_types(self.act_dtype, torch.float32), device=self.device)
        for i, a in enumerate(actions):
            if self.on_action is not None:
                self.on_action(a)
            chunk, stage = self.chunks[a.chunk], self.stages[a.chunk]
            if a.kind == "F":
                if stage == 0:
                    x = batches[a.mb].tokens.to(self.device)
                else:
                    x = self._recv(stage - 1, self.pp, "activation", a).requires_grad_()
                with self.tracer.span(f"F{a.chunk} mb{a.mb}", "forward", chunk=a.chunk, mb=a.mb), autocast():
                    labels = batches[a.mb].labels.to(self.device)  # the last stage's loss and MTP's tokens ahead
                    out = chunk(x, self.positions, self._documents(batches[a.mb]), labels=labels)
                    if stage == self.n_stages - 1:
                        loss = self.loss_fn(out, labels)
                        loss_sum += loss.detach()
                        out = loss / normalizer
                if stage < self.n_stages - 1:
                    self._send(out.detach(), stage + 1, self.pp)
                saved[(a.chunk, a.mb)] = (x, out)
            elif a.kind == "B":
                x, out = saved.pop((a.chunk, a.mb))
                grad = None if stage == self.n_stages - 1 else self._recv(stage + 1, self.pp_grad, "gradient", a)
                if isinstance(chunk, FSDPModule):
                    # Reduce and reshard only in this chunk's last backward of the step.
                    final = i == last_backward[a.chunk]
                    chunk.set_requires_gradient_sync(final)
                    chunk.set_reshard_after_backward(final)
                store = getattr(chunk, "weight_grads", None)  # zero-bubble's deferred weight gradients
                if store is not None:
                    store.begin((a.chunk, a.mb))
                with self.tracer.span(f"B{a.chunk} mb{a.mb}", "backward", chunk=a.chunk, mb=a.mb):
                    torch.autograd.backward(out, grad)
                if stage > 0:
                    self._send(x.grad, stage - 1, self.pp_grad)
            else:
                with self.tracer.span(f"W{a.chunk} mb{a.mb}", "weight", chunk=a.chunk, mb=a.mb):
                    chunk.weight_grads.run((a.chunk, a.mb))
        if self.on_action is not None:
            self.on_action(None)
        self._wait_sends()
        return loss_sum


def bubble_hook(tracer, groups, done: int, optimizer, metrics: dict) -> dict:
    """A step hook (with `trace=true`): the step's measured bubble, averaged over pipeline ranks."""
    if tracer.bubble is None:
        return {}
    t = torch.tensor([tracer.bubble], dtype=torch.float64)
    dist.all_reduce(t, group=groups["pp"])
    return {"pp_bubble": t.item() / groups.size("pp")}
