"""Checkpoint engines: save the training state in a layout-independent format and resume."""
from runtime.checkpoint.dcp_async import DcpAsyncCheckpointer
from runtime.checkpoint.format import CheckpointError
from runtime.checkpoint.lazy import LazyCheckpointer
from runtime.checkpoint.sync import BaseCheckpointer, SyncCheckpointer

__all__ = ["BaseCheckpointer", "CheckpointError", "DcpAsyncCheckpointer", "LazyCheckpointer", "SyncCheckpointer",
           "build_checkpointer"]


def build_checkpointer(cfg, rank: int, timeout_s: float) -> BaseCheckpointer:
    """The engine `checkpoint.engine` names (a collective: lazy makes a process group)."""
    common = dict(keep_last=cfg.keep_last, every_s=cfg.every_s)
    if cfg.engine.value == "lazy":
        return LazyCheckpointer(cfg.dir, cfg.every, rank, pool_mb=cfg.pool_mb, chunk_mb=cfg.chunk_mb,
                                timeout_s=timeout_s, **common)
    if cfg.engine.value == "dcp_async":
        return DcpAsyncCheckpointer(cfg.dir, cfg.every, rank, timeout_s=timeout_s, **common)
    return SyncCheckpointer(cfg.dir, cfg.every, rank, **common)
