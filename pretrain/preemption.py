"""Stop signals: SIGTERM / SIGUSR1 (slurm preemption, the time limit's warning, `scancel --signal`).

The handler only records the signal; the trainer acts on it at a step boundary: the current optimizer
step finishes, every rank saves a checkpoint of it, and the run exits with code 0, so a requeued job
resumes from it (checkpoint.resume=auto). Ranks may see the signal at different times (or only one of
them may): the trainer's per-step all-reduce carries "received" so all ranks stop after the same step.
"""
from __future__ import annotations

import signal
import threading


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, rank: int):
        self.rank = rank
        self.received: int | None = None  # the first stop signal this rank got
        self._previous: dict = {}

    def install(self) -> None:
        """Handle the stop signals from now on (Python allows it only on the main thread)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"[rank {self.rank}] received {signal.Signals(signum).name}: stopping after this step "
                  "with a checkpoint", flush=True)
