"""Which Transformer layers each pipeline stage holds.

There are pp·vpp stages; chunk c of pipeline rank r is stage c·pp + r. The embedding goes to
stage 0 and the final norm and head to the last stage. Layers are split evenly, or by an
explicit per-stage list (`parallel.pp_layers=[…]`), or evenly counting the embedding and the
head as one layer each (Megatron-LM's account-for-embedding/loss option), which gives the first
and last stages one layer fewer.
"""
from __future__ import annotations


class PartitionError(ValueError):
    pass


def stage_layers(n_layers: int, pp: int, vpp: int, pp_layers=None,
                 count_embedding_head: bool = False) -> list[range]:
    """The global layer indices of every stage, in stage order."""
    n_stages = pp * vpp
    if pp_layers is not None:
        counts = [int(c) for c in pp_layers]
        if len(counts) != n_stages:
            raise PartitionError(f"parallel.pp_layers has {len(counts)} entries but there are pp·vpp = "
                                 f"{pp}·{vpp} = {n_stages} stages; give one layer count per stage")
        if any(c < 0 for c in counts) or sum(counts) != n_layers:
            raise PartitionError(f"parallel.pp_layers={counts} must be counts ≥ 0 summing to model.n_layers="
                                 f"{n_layers} (they sum to {sum(counts)})")
    elif count_embedding_head:
        units = n_layers + 2
        if units % n_stages:
            raise PartitionError(f"model.n_layers + 2 = {units} (the embedding and head counted as layers) is "
                                 f"not divisible by pp·vpp = {n_stages}; use parallel.pp_layers for an uneven split")
        per = units // n_stages
        counts = [per] * n_stages
        counts[0] -= 1
        counts[-1] -= 1
        if min(counts) < 0:
            raise PartitionError(f"{n_stages} stages for {n_layers} layers leave a stage with nothing")
    else:
        if n_layers % n_stages:
            raise PartitionError(f"model.n_layers={n_layers} is not divisible by pp·vpp = {pp}·{vpp} = {n_stages}; "
                                 f"set parallel.pp_layers=[…] ({n_stages} counts summing to {n_layers}) for an "
                                 f"uneven split")
        counts = [n_layers // n_stages] * n_stages
    empty = [s for s, c in enumerate(counts) if c == 0 and 0 < s < n_stages - 1]
    if empty:
        raise PartitionError(f"pipeline stages {empty} would hold no layer (parallel.pp_layers={counts})")
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def rank_stages(pp: int, vpp: int, rank: int) -> list[int]:
    """The stages of pipeline rank `rank`, one per chunk: chunk c is stage c·pp + rank."""
    return [c * pp + rank for c in range(vpp)]
