"""Tree collectives for small control values, over the reducer's links: they survive dead ranks.

Lightning synchronises its ranks a few times per epoch (checkpoint decisions, barriers, epoch-end
``self.log(..., sync_dist=True)``, early stopping). On the default process group such a collective
waits for -- or fails on -- a rank that died, so a death just before it would stop every survivor.
Through the coded tree a collective waits only for the ranks still alive:

* each rank hands in a value; a parent waits for its own value and for every child that is not dead
  (or gone), merges the ``{rank: value}`` maps and sends them up (``CTRL_UP``);
* the root adds the ranks it knows to be dead and sends the result down (``CTRL_DOWN``) to every
  survivor, so all survivors get the same values *and the same dead set*;
* a child that dies while its parent waits is found by its link (connection closed, or silence for
  ``timeout`` seconds) and, if the plan can do without it, the collective completes without it;
  otherwise every rank raises ``CodedReduceError``, as for a training step.

Collectives are numbered per reducer, so every rank must call them in the same order (as with
``torch.distributed``). Death notices travel on the same links ahead of ``CTRL_UP``, so the root knows
of every death that a parent stopped waiting for. Values are pickled, like ``torch.distributed``'s
object collectives: peers are processes of the same job, and frames are checked against the plan
fingerprint and the link before they are used.
"""
from __future__ import annotations

import collections
import pickle
from typing import Any, Callable, Optional, Protocol

import torch

from .board import ResultBoard
from .events import ControlValue, Event
from .frames import FrameError, Header, Kind
from .transport import Link


class ControlPort(Protocol):
    """What the collectives need from the reducer's protocol (``protocol.Protocol`` provides it)."""

    rank: int
    board: ResultBoard  # results are handed to the caller under its condition

    def control_parent(self) -> Optional[Link]: ...

    def control_children(self) -> dict[int, Link]: ...

    def gone(self, peer: int) -> bool: ...

    def known_dead(self) -> frozenset[int]: ...

    def send_down(self, header: Header, payload: torch.Tensor | None) -> None: ...

    def starved_control(self) -> Optional[str]: ...


def pack(obj: Any) -> torch.Tensor:
    """An object as a uint8 tensor (the payload of a control frame)."""
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)


def unpack(payload: torch.Tensor) -> Any:
    return pickle.loads(payload.numpy().tobytes())


class TreeCollectives:
    """Control collectives of one :class:`CodedReducer`.

    ``all_gather_object`` is the caller's side; ``on_local``, ``on_frame`` and ``advance`` run on the
    reducer's protocol thread (which owns the protocol state; results are shared under the board's
    condition). ``submit`` queues an event for the protocol thread.
    """

    def __init__(self, port: ControlPort, submit: Callable[[Event], None]):
        self._port = port
        self._submit = submit
        self._next_call = 0  # caller: number of the next collective
        self._assembling = 0  # protocol: collective whose upward message is being assembled
        self._next_down = 0  # protocol: next CTRL_DOWN expected from the parent
        self._local: dict[int, Any] = {}
        self._arrived: dict[int, dict[int, dict]] = collections.defaultdict(dict)
        self._results: dict[int, tuple[dict[int, Any], frozenset[int]]] = {}

    # ------------------------------------------------------------------ caller
    def all_gather_object(self, obj: Any) -> tuple[dict[int, Any], frozenset[int]]:
        """Every surviving rank's ``obj`` as ``{rank: obj}``, and the ranks known dead (same on every survivor)."""
        board = self._port.board
        seq, self._next_call = self._next_call, self._next_call + 1
        self._submit(ControlValue(seq, obj))
        with board.cond:
            board.wait(lambda: seq in self._results, f"collective {seq} completed", self._port.starved_control)
            return self._results.pop(seq)

    # ------------------------------------------------------------------ protocol thread
    def on_local(self, seq: int, obj: Any) -> None:
        self._local[seq] = {self._port.rank: obj}

    def on_frame(self, src: int, header: Header, payload: torch.Tensor) -> None:
        port = self._port
        parent = port.control_parent()
        if header.kind == Kind.CTRL_DOWN:
            if parent is None or src != parent.peer:
                raise FrameError(f"CTRL_DOWN frame from rank {src}, which is not this rank's parent")
            if header.step != self._next_down:
                raise FrameError(f"CTRL_DOWN frame for collective {header.step} from rank {src}; "
                                 f"expected {self._next_down}")
            self._next_down += 1
            values, dead = self._decode(src, payload, down=True)
            self._deliver(header.step, payload, values, dead)
            return
        if src not in port.control_children():
            raise FrameError(f"CTRL_UP frame from rank {src}, which is not a child of rank {port.rank}")
        if header.step != self._assembling:  # a child cannot run ahead: it waits for this collective's result
            raise FrameError(f"CTRL_UP frame for collective {header.step} from rank {src} while rank {port.rank} "
                             f"assembles collective {self._assembling}")
        self._arrived[header.step][src] = self._decode(src, payload, down=False)

    def advance(self) -> None:
        """Send this rank's merged values up (or, at the root, the result down) once nothing alive is missing."""
        port = self._port
        seq = self._assembling
        if seq not in self._local:
            return
        arrived = self._arrived.get(seq, {})
        if any(c not in arrived and not port.gone(c) for c in port.control_children()):
            return
        merged = dict(self._local.pop(seq))
        for values in self._arrived.pop(seq, {}).values():
            merged.update(values)
        self._assembling = seq + 1
        parent = port.control_parent()
        if parent is not None:
            payload = pack(merged)
            parent.send(Header(Kind.CTRL_UP, seq, payload.numel(), torch.uint8, port.rank), payload)
            return
        dead = port.known_dead()
        self._deliver(seq, pack((merged, sorted(dead))), merged, dead)

    def _deliver(self, seq: int, payload: torch.Tensor, values: dict[int, Any], dead: frozenset[int]) -> None:
        port = self._port
        port.send_down(Header(Kind.CTRL_DOWN, seq, payload.numel(), torch.uint8, port.rank), payload)
        with port.board.cond:
            self._results[seq] = (values, dead)
            port.board.cond.notify_all()

    @staticmethod
    def _decode(src: int, payload: torch.Tensor, down: bool):
        if payload.dtype != torch.uint8:
            raise FrameError(f"control frame from rank {src} carries {payload.dtype}, not bytes")
        try:
            obj = unpack(payload)
        except Exception as err:
            raise FrameError(f"unreadable control frame from rank {src}: {err!r}") from None
        if down:  # (values, dead ranks) from the root
            if not (isinstance(obj, tuple) and len(obj) == 2):
                raise FrameError(f"malformed control frame from rank {src}")
            values, dead = obj
        else:
            values, dead = obj, ()
        if not isinstance(values, dict) or not all(isinstance(k, int) for k in values):
            raise FrameError(f"malformed control frame from rank {src}")
        return (values, frozenset(dead)) if down else values
