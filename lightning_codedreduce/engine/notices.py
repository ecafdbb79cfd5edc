"""Notes to rank 0 and announcements from it that wait for nobody, ordered with the results.

``stragglers="auto"`` needs every rank's measurements at rank 0 and rank 0's decision at every rank,
at a step every rank agrees on. A collective would wait for the slowest rank each time; these do not:

1. ``post(obj)`` (any rank but 0) queues a ``NOTE`` frame to the control parent and returns; every rank
   on the way forwards it up the control tree, so it lands in rank 0's inbox (``take_notes``). A
   straggler's notes arrive late, never in the way.
2. ``announce(obj, lead)`` (rank 0) sends ``ANNOUNCE`` down the control tree, effective at step
   ``E = frontier + lead``, where ``frontier`` is the first step whose result rank 0 has not yet sent
   to anyone (the tree: the step it decodes next; the balanced layout: it owns chunk 0 of every step).
   Every rank forwards it to its control children the moment it arrives, so on every link it travels
   ahead of the result of step ``frontier``, and every rank records it (``announced``) before it can
   have the result of that step: before it begins step ``frontier + 1``, so before ``E``.
3. Gloo's ring all-reduce (the balanced layout at ``stragglers=0``) carries results outside the links,
   so nothing orders an announcement with them: there callers use a collective instead
   (``CodedReducer.announces_in_order`` is False), which costs nothing extra since every ring step
   waits for every rank anyway.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .collectives import ControlPort, pack, unpack
from .frames import FrameError, Header, Kind


@dataclass(frozen=True)
class Note:
    """A value for rank 0 (queued by the caller)."""

    value: Any


@dataclass(frozen=True)
class Announcement:
    """Rank 0's value for every rank, effective ``lead`` steps past the result frontier (queued by the caller)."""

    value: Any
    lead: int


class Notices:
    """Notes and announcements of one :class:`CodedReducer` (module docstring). ``post``, ``announce``,
    ``take_notes`` and ``announced`` are the caller's side; ``on_*`` run on the protocol thread."""

    def __init__(self, port: ControlPort, submit: Callable[[Any], None], frontier: Callable[[], int]):
        self._port = port
        self._submit = submit
        self._frontier = frontier
        self._inbox: list[tuple[int, Any]] = []  # rank 0: (rank, value) in arrival order (under board.cond)
        self._announced: list[tuple[int, Any]] = []  # (effective step, value) in announcement order (same)
        self._asked = 0  # caller, rank 0: announcements asked for
        self._done = 0  # protocol, rank 0: announcements sent (under board.cond)

    # ------------------------------------------------------------------ caller
    def post(self, value: Any) -> None:
        """Send ``value`` to rank 0 without waiting (rank 0's own value goes straight to its inbox)."""
        self._submit(Note(value))

    def take_notes(self) -> list[tuple[int, Any]]:
        """Rank 0: the ``(rank, value)`` notes that arrived since the last call, in arrival order."""
        with self._port.board.cond:
            notes, self._inbox = self._inbox, []
            return notes

    def announce(self, value: Any, lead: int) -> int:
        """Rank 0: announce ``value`` to every rank; returns the step it takes effect at (waits only for the
        protocol thread, not for any peer)."""
        if self._port.rank != 0:
            raise ValueError("only rank 0 announces")
        if lead < 1:
            raise ValueError(f"lead must be >= 1 step, got {lead!r}")
        board = self._port.board
        self._asked += 1
        target = self._asked
        self._submit(Announcement(value, lead))
        with board.cond:
            board.wait(lambda: self._done >= target, "the announcement was sent", self._port.starved_control)
            return self._announced[target - 1][0]  # rank 0 records only its own announcements

    def announced(self) -> list[tuple[int, Any]]:
        """Every ``(effective step, value)`` announced so far, in order (the same list on every rank)."""
        with self._port.board.cond:
            return list(self._announced)

    # ------------------------------------------------------------------ protocol thread
    def on_note(self, value: Any) -> None:
        self._forward_note({self._port.rank: value})

    def on_announcement(self, value: Any, lead: int) -> None:
        step = self._frontier() + lead
        self._record(step, pack(value), value)
        with self._port.board.cond:
            self._done += 1
            self._port.board.cond.notify_all()

    def on_frame(self, src: int, header: Header, payload: torch.Tensor) -> None:
        port = self._port
        if header.kind == Kind.NOTE:
            if src not in port.control_children():
                raise FrameError(f"NOTE frame from rank {src}, which is not a child of rank {port.rank}")
            self._forward_note(self._decode(src, payload))
            return
        parent = port.control_parent()
        if parent is None or src != parent.peer:
            raise FrameError(f"ANNOUNCE frame from rank {src}, which is not this rank's parent")
        self._record(header.step, payload, self._decode(src, payload, notes=False))

    def _forward_note(self, values: dict[int, Any]) -> None:
        port = self._port
        parent = port.control_parent()
        if parent is None:
            with port.board.cond:
                self._inbox.extend(values.items())
            return
        payload = pack(values)
        parent.send(Header(Kind.NOTE, 0, payload.numel(), torch.uint8, port.rank), payload)

    def _record(self, step: int, payload: torch.Tensor, value: Any) -> None:
        """Pass the announcement down first (ahead of any later result on every link), then keep it."""
        port = self._port
        port.send_down(Header(Kind.ANNOUNCE, step, payload.numel(), torch.uint8, port.rank), payload)
        with port.board.cond:
            self._announced.append((step, value))
            port.board.cond.notify_all()

    @staticmethod
    def _decode(src: int, payload: torch.Tensor, notes: bool = True) -> Any:
        if payload.dtype != torch.uint8:
            raise FrameError(f"notice frame from rank {src} carries {payload.dtype}, not bytes")
        try:
            obj = unpack(payload)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise FrameError(f"unreadable notice frame from rank {src}: {err!r}") from None
        if notes and not (isinstance(obj, dict) and all(isinstance(k, int) for k in obj)):
            raise FrameError(f"malformed NOTE frame from rank {src}")
        return obj
