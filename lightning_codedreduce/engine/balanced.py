"""The bandwidth-balanced layout (``layout="balanced"``, see ``plan/layout.py``): every rank owns chunks.

Per step, on every rank (its protocol thread; the caller's compute may be slow meanwhile):

1. The caller hands in its gradient buffer, whole or (``CodedReducer.begin``) while backward still fills
   it. Each chunk ``c``, once the caller has filled (*closed*) it, is sent to its owner ``c mod W`` (the
   rank's own chunks stay local), except chunks whose result already arrived (the rank is late: nobody
   needs it). The result is assembled in the same buffer; a chunk's result that arrives while the caller
   still writes that chunk waits aside until it is closed.
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

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..plan.layout import chunk_bounds, owner_of
from .frames import FrameError, Header, Kind
from .protocol import Protocol


class PartBuffers:
    """Receive buffers for the chunks an owner takes in, reused from step to step.

    A fresh buffer per received chunk costs page faults: the kernel zeroes every page of new memory on first
    touch, and glibc hands large blocks freed by another thread back to the system. That was 29 % of a
    balanced reduce's CPU at W=13 on 26 MB (``perf``: ``clear_page_erms`` under the socket copy). Thread-safe:
    the links' receivers take, the protocol thread gives back once a part is summed or drained."""

    def __init__(self, keep: int) -> None:
        self.keep = keep  # idle buffers kept per size: about one per peer (memory: a few chunks per peer at most)
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((numel, dtype))
            if free:
                return free.pop()
        return torch.empty(numel, dtype=dtype)

    def give(self, part: torch.Tensor) -> None:
        """``part`` is no longer read by anyone (a received part, never a view of a rank's own gradient)."""
        with self._lock:
            free = self._free.setdefault((part.numel(), part.dtype), [])
            if len(free) < self.keep:
                free.append(part)


@dataclass
class _Assembly:
    """One step's result on this rank, filled chunk by chunk."""

    total: int  # values in the step's message
    dtype: torch.dtype
    # the caller's buffer once it handed it in; None before (results wait aside: a rank that is late to hand
    # in, which is every step on some rank, would fault in a whole fresh buffer for a few chunks' results)
    result: Optional[torch.Tensor] = None
    have: set[int] = field(default_factory=set)  # chunks whose result is known
    # chunks the caller may still write (None: no caller buffer yet); the receivers land nothing in them
    open: Optional[set[int]] = None
    filled: dict[int, int] = field(default_factory=dict)  # open chunk -> values the caller has filled
    aside: dict[int, torch.Tensor] = field(default_factory=dict)  # results of chunks with no place in a buffer yet
    received: set[int] = field(default_factory=set)  # chunks whose aside is a receive buffer (reused once copied)

    def lands_aside(self, c: int) -> bool:
        """Whether chunk ``c``'s result must wait aside: no caller buffer yet, or the caller may still write it."""
        return self.result is None or (self.open is not None and c in self.open)


class BalancedProtocol(Protocol):
    """One rank's side of the balanced reduce; runs on the protocol thread."""

    def __init__(self, *args, start_step: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.world = self.plan.world_size
        self.groups = self.plan.balanced
        self.floor = start_step  # every step below is published here
        self.published: set[int] = set()  # published steps >= floor
        self.pending: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (step, owned chunk) -> group -> part
        self.owned_left: dict[int, set[int]] = {}  # step -> owned chunks not yet reduced
        self.assembly: dict[int, _Assembly] = {}
        self.used: dict[int, set[int]] = {}  # step -> ranks whose parts were summed here
        self.received: dict[tuple[int, int], set[int]] = {}  # (step, owned chunk) -> groups whose part was received
        self.starved_from: Optional[int] = None  # first step that can never complete (an owner closed)
        self.sent_until = start_step  # every reduced chunk this rank sent is of a step below (steps go in order)
        self._bounds: dict[tuple[int, torch.dtype], list[tuple[int, int]]] = {}
        self._chunk_starts: dict[tuple[int, torch.dtype], list[int]] = {}  # for bisecting a filled range
        # result buffers by step, for the links' receivers: a reduced chunk lands where it belongs (the
        # assembly, whose ``open`` chunks the receivers leave alone: the caller may be writing them)
        self._landing: dict[int, _Assembly] = {}
        self._landing_lock = threading.Lock()
        self.part_buffers = PartBuffers(keep=len(self.links))
        for link in self.links.values():
            link.landing = self.landing_for

    def landing_for(self, header: Header) -> torch.Tensor | None:
        """Called by a link's receiver thread: the slice of its step's result a CHUNK_DOWN frame fills, or else a
        reused buffer (a CHUNK_UP frame's part, or a result that waits aside)."""
        if header.kind not in (Kind.CHUNK_UP, Kind.CHUNK_DOWN) or not header.total:
            return None
        bounds = self._chunks(header.total, header.dtype)
        if not 0 <= header.extra < len(bounds):
            return None
        if header.kind == Kind.CHUNK_DOWN:
            with self._landing_lock:  # held while the protocol thread closes chunks or swaps buffers
                asm = self._landing.get(header.step)
                if asm is not None and (asm.total, asm.dtype) == (header.total, header.dtype) \
                        and not asm.lands_aside(header.extra):
                    a, b = bounds[header.extra]
                    return asm.result[a:b]
        return self.part_buffers.take(header.numel, header.dtype)

    def _set_landing(self, step: int, asm: _Assembly | None) -> None:
        with self._landing_lock:
            if asm is None:
                self._landing.pop(step, None)
            else:
                self._landing[step] = asm

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
            asm = self.assembly[step] = _Assembly(total, dtype)
            self._set_landing(step, asm)
            self.owned_left[step] = {c for c in range(len(self._chunks(total, dtype))) if owner_of(c, self.world) == self.rank}
        elif (asm.total, asm.dtype) != (total, dtype):
            raise FrameError(f"step {step}: a message of {total} {dtype} values, expected {asm.total} "
                             f"{asm.dtype} (do all ranks have the same model?)")
        return asm

    # ------------------------------------------------------------------ local gradient
    def on_local(self, step: int, flat: torch.Tensor, when: float, in_place: bool = False,
                 partial: bool = False) -> None:
        """``flat`` becomes the step's result buffer (the caller's, or the reducer's private copy); with
        ``partial`` the caller is still filling it and announces ranges with :meth:`on_filled`."""
        if self._is_published(step):
            return  # reduced without us
        total, dtype = flat.numel(), flat.dtype
        asm = self._assembly(step, total, dtype)
        if asm.open is not None:
            raise FrameError(f"step {step}: the local gradient was handed in twice")
        with self._landing_lock:  # (results that came first wait aside until their chunk is closed)
            asm.result, asm.open = flat, set(range(len(self._chunks(total, dtype))))
        if not partial:
            self.on_filled(step, 0, None, when)

    def on_filled(self, step: int, lo: int, hi: Optional[int], when: Optional[float] = None) -> None:
        """The caller wrote ``[lo, hi)`` of its buffer (``hi=None``: it is done, everything is written)."""
        asm = self.assembly.get(step)
        if self._is_published(step) or asm is None or asm.open is None:
            return  # reduced without us (the caller's writes went into a buffer nobody reads)
        bounds = self._chunks(asm.total, asm.dtype)
        if hi is None:
            self.stat(step).local_ready = time.monotonic() if when is None else when
            for c in sorted(asm.open):
                self._close(step, asm, c)
            return
        first = bisect.bisect_right(self._starts(asm.total, asm.dtype), lo) - 1
        for c in range(max(first, 0), len(bounds)):
            a, b = bounds[c]
            if a >= hi:
                break
            if c in asm.open:
                asm.filled[c] = asm.filled.get(c, 0) + min(b, hi) - max(a, lo)
                if asm.filled[c] >= b - a:
                    self._close(step, asm, c)

    def _starts(self, total: int, dtype: torch.dtype) -> list[int]:
        key = (total, dtype)
        if key not in self._chunk_starts:
            self._chunk_starts[key] = [a for a, _ in self._chunks(total, dtype)]
        return self._chunk_starts[key]

    def _close(self, step: int, asm: _Assembly, c: int) -> None:
        """Chunk ``c`` of the caller's buffer is written: send it to its owner, or put its result in."""
        with self._landing_lock:
            asm.open.discard(c)
        asm.filled.pop(c, None)
        a, b = self._chunks(asm.total, asm.dtype)[c]
        if c in asm.aside:  # its result came first: nobody needs this rank's part
            self._put_aside_in(asm, c, asm.result[a:b])
        elif c not in asm.have:
            owner = owner_of(c, self.world)
            if owner == self.rank:
                self._contribute(step, c, self.groups.group_of(self.rank), asm.result[a:b], self.rank)
            else:
                self.links[owner].send(Header(Kind.CHUNK_UP, step, b - a, asm.dtype, self.rank, extra=c,
                                              total=asm.total), asm.result[a:b])
        if step in self.assembly:
            self._publish_if_complete(step, asm)

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
            if asm.lands_aside(c):  # no buffer of the caller's yet, or it may still write this chunk
                asm.aside[c] = payload
                asm.received.add(c)
            elif payload.data_ptr() != asm.result[a:b].data_ptr():  # it did not land in place
                asm.result[a:b].copy_(payload)
                self.part_buffers.give(payload)
            self._have(step, c, asm)
            return
        if owner_of(c, self.world) != self.rank:
            raise FrameError(f"CHUNK_UP frame for chunk {c} from rank {src}; rank {self.rank} does not own it")
        if self._is_published(step):
            self.note_arrival(step, src)
            self._drain(payload)  # late: the step was reduced without it
            return
        self.stat(step).arrivals.setdefault(src, time.monotonic())
        if c in self._assembly(step, header.total, header.dtype).have:
            self._drain(payload)  # late: the chunk was reduced without it
            return
        self._contribute(step, c, self.groups.group_of(src), payload, src)

    def _drain(self, part: torch.Tensor) -> None:
        self.drained += 1
        self.part_buffers.give(part)

    def _contribute(self, step: int, c: int, group: int, part: torch.Tensor, src: int) -> None:
        parts = self.pending.setdefault((step, c), {})
        if group in parts:  # another member of the group was first
            if src == self.rank:
                self.drained += 1
            else:
                self._drain(part)
            return
        parts[group] = part
        if src != self.rank:
            self.used.setdefault(step, set()).add(src)
            self.received.setdefault((step, c), set()).add(group)
        self.max_buffered = max(self.max_buffered, sum(len(p) for p in self.pending.values()))
        if len(parts) == self.groups.count:
            self._reduce_chunk(step, c)

    def _reduce_chunk(self, step: int, c: int) -> None:
        parts = self.pending.pop((step, c))
        received = self.received.pop((step, c), set())
        asm = self.assembly[step]
        a, b = self._chunks(asm.total, asm.dtype)[c]
        # a private chunk: the result buffer may be the caller's tensor (and hold this rank's own part)
        out = parts[0].clone()
        for g in range(1, self.groups.count):  # group order, not arrival order: reproducible bits
            out += parts[g]
        for g in received:
            self.part_buffers.give(parts[g])
        if asm.lands_aside(c):
            asm.aside[c] = out  # (its own part was not needed; never reused: the links are sending it)
        else:
            asm.result[a:b].copy_(out)
        header = Header(Kind.CHUNK_DOWN, step, b - a, out.dtype, self.rank, extra=c, total=asm.total)
        for link in self.links.values():
            link.send(header, out)
        self.sent_until = max(self.sent_until, step + 1)
        left = self.owned_left[step]
        left.discard(c)
        if not left:
            stat = self.stat(step)
            stat.sent = time.monotonic()
            stat.used = tuple(sorted(self.used.pop(step, ())))
        self._have(step, c, asm)

    def _put_aside_in(self, asm: _Assembly, c: int, dest: torch.Tensor) -> None:
        """Chunk ``c``'s result, waiting aside, goes into its place (its receive buffer is then reused)."""
        part = asm.aside.pop(c)
        dest.copy_(part)
        if c in asm.received:
            asm.received.discard(c)
            self.part_buffers.give(part)

    def _have(self, step: int, c: int, asm: _Assembly) -> None:
        asm.have.add(c)
        self._publish_if_complete(step, asm)

    def _publish_if_complete(self, step: int, asm: _Assembly) -> None:
        """Every chunk's result is known and in the buffer (none waits for the caller to close its chunk)."""
        bounds = self._chunks(asm.total, asm.dtype)
        if len(asm.have) < len(bounds) or asm.open:
            return
        del self.assembly[step]  # complete: publish
        self._set_landing(step, None)
        if asm.result is None:  # reduced without the caller (it is late): every result waits aside
            asm.result = torch.empty(asm.total, dtype=asm.dtype)
            for c in list(asm.aside):
                a, b = bounds[c]
                self._put_aside_in(asm, c, asm.result[a:b])
        self.owned_left.pop(step, None)
        self.stat(step).result = time.monotonic()
        self.board.publish(step, asm.result)
        self.published.add(step)
        while self.floor in self.published:
            self.published.discard(self.floor)
            self.floor += 1
        self.retire_stats(self.floor - 1)

    def advance(self) -> None:
        """Nothing to do between events: chunks are reduced and forwarded as their parts arrive."""

    def result_frontier(self) -> int:
        # rank 0 owns chunk 0 of every step: no rank completes a step >= this before rank 0 sends it more
        return self.sent_until

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
                                       for c in range(len(self._chunks(asm.total, asm.dtype)))):
                break
            step += 1
        with self.board.cond:
            self.starved_from = step if self.starved_from is None else min(self.starved_from, step)
            self.board.cond.notify_all()

    def starved_result(self) -> Optional[str]:
        if self.starved_from is not None and self.board.next_step >= self.starved_from:
            return f"a rank that owns chunks of step {self.board.next_step} finished (rank {self.rank} asked for more than its peers?)"
        return None
