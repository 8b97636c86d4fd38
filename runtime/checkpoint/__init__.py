"""Checkpoint engines: save the training state in a layout-independent format and resume."""
from runtime.checkpoint.format import CheckpointError
from runtime.checkpoint.sync import SyncCheckpointer

__all__ = ["CheckpointError", "SyncCheckpointer"]
