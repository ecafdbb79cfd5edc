"""What the protocol thread reacts to: one typed event per cause, queued by callers and link threads.

The protocol thread is the only one that changes protocol state; everything else talks to it through
these events (``CodedReducer._run`` dispatches on their type).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from .frames import Header


@dataclass(frozen=True)
class LocalReady:
    """The caller handed in this rank's (flat, private) weighted gradient for ``step``."""

    step: int
    flat: torch.Tensor
    when: float
    in_place: bool = False  # ``flat`` is the caller's tensor: the balanced layout assembles the result in it
    partial: bool = False  # the caller is still writing ``flat`` (balanced layout): ``LocalFilled`` says where


@dataclass(frozen=True)
class LocalFilled:
    """The caller wrote ``flat[lo:hi]`` of a gradient handed in with ``partial``; ``hi=None``: all of it."""

    step: int
    lo: int = 0
    hi: Optional[int] = None


@dataclass(frozen=True)
class FrameArrived:
    """A link received a checked frame from ``src``."""

    src: int
    header: Header
    payload: torch.Tensor | None
    done: Optional[Callable[[], None]] = None  # the link's flow control: call once the frame is handled


@dataclass(frozen=True)
class LinkTrouble:
    """What a link reports about its peer (the subclasses say what went wrong)."""

    peer: int
    why: str


class PeerDead(LinkTrouble):
    """A link lost its peer: the connection broke, or the peer was silent for the timeout."""


class BadFrame(LinkTrouble):
    """A link received a frame that must not be used (corrupt, another plan, out of protocol)."""


@dataclass(frozen=True)
class ControlValue:
    """The caller's value for control collective number ``seq`` (see ``collectives.py``)."""

    seq: int
    value: Any


@dataclass(frozen=True)
class Abort:
    """This rank failed (the caller says why); stop every rank the plan cannot do without it."""

    reason: str


@dataclass(frozen=True)
class Close:
    """Deliver what is queued, say goodbye on every link, stop the protocol thread."""


Event = Union[LocalReady, LocalFilled, FrameArrived, PeerDead, BadFrame, ControlValue, Abort, Close]
