"""gloo's ring all-reduce of one step, started bucket by bucket while backward runs (DDP's overlap).

The balanced layout with ``stragglers=0`` skips no straggler, so the engine sums with gloo's ring
all-reduce (``CodedReducer``'s ring). Handed in with ``CodedReducer.begin(step, flat, segments=...)``:

1. ``segments`` are the ranges the caller will announce with ``filled``, in the order every rank
   launches them. They must be the same on every rank (e.g. DDP-style buckets of the same model), as
   collectives must match; when the ranges are *filled* may differ from rank to rank.
2. Each ``filled`` range counts towards the segments it covers. A segment is all-reduced (asynchronously,
   on gloo's threads) once it is complete and every segment before it has been launched. A segment
   completed out of turn waits, as DDP's buckets do, so the collectives match on every rank whatever the
   order of the gradients.
3. ``finish`` launches what is left in order (the remaining segments, then whatever no segment covers,
   lowest offset first) and waits for all of it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class RingStream:
    """One step's buffer, all-reduced in ``segments`` as they are filled (module docstring)."""

    def __init__(self, flat: torch.Tensor, group, segments: Sequence[tuple[int, int]]) -> None:
        self.flat, self.group = flat, group
        self.segments = checked_segments(segments, flat.numel())
        self._missing = [hi - lo for lo, hi in self.segments]  # per segment: elements not announced yet
        self._next = 0  # the next segment to launch (all before it are launched)
        self._works: list = []  # launched all-reduces, waited for at finish

    def filled(self, lo: int, hi: int) -> None:
        """``flat[lo:hi]`` is written: launch every segment now due."""
        for i, (a, b) in enumerate(self.segments):
            self._missing[i] -= max(0, min(b, hi) - max(a, lo))
        while self._next < len(self.segments) and self._missing[self._next] <= 0:
            self._launch(*self.segments[self._next])
            self._next += 1

    def finish(self) -> torch.Tensor:
        """Launch what is left (the same ranges, in the same order, on every rank) and wait for the sum."""
        for lo, hi in self.segments[self._next:]:
            self._launch(lo, hi)
        self._next = len(self.segments)
        start = 0
        for lo, hi in sorted(self.segments) + [(self.flat.numel(), self.flat.numel())]:
            if lo > start:  # not in any segment
                self._launch(start, lo)
            start = hi
        works, self._works = self._works, []
        for work in works:
            work.wait()
        return self.flat

    def _launch(self, lo: int, hi: int) -> None:
        self._works.append(dist.all_reduce(self.flat[lo:hi], group=self.group, async_op=True))


def checked_segments(segments: Sequence[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    """``segments`` as a list of integer ``(start, stop)`` pairs, or a clear error: they must be disjoint,
    non-empty and within the ``total``-element buffer."""
    try:
        out = [(int(lo), int(hi)) for lo, hi in segments]
    except (TypeError, ValueError):
        raise ValueError(f"segments must be (start, stop) pairs of element offsets, got {segments!r}") from None
    spans = sorted(out)
    if any(not 0 <= lo < hi <= total for lo, hi in spans) or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"segments must be disjoint, non-empty (start, stop) ranges within the {total}-element "
                         f"buffer, got {out!r}")
    return out
