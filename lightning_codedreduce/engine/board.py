"""``ResultBoard``: where the protocol thread leaves reduced steps for the caller, and the reducer's error.

The only state the caller's thread and the protocol thread share, all under one condition: results
by step, their bytes (back-pressure), the next step the caller applies, the first error, closing.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import torch


class CodedReduceError(RuntimeError):
    """The reduce cannot go on: a rank the plan cannot do without died, or the protocol was violated."""


class ResultBoard:
    """Reduced steps waiting for the caller (``max_backlog_bytes`` of them before back-pressure)."""

    def __init__(self, start_step: int, max_backlog_bytes: int):
        self.cond = threading.Condition()
        self._results: dict[int, torch.Tensor] = {}
        self._bytes = 0
        self._max_bytes = max_backlog_bytes
        self.next_step = start_step  # the next step the caller applies (written by the caller only)
        self.error: Optional[CodedReduceError] = None
        self.closing = False

    # ------------------------------------------------------------------ protocol thread
    def publish(self, step: int, result: torch.Tensor) -> None:
        with self.cond:
            self._results[step] = result
            self._bytes += result.numel() * result.element_size()
            self.cond.notify_all()

    def fail(self, error: CodedReduceError) -> bool:
        """Record the first error (``False`` if there already was one) and wake every waiter."""
        with self.cond:
            if self.error is not None:
                return False
            self.error = error
            self.cond.notify_all()
            return True

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_for_room(self) -> None:
        """Back-pressure for a link's receiver: hold it while the caller has too many results to apply."""
        with self.cond:
            while self._bytes >= self._max_bytes and not self.closing and self.error is None:
                self.cond.wait(0.5)

    # ------------------------------------------------------------------ caller
    def ready(self, step: int) -> bool:
        with self.cond:
            return step in self._results

    @property
    def backlog_steps(self) -> int:
        with self.cond:
            return len(self._results)

    def take(self, step: int, starved: Callable[[], Optional[str]], timeout: float | None = None) -> torch.Tensor:
        """Block until ``step`` is reduced and return it (consumed; the caller's next step advances)."""
        if step != self.next_step:
            raise ValueError(f"result(step={step}) out of order: the next step to apply is {self.next_step}")
        with self.cond:
            self.wait(lambda: step in self._results, f"step {step} was reduced", starved, timeout)
            out = self._results.pop(step)
            self._bytes -= out.numel() * out.element_size()
            self.next_step = step + 1
            self.cond.notify_all()
        return out

    def wait(self, done: Callable[[], bool], what: str, starved: Callable[[], Optional[str]],
             timeout: float | None = None) -> None:
        """Hold ``cond`` and wait until ``done()``. Raise if the reduce failed, if ``starved()`` says why it
        will never be done (e.g. the parent closed), or after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if self.error is not None:
                raise self.error
            why = starved()
            if why is not None:
                raise CodedReduceError(f"{why} before {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"not done within {timeout} s: {what}")
            self.cond.wait(0.5)

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
