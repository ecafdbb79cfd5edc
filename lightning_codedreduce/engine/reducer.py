"""``CodedReducer``: the straggler-tolerant coded tree all-reduce (CodedReduce) on torch.distributed.

Each step every rank hands in its local *weighted* gradient (see ``CodedReducePlan.shards``) and
gets back the same global sum. Upward, a rank adds to its local gradient the decoded messages of
the *first decodable* set of children and sends one message to its parent; the root's sum is sent
back down the tree. One protocol thread per process does the receiving, decoding and forwarding,
so a rank's children get results while it is still computing.

Protocol (no global barrier):

* a frame for a step this rank has already finished is a late message: drained and discarded;
* a rank that falls behind finds the results it missed already there: ``ready(step)`` tells the
  caller to apply them without computing (``next_step`` is the next step to apply);
* memory is bounded: at most two steps of children's messages, and unconsumed results up to
  ``max_backlog_bytes`` before the rank stops reading from its parent (back-pressure);
* a peer that dies (or is silent for ``timeout`` seconds -- idle links carry heartbeats) is
  recorded; if the plan still decodes without it, training goes on; otherwise every rank raises
  ``CodedReduceError`` naming it, within about ``timeout`` seconds;
* a tolerated death is reported up to the root, which announces it down the tree in order with the
  results: ``dead_since[r]`` is the first step whose result every surviving rank received after
  learning that rank ``r`` died, so all survivors agree on ``agreed_dead(step)`` after applying the
  same steps (a caller can then avoid collectives that would wait for the dead rank);
* control collectives (``all_gather_object``: barriers, broadcasts, metric reductions) travel the same
  tree and wait only for live ranks, so a death never blocks them (see ``collectives.py``).

Transports: ``"gloo"`` (default; CUDA tensors are staged through host memory) or ``"nccl"``: the frames
travel over NCCL, with two 2-rank communicators per tree link (one per direction: a receive pending on
a communicator's stream would block that communicator's sends), created collectively at start. The
protocol (decoding, accumulation) stays in host memory either way.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..plan import CodedReducePlan
from .collectives import TreeCollectives
from .frames import FrameError, Header, Kind, fingerprint_int
from .transport import TAG, Link, check_transport, link_groups


class CodedReduceError(RuntimeError):
    """The reduce cannot go on: a rank the plan cannot do without died, or the protocol was violated."""


@dataclass
class StepStats:
    """What one rank saw of one step (times from ``time.monotonic()``)."""

    step: int
    local_ready: float | None = None  # local gradient handed in (None: skipped, result came first)
    sent: float | None = None  # this rank's message left (root: result known)
    result: float | None = None  # result known here
    used: tuple[int, ...] = ()  # children whose messages were decoded
    arrivals: dict[int, float] = field(default_factory=dict)  # every child message, late ones too

    @property
    def waited(self) -> float:
        """Seconds this rank's message waited for children after its own gradient was ready."""
        if self.local_ready is None or self.sent is None:
            return 0.0
        return max(0.0, self.sent - self.local_ready)


class CodedReducer:
    """Coded tree all-reduce for one process. Create after ``torch.distributed`` is initialised.

    Args:
        plan: the plan every rank built identically (checked with a one-off all-gather).
        timeout: seconds of silence after which a peer counts as dead (heartbeats every
            ``timeout / 10`` keep busy but healthy peers alive).
        start_step: first step number (e.g. the global step after a resume).
        max_backlog_bytes: unconsumed results kept before back-pressure.
        group: process group (default: the world); its size must equal ``plan.world_size``. Every tree
            link gets a 2-rank process group of its own, created here collectively: every rank of the
            world must create its reducer at the same time.
        tag: point-to-point tag of this reducer's frames.
        transport: ``"gloo"`` (CPU; CUDA tensors are staged through host memory) or ``"nccl"`` (frames over
            NCCL, one pair of communicators per tree link). ``"nccl"`` needs CUDA and NCCL.
    """

    def __init__(self, plan: CodedReducePlan, *, timeout: float = 30.0, start_step: int = 0,
                 max_backlog_bytes: int = 512 << 20, group=None, tag: int = TAG, check_plan: bool = True,
                 transport: str = "gloo"):
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
        self.timeout = timeout
        self._fp = fingerprint_int(plan.fingerprint())
        if check_plan:
            self._check_fingerprints()
        self._events: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._error: CodedReduceError | None = None
        self._closing = False
        # protocol state (owned by the protocol thread)
        self._decode_step = start_step  # step whose upward message is being assembled
        self._next_down = start_step  # next DOWN frame expected from the parent
        self._local: dict[int, torch.Tensor] = {}
        self._msgs: dict[int, dict[int, torch.Tensor]] = collections.defaultdict(dict)
        self._stats: dict[int, StepStats] = {}
        self.finished_stats: collections.deque[StepStats] = collections.deque(maxlen=10_000)
        self.drained = 0  # late messages discarded
        self.max_buffered = 0  # most child messages held at once (bounded-memory check)
        self.dead: dict[int, str] = {}  # rank -> why, for peers that died but were tolerated
        self._dead_since: dict[int, int] = {}  # rank -> first step whose result carries the news (see agreed_dead)
        self._reported_up: set[int] = set()  # deaths already reported to the parent
        self._finished: set[int] = set()  # peers that closed in order (BYE)
        # results (shared with callers, under _cond)
        self._results: dict[int, torch.Tensor] = {}
        self._backlog = 0
        self._max_backlog = max_backlog_bytes
        self._next_step = start_step
        self._control = TreeCollectives(self)
        self.transport = transport
        parent = plan.parent(self.rank)
        hb = max(0.05, timeout / 10)
        links = link_groups(plan, self.rank, group, timeout, transport)
        device = torch.device("cuda", torch.cuda.current_device()) if transport == "nccl" else None

        def link(peer, **kw):
            send_group, recv_group, peer_global = links[peer]
            return Link(self.rank, peer, self._fp, self._events, timeout, hb, group=send_group, tag=tag,
                        recv_group=recv_group, device=device, peer_global=peer_global, **kw)

        self._parent = None if parent is None else link(parent, before_receive=self._room_for_results)
        self._children = {c: link(c) for c in plan.children(self.rank)}
        for link in self._links():
            link.start()
        self._thread = threading.Thread(target=self._run, name="codedreduce-protocol", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller API
    @property
    def next_step(self) -> int:
        """The next step whose result the caller has not consumed yet."""
        return self._next_step

    def ready(self, step: int) -> bool:
        """Whether ``step`` is already reduced (a lagging rank should apply it without computing)."""
        with self._cond:
            return step in self._results

    def reduce(self, step: int, local):
        """Hand in this rank's weighted gradient for ``step``; return the global sum (same on every rank).

        ``local`` is a tensor or a list of tensors (returned in the same structure, device and dtype).
        If ``step`` was already reduced without this rank, ``local`` is ignored.
        """
        tensors = [local] if isinstance(local, torch.Tensor) else list(local)
        if step != self._next_step:
            raise ValueError(f"reduce(step={step}) out of order: the next step to apply is {self._next_step}")
        self._raise_if_failed()
        # one private contiguous CPU copy (CUDA tensors are staged through host memory); the protocol
        # thread accumulates into it, so the caller's tensors are never modified
        flat = torch.cat([t.detach().reshape(-1).cpu() for t in tensors]) if len(tensors) > 1 \
            else tensors[0].detach().reshape(-1).to("cpu", copy=True)
        self._events.put(("local", step, flat, time.monotonic()))
        out = self.result(step)
        parts, offset = [], 0
        for t in tensors:
            parts.append(out[offset:offset + t.numel()].view_as(t).to(t.device, t.dtype))
            offset += t.numel()
        return parts[0] if isinstance(local, torch.Tensor) else parts

    def result(self, step: int, timeout: float | None = None) -> torch.Tensor:
        """Block until ``step`` is reduced and return its (flat, CPU) result; consumes it."""
        if step != self._next_step:
            raise ValueError(f"result(step={step}) out of order: the next step to apply is {self._next_step}")
        with self._cond:
            self._wait_until(lambda: step in self._results, f"step {step} was reduced", timeout)
            out = self._results.pop(step)
            self._backlog -= out.numel() * out.element_size()
            self._next_step = step + 1
            self._cond.notify_all()
        return out

    @property
    def error(self) -> CodedReduceError | None:
        return self._error

    @property
    def dead_since(self) -> dict[int, int]:
        """Dead ranks every survivor has been told about: rank -> first step whose result came after the news."""
        with self._cond:
            return dict(self._dead_since)

    def agreed_dead(self, step: int) -> set[int]:
        """Ranks known dead by every surviving rank once it has applied the result of ``step``.

        The root announces a death down the tree before the next result it sends, so every survivor that
        has applied the same steps returns the same set (unlike ``dead``, which is what this rank saw).
        """
        with self._cond:
            return {r for r, s in self._dead_since.items() if s <= step}

    def all_gather_object(self, obj) -> tuple[dict, frozenset[int]]:
        """A collective over the tree that waits only for live ranks: ``({rank: obj} of every survivor,
        ranks known dead)``, the same on every survivor. Every rank must call it in the same order."""
        return self._control.all_gather_object(obj)

    def abort(self, reason: str) -> None:
        """Stop every rank: this rank failed (e.g. an exception in training) and the plan may need it."""
        self._events.put(("abort", reason))

    @property
    def backlog_steps(self) -> int:
        """Reduced steps waiting to be applied by the caller (a lagging rank's lag)."""
        with self._cond:
            return len(self._results)

    @property
    def queued_frames(self) -> int:
        """Frames waiting in this rank's send queues (bounded per link)."""
        return sum(link.queued for link in self._links())

    def close(self) -> None:
        """Deliver what is queued (a lagging child still gets every result), say goodbye, stop threads.

        Waits at most about ``timeout`` seconds, never forever.
        """
        if self._thread.is_alive():
            self._events.put(("close",))
            self._thread.join(self.timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + self.timeout
        for link in self._links():
            link.close(max(0.1, deadline - time.monotonic()))

    def wait_for_peers(self, timeout: float) -> list[int]:
        """After ``close``: wait (at most ``timeout`` s in all) for every neighbour to close its side too.

        A process that exits with a gloo receive still posted aborts, and a neighbour may still be catching
        up; returns the neighbours that did not close in time.
        """
        deadline = time.monotonic() + timeout
        return [link.peer for link in self._links() if not link.wait_peer_closed(deadline - time.monotonic())]

    # ------------------------------------------------------------------ protocol thread
    def _run(self) -> None:
        while True:
            event = self._events.get()
            kind = event[0]
            try:
                if kind == "close":
                    for link in self._links():  # queued after every pending result: lagging children get them
                        link.send(Header(Kind.BYE, 0, 0, None, self.rank))
                    return
                if self._error is not None:
                    continue  # failed: drain events until closed
                if kind == "local":
                    self._on_local(*event[1:])
                elif kind == "frame":
                    self._on_frame(*event[1:])
                elif kind == "ctrl":
                    self._control.on_local(event[1], event[2])
                elif kind == "dead":
                    self._on_dead(event[1], event[2])
                elif kind == "bad":
                    self._fail(f"rank {self.rank}: {event[2]}", culprit=event[1])
                elif kind == "abort":
                    self._fail(f"CodedReduce stopped: rank {self.rank} aborted ({event[1]})", culprit=self.rank)
                self._try_decode()
                self._control.advance()
            except FrameError as err:
                self._fail(f"rank {self.rank}: {err}", culprit=event[1] if len(event) > 1 else -1)
            except Exception as err:  # pragma: no cover - a bug must surface, not hang
                self._fail(f"rank {self.rank}: internal error in the reduce protocol: {err!r}", culprit=self.rank)

    def _stat(self, step: int) -> StepStats:
        if step not in self._stats:
            self._stats[step] = StepStats(step)
        return self._stats[step]

    def _on_local(self, step: int, flat: torch.Tensor, when: float) -> None:
        if step < self._decode_step:
            return  # this step was reduced without us: nothing to do
        self._local[step] = flat
        self._stat(step).local_ready = when

    def _on_frame(self, src: int, header: Header, payload: torch.Tensor | None) -> None:
        if header.kind == Kind.HEARTBEAT:
            if header.extra >= 0:  # a heartbeat that carries news: rank ``extra`` died (see _spread_death)
                self._on_death_notice(src, header.extra)
            return
        if header.kind == Kind.BYE:
            self._finished.add(src)
            if src == self.plan.parent(self.rank):
                with self._cond:
                    self._cond.notify_all()  # a caller waiting for a result that will never come must learn it
            return
        if header.kind == Kind.ABORT:
            who = "a rank" if header.extra < 0 else f"rank {header.extra}"
            self._fail(f"CodedReduce stopped: {who} failed (reported to rank {self.rank} via rank {src})",
                       culprit=header.extra, forward_from=src)
            return
        if header.kind in (Kind.CTRL_UP, Kind.CTRL_DOWN):
            self._control.on_frame(src, header, payload)
            return
        if header.kind == Kind.DOWN:
            if src != self.plan.parent(self.rank):
                raise FrameError(f"DOWN frame from rank {src}, which is not this rank's parent")
            if header.step != self._next_down:
                raise FrameError(f"DOWN frame for step {header.step} from rank {src}; expected step {self._next_down}")
            self._next_down += 1
            self._publish(header.step, payload)
            return
        # UP from a child
        if src not in self._children:
            raise FrameError(f"UP frame from rank {src}, which is not a child of rank {self.rank}")
        if header.step > self._decode_step:
            raise FrameError(f"UP frame for step {header.step} from rank {src} while rank {self.rank} "
                             f"is at step {self._decode_step}")
        stat = self._stats.get(header.step)
        if stat is not None:
            stat.arrivals[src] = time.monotonic()
        if header.step < self._decode_step:
            self.drained += 1  # late: the step was decoded without it
            return
        self._stat(header.step).arrivals[src] = time.monotonic()
        self._msgs[header.step][src] = payload
        self.max_buffered = max(self.max_buffered, sum(len(m) for m in self._msgs.values()))

    def _try_decode(self) -> None:
        step = self._decode_step
        local = self._local.get(step)
        if local is None:
            return
        arrived = self._msgs.get(step, {})
        coefs = self.plan.decoder(self.rank, arrived.keys())
        if coefs is None:
            self._check_still_decodable(step, arrived.keys())
            return
        out = local  # our own flattened copy (see reduce): accumulate in place
        for child, coef in sorted(coefs.items()):  # slot (group) order, not arrival order: reproducible bits
            msg = arrived[child]
            if msg.numel() != out.numel() or msg.dtype != out.dtype:
                raise FrameError(f"rank {child} sent {msg.numel()} {msg.dtype} values for step {step}; "
                                 f"expected {out.numel()} {out.dtype} (do all ranks have the same model?)")
            if coef == 1.0:
                out += msg
            else:
                out.add_(msg, alpha=coef)
        stat = self._stat(step)
        stat.used = tuple(sorted(coefs))
        stat.sent = time.monotonic()
        self._decode_step = step + 1
        self._purge()
        if self._parent is None:
            self._publish(step, out)
        else:
            self._parent.send(Header(Kind.UP, step, out.numel(), out.dtype, self.rank), out)

    def _check_still_decodable(self, step: int, arrived) -> None:
        """Fail (instead of waiting forever) when children that closed are needed for ``step``."""
        gone = [c for c in self._children if c in self._finished and c not in arrived]
        if not gone:
            return
        could_come = [c for c in self._children if c not in self.dead and c not in self._finished]
        if self.plan.decoder(self.rank, [*arrived, *could_come]) is None:
            self._fail(f"CodedReduce stopped: rank(s) {gone} closed before sending step {step}, which "
                       f"rank {self.rank} cannot reduce without them", culprit=gone[0])

    def _publish(self, step: int, result: torch.Tensor) -> None:
        for link in self._children.values():
            if link.peer not in self.dead:
                link.send(Header(Kind.DOWN, step, result.numel(), result.dtype, self.rank), result)
        stat = self._stat(step)
        stat.result = time.monotonic()
        with self._cond:
            self._results[step] = result
            self._backlog += result.numel() * result.element_size()
            self._cond.notify_all()
        self._decode_step = max(self._decode_step, step + 1)
        self._purge()

    def _purge(self) -> None:
        for step in [s for s in self._local if s < self._decode_step]:
            del self._local[step]
        for step in [s for s in self._msgs if s < self._decode_step]:
            del self._msgs[step]
        for step in sorted(s for s in self._stats if s < self._decode_step - 1):
            stat = self._stats[step]
            if stat.result is not None:
                self.finished_stats.append(self._stats.pop(step))

    def _on_dead(self, peer: int, why: str) -> None:
        if peer in self.dead or peer in self._finished:
            return
        self.dead[peer] = why
        if peer == self.plan.parent(self.rank):
            self._fail(f"CodedReduce stopped: parent rank {peer} of rank {self.rank} died ({why})", culprit=peer)
            return
        alive = [c for c in self._children if c not in self.dead]
        if self.plan.decoder(self.rank, alive) is None:
            self._fail(f"CodedReduce stopped: rank {peer} died ({why}) and rank {self.rank} cannot decode "
                       f"without it (tolerance {self.plan.tolerance(self.rank)})", culprit=peer)
            return
        self._spread_death(peer)

    # Death notices travel as heartbeats whose ``extra`` names the dead rank (old peers ignore them):
    # up the tree to the root, then down from the root to every survivor, queued on each link before
    # the next DOWN result, so that every survivor learns of the death at the same step.
    def _spread_death(self, peer: int) -> None:
        if self._parent is None:  # the root: the news goes out before the next result it publishes
            self._announce_down(peer, since=self._decode_step)
        elif peer not in self._reported_up:
            self._reported_up.add(peer)
            self._parent.send(Header(Kind.HEARTBEAT, 0, 0, None, self.rank, extra=peer))

    def _on_death_notice(self, src: int, peer: int) -> None:
        if not 0 <= peer < self.plan.world_size or peer == self.rank:
            raise FrameError(f"rank {src} reported the death of rank {peer}, which is not a peer of rank {self.rank}")
        if peer not in self.dead and peer != self.plan.parent(self.rank) and peer not in self._children:
            self.dead[peer] = f"reported by rank {src}"  # neighbours' deaths are for their links to find
        if src in self._children or self._parent is None:
            self._spread_death(peer)  # on its way up (or arrived at the root)
            return
        self._announce_down(peer, since=self._next_down)  # from the parent: the root's announcement

    def _announce_down(self, peer: int, since: int) -> None:
        """Record that ``peer`` died as of step ``since`` and pass the news on to the children, ahead of that step's result."""
        if peer in self._dead_since:
            return
        with self._cond:
            self._dead_since[peer] = since
        for link in self._children.values():
            if link.peer not in self.dead:
                link.send(Header(Kind.HEARTBEAT, 0, 0, None, self.rank, extra=peer))

    def _fail(self, message: str, culprit: int, forward_from: int | None = None) -> None:
        if self._error is not None:
            return
        for link in self._links():
            if link.peer != forward_from and link.peer not in self.dead:
                link.send(Header(Kind.ABORT, 0, 0, None, self.rank, extra=culprit), block=False)
        with self._cond:
            self._error = CodedReduceError(message)
            self._cond.notify_all()

    # ------------------------------------------------------------------ helpers
    def _wait_until(self, done, what: str, timeout: float | None = None) -> None:
        """Hold ``_cond`` and wait until ``done()``; raise if the reduce failed, or if the parent closed
        (or ``timeout`` passed) before ``what``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self._raise_if_failed()
            parent = self.plan.parent(self.rank)
            if parent in self._finished:
                raise CodedReduceError(f"parent rank {parent} finished before {what} (rank {self.rank} asked for "
                                       "more than its peers?)")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"not done within {timeout} s: {what}")
            self._cond.wait(0.5)

    def _room_for_results(self) -> None:
        with self._cond:
            while self._backlog >= self._max_backlog and not self._closing and self._error is None:
                self._cond.wait(0.5)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _links(self) -> list[Link]:
        return ([self._parent] if self._parent else []) + list(self._children.values())

    def _check_fingerprints(self) -> None:
        mine = torch.tensor([self._fp], dtype=torch.int64)
        every = [torch.zeros(1, dtype=torch.int64) for _ in range(self.plan.world_size)]
        dist.all_gather(every, mine, group=self.group)
        odd = [r for r, fp in enumerate(every) if int(fp) != self._fp]
        if odd:
            raise CodedReduceError(
                f"ranks {odd} built a different CodedReduce plan than rank {self.rank} ({self.plan!r}); "
                "every rank must use the same world_size, branching, stragglers, code and seed")
