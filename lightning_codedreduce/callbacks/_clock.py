"""When did this rank's backward pass last produce a parameter gradient?

Timing forward+backward from ``on_train_batch_start`` to ``on_after_backward`` also counts, under DDP,
the wait for the gradient all-reduce that DDP finishes inside the backward pass. A post-accumulate hook
on every parameter marks when the backward's own compute produced its last gradient, so both callbacks
measure compute the same way under every strategy (and can tell that a backward computed nothing).
"""
from __future__ import annotations

import time

import torch


class GradClock:
    def __init__(self) -> None:
        self.last: float | None = None  # time.monotonic() of the latest gradient accumulation
        self._handles: list = []

    def attach(self, module: torch.nn.Module) -> None:
        self.detach()
        self.last = None
        for p in module.parameters():
            if p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook"):
                self._handles.append(p.register_post_accumulate_grad_hook(self._tick))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _tick(self, _param) -> None:
        self.last = time.monotonic()

    def since(self, t0: float | None, now: float) -> float | None:
        """Compute seconds from ``t0`` to the last gradient after it: ``None`` if none came since ``t0``;
        ``now - t0`` when no hooks could be attached."""
        if t0 is None:
            return None
        if not self._handles:
            return now - t0
        if self.last is None or self.last < t0:
            return None
        return self.last - t0

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
