"""Checkpoint engines: save the training state in a layout-independent format and resume."""
from runtime.checkpoint.dcp_async import DcpAsyncCheckpointer
from runtime.checkpoint.format import CheckpointError, CheckpointMismatch, CheckpointWriteError
from runtime.checkpoint.resume import Resumed, resume
from runtime.checkpoint.lazy import LazyCheckpointer
from runtime.checkpoint.lazy_writer import MB
from runtime.checkpoint.sync import BaseCheckpointer, SyncCheckpointer

__all__ = ["BaseCheckpointer", "CheckpointError", "CheckpointMismatch", "CheckpointWriteError", "DcpAsyncCheckpointer",
           "LazyCheckpointer", "Resumed", "SyncCheckpointer", "build_checkpointer", "resume"]


def build_checkpointer(cfg, rank: int, timeout_s: float, on_gpu: bool = False,
                       model: dict | None = None) -> BaseCheckpointer:
    """The engine `checkpoint.engine` names (a collective: lazy makes a process group); with
    checkpoint.enabled=false one that only loads. `model`: the model config each checkpoint records."""
    common = dict(keep_last=cfg.keep_last, every_s=cfg.every_s, model=model)
    if not cfg.enabled:
        return BaseCheckpointer(cfg.dir, 0, rank, **common)
    if cfg.engine.value == "lazy":
        return LazyCheckpointer(cfg.dir, cfg.every, rank, pool_bytes=cfg.pool_mb * MB, chunk_bytes=cfg.chunk_mb * MB,
                                timeout_s=timeout_s, pin=on_gpu, **common)
    if cfg.engine.value == "dcp_async":
        return DcpAsyncCheckpointer(cfg.dir, cfg.every, rank, timeout_s=timeout_s, **common)
    return SyncCheckpointer(cfg.dir, cfg.every, rank, **common)
