"""Checkpoint engines: save the training state in a layout-independent format and resume."""
from runtime.checkpoint.sync import CheckpointError, SyncCheckpointer

__all__ = ["CheckpointError", "SyncCheckpointer"]
