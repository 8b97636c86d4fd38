"""Stop cleanly when asked: SIGTERM (Slurm preemption, `scontrol requeue`, torchrun shutting its
workers down) or SIGINT (Ctrl-C) sets a flag; the training loop, after the step in progress,
agrees with the other ranks (a rank may receive the signal a step later than another), saves a
final checkpoint (unless checkpoint.enabled=false) and returns. The handler only sets a flag;
the same signal a second time takes its default action and ends the process at once — the way
out of a step that cannot finish. (Ctrl-C under torchrun delivers SIGINT from the terminal and
then SIGTERM from torchrun: two different signals, so the run still stops cleanly.)"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a peer's signal"
