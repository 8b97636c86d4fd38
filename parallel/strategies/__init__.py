"""The research strategies, built on the five dimensions (`parallel/`'s core) and entered the
same way: FSSDP (fully sharded sparse data parallelism for MoE, after Hecate) in `fssdp/`, the
ladder residual's overlapped tensor-parallel reductions in `ladder.py`, and Holmes placement
and partition for clusters with mixed network cards in `holmes/`."""
