"""``CodedReducer``: the straggler-tolerant coded all-reduce (CodedReduce) on torch.distributed.

Each step every rank hands in its local *weighted* gradient (see ``CodedReducePlan.shards``) and
gets back the same global sum. How it travels is the plan's layout: the paper's tree (``tree.py``)
or the bandwidth-balanced chunk owners (``balanced.py``). One protocol thread per process does the
receiving, decoding and forwarding (``_run``: it alone changes protocol state, reacting to the typed
events of ``events.py``), so a rank's peers get results while it is still computing.

Protocol (no global barrier):

* a frame for a step this rank has already finished is a late message: drained and discarded;
* a rank that falls behind finds the results it missed already there: ``ready(step)`` tells the
  caller to apply them without computing (``next_step`` is the next step to apply);
* memory is bounded: a few steps of peers' messages, and unconsumed results up to
  ``max_backlog_bytes`` before the rank stops reading (back-pressure);
* a peer that dies (or is silent for ``timeout`` seconds -- idle links carry heartbeats) is
  recorded; if the plan still decodes without it, training goes on; otherwise every rank raises
  ``CodedReduceError`` naming it, within about ``timeout`` seconds;
* tolerated deaths are announced with the results: ``agreed_dead(step)`` is the same on every
  survivor that applied the same steps (a caller can then avoid collectives that would wait for it);
* control collectives (``all_gather_object``: barriers, broadcasts, metric reductions) travel a tree
  and wait only for live ranks, so a death never blocks them (see ``collectives.py``).

Transports: ``"gloo"`` (default; CUDA tensors are staged through host memory) or ``"nccl"``: the frames
travel over NCCL, with two 2-rank communicators per link (one per direction: a receive pending on
a communicator's stream would block that communicator's sends), created collectively at start. The
protocol (decoding, accumulation) stays in host memory either way.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Sequence

import torch
import torch.distributed as dist

from ..plan import CodedReducePlan
from .balanced import BalancedProtocol
from .board import CodedReduceError, ResultBoard
from .collectives import TreeCollectives
from .events import Abort, BadFrame, Close, ControlValue, FrameArrived, LocalFilled, LocalReady, PeerDead
from .frames import FrameError, Header, Kind, fingerprint_int
from .notices import Announcement, Note, Notices
from .protocol import Protocol, StepStats
from .ring import RingStream, checked_segments
from .tree import TreeProtocol
from .transport import TAG, Link, check_transport, link_groups

__all__ = ["CodedReduceError", "CodedReducer", "StepStats"]


class CodedReducer:
    """Coded all-reduce for one process (the plan's layout: tree or balanced). Create after
    ``torch.distributed`` is initialised.

    Args:
        plan: the plan every rank built identically (checked with a one-off all-gather).
        timeout: seconds of silence after which a peer counts as dead (heartbeats every
            ``timeout / 10`` keep busy but healthy peers alive).
        start_step: first step number (e.g. the global step after a resume).
        max_backlog_bytes: unconsumed results kept before back-pressure.
        group: process group (default: the world); its size must equal ``plan.world_size``. Every
            link (``plan.links()``) gets a 2-rank process group of its own, created here collectively: every rank of the
            world must create its reducer at the same time.
        tag: point-to-point tag of this reducer's frames.
        transport: ``"gloo"`` (CPU; CUDA tensors are staged through host memory) or ``"nccl"`` (frames over
            NCCL, one pair of communicators per tree link). ``"nccl"`` needs CUDA and NCCL.
        owns_group: destroy ``group`` when the reducer has closed and every neighbour closed too (a group opened
            for this reducer alone, as ``stragglers="auto"`` opens one per plan; gloo runs threads for a group
            until it is destroyed).
    """

    def __init__(self, plan: CodedReducePlan, *, timeout: float = 30.0, start_step: int = 0,
                 max_backlog_bytes: int = 512 << 20, group=None, tag: int = TAG, check_plan: bool = True,
                 transport: str = "gloo", owns_group: bool = False):
        check_transport(transport)  # before anything else: a clear error on machines without CUDA/NCCL
        if not dist.is_initialized():
            raise RuntimeError("initialise torch.distributed (e.g. gloo) before creating a CodedReducer")
        world = dist.get_world_size(group)
        if world != plan.world_size:
            raise ValueError(f"the plan is for {plan.world_size} ranks but the process group has {world}; "
                             f"build CodedReducePlan(world_size={world}, ...)")
        if not timeout > 0 or timeout == float("inf"):  # (NaN fails the first test)
            raise ValueError(f"timeout must be a finite, positive number of seconds, got {timeout}")
        self.plan = plan
        self.rank = dist.get_rank(group)
        self.group = group
        self._owns_group = owns_group and group is not None
        self.timeout = timeout
        self._fp = fingerprint_int(plan.fingerprint())
        if check_plan:
            self._check_fingerprints()
        self.transport = transport
        self._events: queue.Queue = queue.Queue()
        self._board = ResultBoard(start_step, max_backlog_bytes)
        self._begun: tuple[int, torch.Tensor] | None = None  # (step, buffer) between begin() and finish()
        self._ring_stream: RingStream | None = None  # the ring's begun step, reduced segment by segment
        # s=0 in the balanced layout skips no straggler (every rank's share is needed): gloo's ring all-reduce,
        # DDP's own, does the sum in the caller's thread; the links stay for the control collectives
        self._ring = plan.balanced is not None and plan.stragglers == 0 and transport == "gloo"
        hb = max(0.05, timeout / 10)
        groups = link_groups(plan, self.rank, group, timeout, transport)
        device = torch.device("cuda", torch.cuda.current_device()) if transport == "nccl" else None
        # back-pressure: a full backlog stops the tree's rank reading from its parent; in the balanced
        # layout, from everyone (results come from every owner)
        # layout, from everyone (results come from every owner); a root with a coded own slot publishes without
        # its caller, so it stops reading its children instead
        upstream = (set(groups) if plan.balanced is not None else {plan.parent(self.rank)} if self.rank
                    else set(plan.children(0)) if plan.nodes[0].self_slot is not None else set())
        # the balanced layout never blocks its protocol thread on a send (outgoing chunks are views of this
        # step's buffers, so an unbounded outbox costs no memory) and bounds what it receives per peer
        # instead (flow control: a few chunks); the tree's bounded outboxes are its back-pressure
        flow = dict(max_queued=0, max_unprocessed=8) if plan.balanced is not None else {}
        links = {}
        for peer, (send_group, recv_group, peer_global) in groups.items():
            links[peer] = Link(self.rank, peer, self._fp, self._events, timeout, hb, group=send_group, tag=tag,
                               recv_group=recv_group, device=device, peer_global=peer_global,
                               before_receive=self._board.wait_for_room if peer in upstream else None, **flow)
        layout = BalancedProtocol if plan.balanced is not None else TreeProtocol
        self._protocol: Protocol = layout(plan, self.rank, self._board, links, start_step=start_step)
        self._control = TreeCollectives(self._protocol, self._events.put)
        self._notices = Notices(self._protocol, self._events.put, self._protocol.result_frontier)
        for link in links.values():
            link.start()
        self._thread = threading.Thread(target=self._run, name="codedreduce-protocol", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller API
    @property
    def next_step(self) -> int:
        """The next step whose result the caller has not consumed yet."""
        return self._board.next_step

    def ready(self, step: int) -> bool:
        """Whether ``step`` is already reduced (a lagging rank should apply it without computing)."""
        return self._board.ready(step)

    def reduce(self, step: int, local, *, in_place: bool = False):
        """Hand in this rank's weighted gradient for ``step``; return the global sum (same on every rank).

        ``local`` is a tensor or a list of tensors (returned in the same structure, device and dtype).
        If ``step`` was already reduced without this rank, ``local`` is ignored.

        ``in_place=True`` (one contiguous CPU tensor): the sum is written into ``local`` and returned. The
        balanced layout then needs no copy of the gradient at all (it assembles the result in ``local``);
        the tree accumulates in a private copy and copies the result back.
        """
        tensors = [local] if isinstance(local, torch.Tensor) else list(local)
        self._check_step(step, "reduce")
        if in_place and not (len(tensors) == 1 and tensors[0].device.type == "cpu" and tensors[0].is_contiguous()):
            raise ValueError("reduce(..., in_place=True) needs one contiguous CPU tensor")
        self._raise_if_failed()
        zero_copy = in_place and self.plan.balanced is not None
        # otherwise one private contiguous CPU copy (CUDA tensors are staged through host memory): the tree
        # accumulates into it, so the caller's tensors are never modified
        flat = tensors[0].detach().view(-1) if zero_copy else (
            torch.cat([t.detach().reshape(-1).cpu() for t in tensors]) if len(tensors) > 1
            else tensors[0].detach().reshape(-1).to("cpu", copy=True))
        if self._ring:
            self._all_reduce(step, flat)
        else:
            self._events.put(LocalReady(step, flat, time.monotonic(), in_place=zero_copy))
        out = self.result(step)
        if in_place:
            target = tensors[0].detach().view(-1)
            if out.data_ptr() != target.data_ptr():
                target.copy_(out)
            return local
        parts, offset = [], 0
        for t in tensors:
            parts.append(out[offset:offset + t.numel()].view_as(t).to(t.device, t.dtype))
            offset += t.numel()
        return parts[0] if isinstance(local, torch.Tensor) else parts

    # ------------------------------------------------------------------ caller API: handed in while backward runs
    def begin(self, step: int, flat: torch.Tensor, segments: Sequence[tuple[int, int]] | None = None) -> None:
        """Start ``step`` with a buffer the caller is still filling (e.g. from gradient hooks in backward).

        Call order: ``begin(step, flat)``, then ``filled(step, lo, hi)`` for disjoint ranges as they are
        written (each write must be complete before its call, and the caller must not write a range after
        announcing it), then ``finish(step)``, which returns the sum, written into ``flat``. In the balanced
        layout every chunk is sent as soon as it is filled, while the caller goes on (overlap with backward);
        the tree takes the buffer whole at ``finish``.

        ``segments``: the ranges ``filled`` will announce, in the order to reduce them, the same on every rank
        (e.g. DDP-style buckets of the same model). Over gloo's ring (balanced layout, ``stragglers=0``) each
        is all-reduced once it and every segment before it are filled, as DDP's buckets are (``ring.py``);
        without them the ring takes the buffer whole at ``finish``. The coded layouts take ranges in any order
        and ignore them.
        """
        self._check_step(step, "begin")
        if not (flat.device.type == "cpu" and flat.dim() == 1 and flat.is_contiguous()):
            raise ValueError("begin(step, flat) needs one flat, contiguous CPU tensor")
        ordered = None if segments is None else checked_segments(segments, flat.numel())
        self._raise_if_failed()
        self._begun = (step, flat)
        if self._ring:
            self._ring_stream = None if ordered is None else RingStream(flat, self.group, ordered)
        elif self.plan.balanced is not None:
            self._events.put(LocalReady(step, flat.detach(), time.monotonic(), in_place=True, partial=True))

    def filled(self, step: int, lo: int, hi: int) -> None:
        """``flat[lo:hi]`` of the buffer given to :meth:`begin` is written and will not change."""
        if self._ring:
            if self._ring_stream is not None:
                self._ring_stream.filled(lo, hi)
        elif self.plan.balanced is not None:
            self._events.put(LocalFilled(step, lo, hi))

    def finish(self, step: int) -> torch.Tensor:
        """The whole buffer given to :meth:`begin` is written: wait for the sum and return it (in the buffer)."""
        begun, self._begun = self._begun, None
        if begun is None or begun[0] != step:
            raise ValueError(f"finish(step={step}) without begin(step={step}, flat)")
        flat = begun[1]
        if self._ring:
            stream, self._ring_stream = self._ring_stream, None
            self._all_reduce(step, flat, stream)
            return self.result(step)
        if self.plan.balanced is None:
            return self.reduce(step, flat, in_place=True)
        self._events.put(LocalFilled(step))
        out = self.result(step)
        if out.data_ptr() != flat.data_ptr():  # reduced without us, in a buffer of the protocol's
            flat.copy_(out)
        return flat

    def _all_reduce(self, step: int, flat: torch.Tensor, stream: RingStream | None = None) -> None:
        """The ring's sum of ``step`` into ``flat`` (the rest of ``stream``'s segments, when begun with them),
        published as the protocol publishes its results."""
        try:
            if stream is None:
                dist.all_reduce(flat, group=self.group)
            else:
                stream.finish()
        except RuntimeError as err:  # a peer died or the group broke: with s=0 every rank is needed
            error = CodedReduceError(f"the all-reduce of step {step} failed ({err}); with stragglers=0 every rank "
                                     "is needed")
            self._board.fail(error)
            raise error from err
        self._board.publish(step, flat)

    def _check_step(self, step: int, what: str) -> None:
        if step != self.next_step:
            raise ValueError(f"{what}(step={step}) out of order: the next step to apply is {self.next_step}")
        if self._begun is not None:
            raise ValueError(f"{what}(step={step}) while step {self._begun[0]} is begun; finish it first")

    def result(self, step: int, timeout: float | None = None) -> torch.Tensor:
        """Block until ``step`` is reduced and return its (flat, CPU) result; consumes it."""
        return self._board.take(step, self._protocol.starved_result, timeout)

    @property
    def error(self) -> CodedReduceError | None:
        return self._board.error

    @property
    def dead(self) -> dict[int, str]:
        """Peers this rank saw die (rank -> why); see ``agreed_dead`` for what every survivor agrees on."""
        return dict(self._protocol.dead)

    @property
    def dead_since(self) -> dict[int, int]:
        """Dead ranks every survivor has been told about: rank -> first step whose result came after the news."""
        with self._board.cond:
            return dict(self._protocol.dead_since)

    def agreed_dead(self, step: int) -> set[int]:
        """Ranks known dead by every surviving rank once it has applied the result of ``step``.

        The root announces a death down the tree before the next result it sends, so every survivor that
        has applied the same steps returns the same set (unlike ``dead``, which is what this rank saw).
        """
        with self._board.cond:
            return {r for r, s in self._protocol.dead_since.items() if s <= step}

    def all_gather_object(self, obj) -> tuple[dict, frozenset[int]]:
        """A collective over the tree that waits only for live ranks: ``({rank: obj} of every survivor,
        ranks known dead)``, the same on every survivor. Every rank must call it in the same order."""
        return self._control.all_gather_object(obj)

    # ------------------------------------------------------------------ notes and announcements (notices.py)
    @property
    def announces_in_order(self) -> bool:
        """Whether ``announce`` reaches every rank before the results it must precede (not over gloo's ring)."""
        return not self._ring

    def post_note(self, obj) -> None:
        """Send ``obj`` to rank 0 without waiting for anyone (rank 0 reads it with ``take_notes``)."""
        self._raise_if_failed()
        self._notices.post(obj)

    def take_notes(self) -> list[tuple[int, object]]:
        """Rank 0: the ``(rank, obj)`` notes that arrived since the last call."""
        return self._notices.take_notes()

    def announce(self, obj, lead: int = 1) -> int:
        """Rank 0: send ``obj`` to every rank, to take effect at the returned step, ``lead`` steps past the first
        result rank 0 has not sent yet: every rank has it before it can begin that step. Waits for no peer."""
        if not self.announces_in_order:
            raise ValueError("announce() needs the results on the reducer's links; gloo's ring all-reduce (balanced "
                             "layout, stragglers=0) carries them outside: use all_gather_object there")
        self._raise_if_failed()
        return self._notices.announce(obj, lead)

    def announced(self) -> list[tuple[int, object]]:
        """Every ``(effective step, obj)`` rank 0 announced so far, in order."""
        return self._notices.announced()

    def abort(self, reason: str) -> None:
        """Stop every rank: this rank failed (e.g. an exception in training) and the plan may need it."""
        self._events.put(Abort(reason))

    @property
    def backlog_steps(self) -> int:
        """Reduced steps waiting to be applied by the caller (a lagging rank's lag)."""
        return self._board.backlog_steps

    @property
    def queued_frames(self) -> int:
        """Frames waiting in this rank's send queues (bounded per link)."""
        return sum(link.queued for link in self._links())

    @property
    def drained(self) -> int:
        """Late messages discarded (a step, or a chunk, was reduced without them)."""
        return self._protocol.drained

    @property
    def max_buffered(self) -> int:
        """Most peers' messages (tree) or chunks (balanced) held at once: the bounded-memory check."""
        return self._protocol.max_buffered

    @property
    def finished_stats(self):
        """Statistics of finished steps (a bounded deque of ``StepStats``)."""
        return self._protocol.finished_stats

    @property
    def tracks_steps(self) -> bool:
        """Whether ``stats`` has a record of every step (not when gloo's all-reduce sums: stragglers=0, balanced)."""
        return not self._ring

    def stats(self) -> list[StepStats]:
        """Every step's statistics, finished ones and those still in flight, by step."""
        return list(self._protocol.finished_stats) + sorted(self._protocol.stats.values(), key=lambda s: s.step)

    def close(self) -> None:
        """Deliver what is queued (a lagging peer still gets every result), say goodbye, stop threads.

        Waits at most about ``timeout`` seconds, never forever.
        """
        if self._thread.is_alive():
            self._events.put(Close())
            self._thread.join(self.timeout)
        self._board.close()
        deadline = time.monotonic() + self.timeout
        for link in self._links():
            link.close(max(0.1, deadline - time.monotonic()))
        self._release_groups()

    def wait_for_peers(self, timeout: float) -> list[int]:
        """After ``close``: wait (at most ``timeout`` s in all) for every neighbour to close its side too.

        A process that exits with a gloo receive still posted aborts, and a neighbour may still be catching
        up; returns the neighbours that did not close in time.
        """
        deadline = time.monotonic() + timeout
        late = [link.peer for link in self._links() if not link.wait_peer_closed(deadline - time.monotonic())]
        self._release_groups()
        return late

    def _release_groups(self) -> None:
        """The links' process groups once they closed in order, and the reducer's own group once all did."""
        released = [link.release() for link in self._links()]
        if self._owns_group and all(released):
            self._owns_group = False
            dist.destroy_process_group(self.group)
            self.group = None  # gloo stops a group's threads when its last reference goes

    # ------------------------------------------------------------------ protocol thread
    def _run(self) -> None:
        protocol = self._protocol
        while True:
            event = self._events.get()
            try:
                if isinstance(event, Close):
                    for link in self._links():  # queued after every pending result: lagging peers get them
                        link.stop_flow_control()
                        link.send(Header(Kind.BYE, 0, 0, None, self.rank))
                    return
                if self._board.error is not None:
                    continue  # failed: drain events until closed
                if isinstance(event, LocalReady):
                    protocol.on_local(event.step, event.flat, event.when, event.in_place, event.partial)
                elif isinstance(event, LocalFilled):
                    protocol.on_filled(event.step, event.lo, event.hi)
                elif isinstance(event, FrameArrived):
                    self._on_frame(event.src, event.header, event.payload)
                elif isinstance(event, ControlValue):
                    self._control.on_local(event.seq, event.value)
                elif isinstance(event, Note):
                    self._notices.on_note(event.value)
                elif isinstance(event, Announcement):
                    self._notices.on_announcement(event.value, event.lead)
                elif isinstance(event, PeerDead):
                    protocol.on_dead(event.peer, event.why)
                elif isinstance(event, BadFrame):
                    protocol.fail(f"rank {self.rank}: {event.why}", culprit=event.peer)
                elif isinstance(event, Abort):
                    protocol.fail(f"CodedReduce stopped: rank {self.rank} aborted ({event.reason})", culprit=self.rank)
                protocol.advance()
                self._control.advance()
            except FrameError as err:
                protocol.fail(f"rank {self.rank}: {err}", culprit=getattr(event, "src", -1))
            except Exception as err:  # pragma: no cover - a bug must surface, not hang
                protocol.fail(f"rank {self.rank}: internal error in the reduce protocol: {err!r}", culprit=self.rank)
            finally:
                if isinstance(event, FrameArrived) and event.done is not None:
                    event.done()
                event = None  # its tensors belong to a step: do not keep them while waiting for the next event

    def _on_frame(self, src: int, header: Header, payload: torch.Tensor | None) -> None:
        protocol = self._protocol
        if header.kind == Kind.HEARTBEAT:
            if header.extra >= 0:  # a heartbeat that carries news: rank ``extra`` died
                protocol.on_death_notice(src, header.extra)
        elif header.kind == Kind.BYE:
            protocol.on_bye(src)
        elif header.kind == Kind.ABORT:
            who = "a rank" if header.extra < 0 else f"rank {header.extra}"
            protocol.fail(f"CodedReduce stopped: {who} failed (reported to rank {self.rank} via rank {src})",
                          culprit=header.extra, forward_from=src)
        elif header.kind in (Kind.CTRL_UP, Kind.CTRL_DOWN):
            self._control.on_frame(src, header, payload)
        elif header.kind in (Kind.NOTE, Kind.ANNOUNCE):
            self._notices.on_frame(src, header, payload)
        else:
            protocol.on_data_frame(src, header, payload)

    # ------------------------------------------------------------------ helpers
    def _raise_if_failed(self) -> None:
        if self._board.error is not None:
            raise self._board.error

    def _links(self) -> list[Link]:
        return list(self._protocol.links.values())

    def _check_fingerprints(self) -> None:
        mine = torch.tensor([self._fp], dtype=torch.int64)
        every = [torch.zeros(1, dtype=torch.int64) for _ in range(self.plan.world_size)]
        dist.all_gather(every, mine, group=self.group)
        odd = [r for r, fp in enumerate(every) if int(fp) != self._fp]
        if odd:
            raise CodedReduceError(
                f"ranks {odd} built a different CodedReduce plan than rank {self.rank} ({self.plan!r}); "
                "every rank must use the same world_size, branching, stragglers, code and seed")
