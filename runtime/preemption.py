"""Stop cleanly when asked: SIGTERM (Slurm preemption, `scontrol requeue`, torchrun shutting its
workers down) sets a flag; the training loop, after the step in progress, agrees with the other
ranks (a rank may receive the signal a step later than another), saves a final checkpoint and
returns. The handler only sets a flag (and gives the signal back to its previous handler, so a
second SIGTERM still ends a process that cannot finish its step)."""
from __future__ import annotations

import signal
import threading


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._previous = None

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.uninstall()  # a second SIGTERM acts as before: the way out of a stuck step

    @property
    def requested(self) -> bool:
        return self.signum is not None
