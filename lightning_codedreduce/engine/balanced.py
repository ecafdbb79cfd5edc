"""The bandwidth-balanced layout (``layout="balanced"``, see ``plan/layout.py``): every rank owns chunks.

Per step, on every rank (its protocol thread; the caller's compute may be slow meanwhile):

1. When the caller hands in its gradient, chunk ``c`` is sent to its owner ``c mod W`` (the rank's own
   chunks stay local), except chunks whose result already arrived (the rank is late: nobody needs it).
2. As owner, the rank keeps the first arrival of each fractional-repetition group for each of its
   chunks (its own gradient included; later members are drained). Once every group is in, it sums
   them in group order (the same bits whichever member arrived) into the step's result and sends
   the reduced chunk to every other rank -- chunk by chunk, as each is decoded.
3. When every chunk of the step is in, the result is published; a lagging rank finds the steps it
   missed there, as in the tree (its protocol thread kept serving its chunks).

Every rank owns chunks, so a dead process stops the reduce (every rank raises ``CodedReduceError``
naming it, within the timeout); slow compute anywhere, rank 0 included, is not waited for.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..plan.layout import chunk_bounds, owner_of
from .frames import FrameError, Header, Kind
from .protocol import Protocol


@dataclass
class _Assembly:
    """One step's result on this rank, filled chunk by chunk."""

    result: torch.Tensor
    have: set[int] = field(default_factory=set)


class BalancedProtocol(Protocol):
    """One rank's side of the balanced reduce; runs on the protocol thread."""

    def __init__(self, *args, start_step: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.world = self.plan.world_size
        self.groups = self.plan.balanced
        self.floor = start_step  # every step below is published here
        self.published: set[int] = set()  # published steps >= floor
        self.local: dict[int, torch.Tensor] = {}  # this rank's gradient, until its step is published
        self.pending: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (step, owned chunk) -> group -> part
        self.owned_left: dict[int, set[int]] = {}  # step -> owned chunks not yet reduced
        self.assembly: dict[int, _Assembly] = {}
        self.used: dict[int, set[int]] = {}  # step -> ranks whose parts were summed here
        self.starved_from: Optional[int] = None  # first step that can never complete (an owner closed)
        self._bounds: dict[tuple[int, torch.dtype], list[tuple[int, int]]] = {}
        # result buffers by step, for the links' receivers: a reduced chunk lands where it belongs
        self._landing: dict[int, torch.Tensor] = {}
        self._landing_lock = threading.Lock()
        for link in self.links.values():
            link.landing = self.landing_for

    def landing_for(self, header: Header) -> torch.Tensor | None:
        """Called by a link's receiver thread: the slice of its step's result a CHUNK_DOWN frame fills."""
        if header.kind != Kind.CHUNK_DOWN or not header.total:
            return None
        with self._landing_lock:
            result = self._landing.get(header.step)
        if result is None or result.numel() != header.total or result.dtype != header.dtype:
            return None
        bounds = self._chunks(header.total, header.dtype)
        if not 0 <= header.extra < len(bounds):
            return None
        a, b = bounds[header.extra]
        return result[a:b]

    def _set_landing(self, step: int, result: torch.Tensor | None) -> None:
        with self._landing_lock:
            if result is None:
                self._landing.pop(step, None)
            else:
                self._landing[step] = result

    # ------------------------------------------------------------------ helpers
    def _chunks(self, total: int, dtype: torch.dtype) -> list[tuple[int, int]]:
        key = (total, dtype)
        if key not in self._bounds:
            self._bounds[key] = chunk_bounds(total, dtype.itemsize, self.world, self.plan.chunk_bytes)
        return self._bounds[key]

    def _is_published(self, step: int) -> bool:
        return step < self.floor or step in self.published

    def _assembly(self, step: int, total: int, dtype: torch.dtype) -> _Assembly:
        asm = self.assembly.get(step)
        if asm is None:
            asm = self.assembly[step] = _Assembly(torch.empty(total, dtype=dtype))
            self._set_landing(step, asm.result)
            self.owned_left[step] = {c for c in range(len(self._chunks(total, dtype))) if owner_of(c, self.world) == self.rank}
        elif asm.result.numel() != total or asm.result.dtype != dtype:
            raise FrameError(f"step {step}: a message of {total} {dtype} values, expected {asm.result.numel()} "
                             f"{asm.result.dtype} (do all ranks have the same model?)")
        return asm

    # ------------------------------------------------------------------ local gradient
    def on_local(self, step: int, flat: torch.Tensor, when: float, in_place: bool = False) -> None:
        if self._is_published(step):
            return  # reduced without us
        self.local[step] = flat
        self.stat(step).local_ready = when
        total, dtype = flat.numel(), flat.dtype
        asm = self._assembly(step, total, dtype)
        if in_place:  # assemble the result in the caller's tensor: a part of it is overwritten only once its
            # chunk is reduced, when any copy of that part still queued for its owner is late (drained)
            for c in asm.have:
                a, b = self._chunks(total, dtype)[c]
                flat[a:b].copy_(asm.result[a:b])
            asm.result = flat  # chunks already landed in the old buffer are copied when their frames are handled
            self._set_landing(step, flat)
        mine = self.groups.group_of(self.rank)
        for c, (a, b) in enumerate(self._chunks(total, dtype)):
            owner = owner_of(c, self.world)
            if c in asm.have:
                continue  # its result is here already: nobody needs this rank's part
            if owner == self.rank:
                self._contribute(step, c, mine, flat[a:b], self.rank)
            else:
                self.links[owner].send(Header(Kind.CHUNK_UP, step, b - a, dtype, self.rank, extra=c, total=total),
                                       flat[a:b])

    # ------------------------------------------------------------------ frames
    def on_data_frame(self, src: int, header: Header, payload: torch.Tensor | None) -> None:
        if header.kind not in (Kind.CHUNK_UP, Kind.CHUNK_DOWN):
            raise FrameError(f"{header.kind.name} frame from rank {src} in the balanced layout")
        bounds = self._chunks(header.total, header.dtype) if header.total else []
        c = header.extra
        if not 0 <= c < len(bounds) or bounds[c][1] - bounds[c][0] != header.numel:
            raise FrameError(f"{header.kind.name} frame from rank {src}: chunk {c} of {header.numel} values does not "
                             f"fit a {header.total}-value message (do all ranks have the same model?)")
        step = header.step
        if header.kind == Kind.CHUNK_DOWN:
            if src != owner_of(c, self.world):
                raise FrameError(f"CHUNK_DOWN frame for chunk {c} from rank {src}, which does not own it")
            if self._is_published(step):
                raise FrameError(f"CHUNK_DOWN frame for step {step} from rank {src} after the step was complete")
            asm = self._assembly(step, header.total, header.dtype)
            if c in asm.have:
                raise FrameError(f"rank {src} sent chunk {c} of step {step} twice")
            a, b = bounds[c]
            dest = asm.result[a:b]
            if payload.data_ptr() != dest.data_ptr():  # it did not land in place
                dest.copy_(payload)
            self._have(step, c, asm)
            return
        if owner_of(c, self.world) != self.rank:
            raise FrameError(f"CHUNK_UP frame for chunk {c} from rank {src}; rank {self.rank} does not own it")
        if self._is_published(step):
            self.note_arrival(step, src)
            self.drained += 1  # late: the step was reduced without it
            return
        self.stat(step).arrivals.setdefault(src, time.monotonic())
        if c in self._assembly(step, header.total, header.dtype).have:
            self.drained += 1  # late: the chunk was reduced without it
            return
        self._contribute(step, c, self.groups.group_of(src), payload, src)

    def _contribute(self, step: int, c: int, group: int, part: torch.Tensor, src: int) -> None:
        parts = self.pending.setdefault((step, c), {})
        if group in parts:
            self.drained += 1  # another member of the group was first
            return
        parts[group] = part
        if src != self.rank:
            self.used.setdefault(step, set()).add(src)
        self.max_buffered = max(self.max_buffered, sum(len(p) for p in self.pending.values()))
        if len(parts) == self.groups.count:
            self._reduce_chunk(step, c)

    def _reduce_chunk(self, step: int, c: int) -> None:
        parts = self.pending.pop((step, c))
        asm = self.assembly[step]
        a, b = self._chunks(asm.result.numel(), asm.result.dtype)[c]
        # a private chunk: the result buffer may be the caller's tensor (and hold this rank's own part)
        out = parts[0].clone()
        for g in range(1, self.groups.count):  # group order, not arrival order: reproducible bits
            out += parts[g]
        asm.result[a:b].copy_(out)
        header = Header(Kind.CHUNK_DOWN, step, b - a, out.dtype, self.rank, extra=c, total=asm.result.numel())
        for link in self.links.values():
            link.send(header, out)
        left = self.owned_left[step]
        left.discard(c)
        if not left:
            stat = self.stat(step)
            stat.sent = time.monotonic()
            stat.used = tuple(sorted(self.used.pop(step, ())))
        self._have(step, c, asm)

    def _have(self, step: int, c: int, asm: _Assembly) -> None:
        asm.have.add(c)
        if len(asm.have) < len(self._chunks(asm.result.numel(), asm.result.dtype)):
            return
        del self.assembly[step]  # complete: publish
        self._set_landing(step, None)
        self.owned_left.pop(step, None)
        self.local.pop(step, None)
        self.stat(step).result = time.monotonic()
        self.board.publish(step, asm.result)
        self.published.add(step)
        while self.floor in self.published:
            self.published.discard(self.floor)
            self.floor += 1
        self.retire_stats(self.floor - 1)

    def advance(self) -> None:
        """Nothing to do between events: chunks are reduced and forwarded as their parts arrive."""

    # ------------------------------------------------------------------ peers that go away
    def on_dead(self, peer: int, why: str) -> None:
        if peer in self.dead or peer in self.finished:
            return
        self.dead[peer] = why
        self.fail(f"CodedReduce stopped: rank {peer} died ({why}). In the balanced layout every rank owns chunks "
                  "of the gradient, so the reduce cannot go on without it; layout='tree' tolerates dead ranks",
                  culprit=peer)

    def on_death_notice(self, src: int, peer: int) -> None:
        raise FrameError(f"rank {src} sent a death notice (rank {peer}); the balanced layout has none")

    def on_bye(self, src: int) -> None:
        """A peer closed: a step missing any of its chunks can never complete here."""
        super().on_bye(src)
        step = self.floor
        while step in self.assembly or step in self.published:
            asm = self.assembly.get(step)
            if asm is not None and any(owner_of(c, self.world) == src and c not in asm.have
                                       for c in range(len(self._chunks(asm.result.numel(), asm.result.dtype)))):
                break
            step += 1
        with self.board.cond:
            self.starved_from = step if self.starved_from is None else min(self.starved_from, step)
            self.board.cond.notify_all()

    def starved_result(self) -> Optional[str]:
        if self.starved_from is not None and self.board.next_step >= self.starved_from:
            return f"a rank that owns chunks of step {self.board.next_step} finished (rank {self.rank} asked for more than its peers?)"
        return None
