"""Run a step's microbatches without a pipeline: forward, loss and backward for each, with
gradients reduced over data parallelism only in the last microbatch's backward."""
from __future__ import annotations

import torch

from parallel.data_parallel import gradient_sync


class SequentialExecutor:
    def __init__(self, model, loss_fn, positions: torch.Tensor, device: torch.device, tracer):
        self.model, self.loss_fn, self.device, self.tracer = model, loss_fn, device, tracer
        self.positions = positions  # the tokens' positions in the sequence (rotary embeddings)

    def forward_backward(self, batches, normalizer: float, autocast) -> torch.Tensor:
        """Returns this rank's loss sum; each microbatch's backward divides by `normalizer`."""
        loss_sum = None
        for i, batch in enumerate(batches):
            tokens, labels = batch.tokens.to(self.device), batch.labels.to(self.device)
            with gradient_sync(self.model, enabled=i == len(batches) - 1):
                with self.tracer.span(f"F mb{i}", "forward", mb=i), autocast():
                    part = self.loss_fn(self.model(tokens, self.positions), labels)
                with self.tracer.span(f"B mb{i}", "backward", mb=i):
                    (part / normalizer).backward()
            loss_sum = part.detach() if loss_sum is None else loss_sum + part.detach()
        return loss_sum
