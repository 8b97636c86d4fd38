"""The deterministic, resumable loader that shards each global batch over data-parallel ranks.

Sequence number i of the run is step·global_batch + its position in the step, and its tokens
are `sequences.rows([i])` (runtime/data/sequences.py: a pure function of seed and i). The batch
of a step is therefore a pure function of (seed, step): resuming needs only the step number,
and every layout sees the same sequences in the same global positions. Data-parallel rank d
takes the d-th contiguous slice of the global batch, cut into microbatches.

With an end-of-document id: `document_mask` gives each microbatch the document index of every
input token (a document ends with its end-of-document token; the next token starts the next
one), from which the model restarts positions and masks attention across documents (Megatron's
reset_position_ids + reset_attention_mask); `mask_eod_loss` drops the loss on end-of-document
targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.loss import IGNORE_INDEX


@dataclass
class Batch:
    """One microbatch: inputs and targets, [micro_batch, seq_len] int64 each, and, with document
    masking, the document index of each input token (same shape; None = one document per row)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    documents: torch.Tensor | None = None


def document_ids(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[b, s] document index of each token: the number of end-of-document tokens before it."""
    ends = (tokens == eod_id).to(torch.int64)
    return torch.cumsum(ends, dim=1) - ends


class BatchLoader:
    def __init__(self, sequences, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, eod_id: int | None = None, document_mask: bool = False,
                 mask_eod_loss: bool = False):
        per_rank, rem = divmod(global_batch_size, dp_size)
        if rem or per_rank % micro_batch_size:
            raise ValueError(f"global batch {global_batch_size} does not split into microbatches of "
                             f"{micro_batch_size} over {dp_size} data-parallel ranks")
        if (document_mask or mask_eod_loss) and eod_id is None:
            raise ValueError("document masking and mask_eod_loss need the tokenizer's end-of-document id")
        self.sequences = sequences
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.per_rank = dp_rank, per_rank
        self.eod_id, self.document_mask, self.mask_eod_loss = eod_id, document_mask, mask_eod_loss

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.micro_batch_size

    def sequence_ids(self, step: int) -> range:
        """Global sequence numbers this rank trains on at `step`."""
        first = step * self.global_batch_size + self.dp_rank * self.per_rank
        return range(first, first + self.per_rank)

    def step(self, step: int) -> list[Batch]:
        """The microbatches of this rank for optimizer step `step` (0-based)."""
        ids = self.sequence_ids(step)
        data = torch.from_numpy(self.sequences.rows(np.arange(ids.start, ids.stop)))  # [per_rank, seq_len + 1]
        tokens, labels = data[:, :-1], data[:, 1:].clone()
        if self.mask_eod_loss:
            labels[labels == self.eod_id] = IGNORE_INDEX
        documents = document_ids(tokens, self.eod_id) if self.document_mask else None
        mb = self.micro_batch_size
        return [Batch(tokens[k:k + mb], labels[k:k + mb], None if documents is None else documents[k:k + mb])
                for k in range(0, self.per_rank, mb)]
