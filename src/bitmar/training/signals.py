"""SIGTERM/SIGINT during a run: while training, a signal only sets a flag that the trainer honours at the next step
boundary (after saving checkpoints/last.pt); after the final checkpoint, a signal stops the remaining work at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(BaseException):
    """SIGTERM/SIGINT arrived; the trainer saved last.pt and stopped at a step boundary, or (`training_done`) stopped
    the post-training evaluation/export after the final checkpoint was written.

    A BaseException (like KeyboardInterrupt): raised from the signal handler during evaluation, it must not be
    swallowed by an `except Exception` in the code it interrupts.
    """

    def __init__(self, signum: int, training_done: bool = False) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.training_done = training_done


@contextlib.contextmanager
def _handling(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install `handler` for SIGTERM/SIGINT for the block; the previous handlers come back afterwards."""
    previous = {}
    for signum in SIGNALS:
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread (e.g. some notebook runners): keep default behaviour
            pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class StopSignals:
    """The signal a run received (`received`, None until one arrives) and the two ways of handling it."""

    def __init__(self) -> None:
        self.received: int | None = None

    def _record(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def deferred(self) -> contextlib.AbstractContextManager[None]:
        """While training: a signal is only recorded; `raise_if_received` stops at the next step boundary."""
        return _handling(self._record)

    @contextlib.contextmanager
    def stop_at_once(self) -> Iterator[None]:
        """After the final checkpoint (post-training evaluation/export): a signal stops the work at once, since
        nothing is left to save."""
        self.raise_if_received(training_done=True)

        def handler(signum: int, frame: Any) -> None:
            self._record(signum, frame)
            raise TrainingInterrupted(signum, training_done=True)

        with _handling(handler):
            yield

    def raise_if_received(self, training_done: bool = False) -> None:
        if self.received is not None:
            raise TrainingInterrupted(self.received, training_done=training_done)
