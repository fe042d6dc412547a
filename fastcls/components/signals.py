"""SIGINT and SIGTERM during training: caught so that the loop can finish its step, write a resumable checkpoint
(fastcls.components.resume) and stop with 130 or 143, instead of dying mid-write."""
import signal
import threading


class StopOnSignal:
    """Inside the block, SIGINT and SIGTERM only record the first signal received (`received`), so that the loop
    finishes its step, writes a checkpoint and stops; a second signal while that is saved changes nothing. The
    previous handlers come back on leaving. Outside the main thread (where Python delivers no signals) it does
    nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
