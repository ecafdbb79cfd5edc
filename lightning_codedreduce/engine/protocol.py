"""What both layouts' protocols share: links, dead and closed peers, per-step statistics, failing.

A protocol object lives on the reducer's protocol thread, which alone calls its methods and changes its
state. ``tree.py`` (the paper's tree) and ``balanced.py`` (chunk owners) implement the layout-specific
part: ``on_local`` (``on_filled``: the balanced layout's gradient handed in while backward fills it), ``on_data_frame``, ``on_dead``, ``on_death_notice``, ``advance`` and ``starved``.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..plan import CodedReducePlan
from .board import CodedReduceError, ResultBoard
from .frames import Header, Kind
from .transport import Link


@dataclass
class StepStats:
    """What one rank saw of one step (times from ``time.monotonic()``)."""

    step: int
    local_ready: float | None = None  # local gradient handed in (None: skipped, result came first)
    sent: float | None = None  # this rank's message left (root: result known; balanced: its chunks reduced)
    result: float | None = None  # result known here
    used: tuple[int, ...] = ()  # peers whose messages were decoded (tree: children; balanced: into owned chunks)
    arrivals: dict[int, float] = field(default_factory=dict)  # every peer's (first) message, late ones too

    @property
    def waited(self) -> float:
        """Seconds this rank's message waited for peers after its own gradient was ready."""
        if self.local_ready is None or self.sent is None:
            return 0.0
        return max(0.0, self.sent - self.local_ready)


class Protocol:
    """Shared protocol state of one rank (see the module docstring for who calls what)."""

    def __init__(self, plan: CodedReducePlan, rank: int, board: ResultBoard, links: dict[int, Link]):
        self.plan = plan
        self.rank = rank
        self.board = board
        self.links = links  # peer -> link, in the plan's link order
        self.dead: dict[int, str] = {}  # rank -> why, for peers that died but were tolerated
        self.finished: set[int] = set()  # peers that closed in order (BYE)
        self.dead_since: dict[int, int] = {}  # rank -> first step whose result carries the news (under board.cond)
        self.stats: dict[int, StepStats] = {}
        self.finished_stats: collections.deque[StepStats] = collections.deque(maxlen=10_000)
        self.drained = 0  # late messages discarded
        self.max_buffered = 0  # most peer messages held at once (bounded-memory check)

    # ------------------------------------------------------------------ the control collectives' tree
    def control_parent(self) -> Optional[Link]:
        parent = self.plan.parent(self.rank)
        return None if parent is None else self.links[parent]

    def control_children(self) -> dict[int, Link]:
        return {c: self.links[c] for c in self.plan.children(self.rank)}

    def gone(self, peer: int) -> bool:
        """Dead, or closed in order: nothing more will come from ``peer``."""
        return peer in self.dead or peer in self.finished

    def known_dead(self) -> frozenset[int]:
        return frozenset(self.dead)

    def starved_control(self) -> Optional[str]:
        """Why a caller waiting for a control collective will never get it (the parent closed), or None."""
        parent = self.plan.parent(self.rank)
        if parent in self.finished:
            return f"parent rank {parent} finished (rank {self.rank} asked for more than its peers?)"
        return None

    def starved_result(self) -> Optional[str]:
        """Why a caller waiting for a step's result will never get it, or None (tree: the parent closed)."""
        return self.starved_control()

    # ------------------------------------------------------------------ common duties
    def on_bye(self, src: int) -> None:
        self.finished.add(src)
        self.board.notify()  # a caller waiting for a result that will never come must learn it

    def send_down(self, header: Header, payload: torch.Tensor | None) -> None:
        """Send to every live child of the control tree."""
        for peer, link in self.control_children().items():
            if peer not in self.dead:
                link.send(header, payload)

    def fail(self, message: str, culprit: int, forward_from: int | None = None) -> None:
        """Stop: tell every live peer (ABORT naming ``culprit``) and wake the caller with the error."""
        if self.board.error is not None:
            return
        for peer, link in self.links.items():
            if peer != forward_from and peer not in self.dead:
                link.send(Header(Kind.ABORT, 0, 0, None, self.rank, extra=culprit), block=False)
        self.board.fail(CodedReduceError(message))

    def stat(self, step: int) -> StepStats:
        if step not in self.stats:
            self.stats[step] = StepStats(step)
        return self.stats[step]

    def retire_stats(self, before: int) -> None:
        """Move the statistics of finished steps older than ``before`` to ``finished_stats``."""
        for step in sorted(s for s in self.stats if s < before):
            if self.stats[step].result is not None:
                self.finished_stats.append(self.stats.pop(step))

    def note_arrival(self, step: int, src: int) -> None:
        stat = self.stats.get(step)
        if stat is not None:
            stat.arrivals.setdefault(src, time.monotonic())

    # ------------------------------------------------------------------ per layout
    def on_local(self, step: int, flat: torch.Tensor, when: float, in_place: bool = False,
                 partial: bool = False) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_filled(self, step: int, lo: int, hi: Optional[int]) -> None:  # pragma: no cover - balanced only
        raise NotImplementedError(f"{type(self).__name__} takes the local gradient whole")

    def on_data_frame(self, src: int, header: Header, payload: torch.Tensor | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def on_dead(self, peer: int, why: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_death_notice(self, src: int, peer: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def advance(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def result_frontier(self) -> int:  # pragma: no cover - abstract
        """Rank 0: the first step whose result (or part of it) it has not sent to any peer yet."""
        raise NotImplementedError
