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
from typing import TYPE_CHECKING, Any

import torch

from .frames import FrameError, Header, Kind

if TYPE_CHECKING:  # pragma: no cover
    from .reducer import CodedReducer


def pack(obj: Any) -> torch.Tensor:
    """An object as a uint8 tensor (the payload of a control frame)."""
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)


def unpack(payload: torch.Tensor) -> Any:
    return pickle.loads(payload.numpy().tobytes())


class TreeCollectives:
    """Control collectives of one :class:`CodedReducer`.

    ``all_gather_object`` is the caller's side; ``on_local``, ``on_frame`` and ``advance`` run on the
    reducer's protocol thread (which owns the protocol state; results are shared under its condition).
    """

    def __init__(self, reducer: CodedReducer):
        self._reducer = reducer
        self._next_call = 0  # caller: number of the next collective
        self._assembling = 0  # protocol: collective whose upward message is being assembled
        self._next_down = 0  # protocol: next CTRL_DOWN expected from the parent
        self._local: dict[int, Any] = {}
        self._arrived: dict[int, dict[int, dict]] = collections.defaultdict(dict)
        self._results: dict[int, tuple[dict[int, Any], frozenset[int]]] = {}

    # ------------------------------------------------------------------ caller
    def all_gather_object(self, obj: Any) -> tuple[dict[int, Any], frozenset[int]]:
        """Every surviving rank's ``obj`` as ``{rank: obj}``, and the ranks known dead (same on every survivor)."""
        r = self._reducer
        seq, self._next_call = self._next_call, self._next_call + 1
        r._events.put(("ctrl", seq, obj))
        with r._cond:
            r._wait_until(lambda: seq in self._results, f"collective {seq} completed")
            return self._results.pop(seq)

    # ------------------------------------------------------------------ protocol thread
    def on_local(self, seq: int, obj: Any) -> None:
        self._local[seq] = {self._reducer.rank: obj}

    def on_frame(self, src: int, header: Header, payload: torch.Tensor) -> None:
        r = self._reducer
        if header.kind == Kind.CTRL_DOWN:
            if src != r.plan.parent(r.rank):
                raise FrameError(f"CTRL_DOWN frame from rank {src}, which is not this rank's parent")
            if header.step != self._next_down:
                raise FrameError(f"CTRL_DOWN frame for collective {header.step} from rank {src}; "
                                 f"expected {self._next_down}")
            self._next_down += 1
            values, dead = self._decode(src, payload, down=True)
            self._deliver(header.step, payload, values, dead)
            return
        if src not in r._children:
            raise FrameError(f"CTRL_UP frame from rank {src}, which is not a child of rank {r.rank}")
        if header.step != self._assembling:  # a child cannot run ahead: it waits for this collective's result
            raise FrameError(f"CTRL_UP frame for collective {header.step} from rank {src} while rank {r.rank} "
                             f"assembles collective {self._assembling}")
        self._arrived[header.step][src] = self._decode(src, payload, down=False)

    def advance(self) -> None:
        """Send this rank's merged values up (or, at the root, the result down) once nothing alive is missing."""
        r = self._reducer
        seq = self._assembling
        if seq not in self._local:
            return
        arrived = self._arrived.get(seq, {})
        if any(c not in arrived and c not in r.dead and c not in r._finished for c in r._children):
            return
        merged = dict(self._local.pop(seq))
        for values in self._arrived.pop(seq, {}).values():
            merged.update(values)
        self._assembling = seq + 1
        if r._parent is not None:
            payload = pack(merged)
            r._parent.send(Header(Kind.CTRL_UP, seq, payload.numel(), torch.uint8, r.rank), payload)
            return
        dead = frozenset(r.dead)
        self._deliver(seq, pack((merged, sorted(dead))), merged, dead)

    def _deliver(self, seq: int, payload: torch.Tensor, values: dict[int, Any], dead: frozenset[int]) -> None:
        r = self._reducer
        for link in r._children.values():
            if link.peer not in r.dead:
                link.send(Header(Kind.CTRL_DOWN, seq, payload.numel(), torch.uint8, r.rank), payload)
        with r._cond:
            self._results[seq] = (values, dead)
            r._cond.notify_all()

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
