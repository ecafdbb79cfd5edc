"""Point-to-point links over ``torch.distributed``: one receiver and one sender thread per link.

Blocking waits in threads are used because gloo receive handles do not report completion by
polling. A sender thread per link means a stopped or slow peer blocks only its own link; its
queue is bounded (back-pressure instead of unbounded memory). An idle sender sends heartbeats, so
a receiver that hears nothing for ``timeout`` seconds knows its peer is dead or stopped. Every
failure is reported as an event, never raised inside a thread.

A frame is a header, then (for data) a payload. gloo pays a fixed latency per message (about 0.5 ms on
loopback), so the sender posts both before waiting for either, and the receiver posts the next header's
receive together with each payload's: a frame costs one such latency, not two.

Every link has a 2-rank process group of its own (see ``link_groups``: a gloo receive timeout closes
every pair of its group). Transports: ``"gloo"`` (CPU tensors; the default) and ``"nccl"``: each
direction of a link has its own 2-rank NCCL communicator (a receive pending on a communicator's
stream would block later operations on it, i.e. the link's own sends), frames are copied to the GPU
to be sent and back to host memory when received; completion is polled, so a silent peer is still
detected after ``timeout``.
"""
from __future__ import annotations

import datetime
import queue
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

from .events import BadFrame, FrameArrived, PeerDead
from .frames import HEADER_LEN, FrameError, Header, Kind, decode_header

TAG = 0xC0DE
TRANSPORTS = ("gloo", "nccl")


def check_transport(transport: str) -> None:
    """Raise a clear error for an unknown transport, or for ``"nccl"`` where CUDA or NCCL is missing."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {', '.join(map(repr, TRANSPORTS))} "
                         "('gloo' works everywhere and stages CUDA tensors through host memory)")
    if transport == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("transport='nccl' needs CUDA GPUs, but torch.cuda.is_available() is False on this "
                               "machine; use transport='gloo' (CUDA tensors are staged through host memory)")
        if not (dist.is_available() and dist.is_nccl_available()):
            raise RuntimeError("transport='nccl' needs a torch build with NCCL (torch.distributed.is_nccl_available() "
                               "is False); use transport='gloo'")


def link_groups(plan, rank: int, group, timeout: float, transport: str = "gloo") -> dict:
    """Create the process groups of every link of the plan (``plan.links()``), collectively (every rank,
    the same order).

    Every link gets communicators of its own. gloo, when a receive times out, closes *every* pair of its
    context ("Application timeout caused pair closure"): on one shared group, a peer silent for longer
    than the timeout would cut this rank's healthy links too. NCCL: one group per direction (a receive
    pending on a communicator's stream would block that communicator's sends).

    Returns ``{peer: (send_group, recv_group, peer_global_rank)}`` for this rank's links.
    """
    def global_rank(r: int) -> int:
        return r if group is None else dist.get_global_rank(group, r)

    backend = "nccl" if transport == "nccl" else "gloo"
    pg_timeout = datetime.timedelta(seconds=max(600.0, 20 * timeout))  # the links do their own timeouts
    out: dict[int, tuple] = {}
    for parent, child in plan.links():  # the same order on every rank: new_group is collective
        ranks = sorted((global_rank(parent), global_rank(child)))
        down = dist.new_group(ranks, backend=backend, timeout=pg_timeout)
        up = dist.new_group(ranks, backend=backend, timeout=pg_timeout) if backend == "nccl" else down
        if rank == parent:
            out[child] = (down, up, global_rank(child))
        elif rank == child:
            out[parent] = (up, down, global_rank(parent))
    return out


class Link:
    """A bidirectional link to one neighbour rank."""

    def __init__(self, rank: int, peer: int, fingerprint: int, events: queue.Queue, timeout: float,
                 heartbeat: float, max_queued: int = 64, group=None, tag: int = TAG,
                 before_receive: Callable[[], None] | None = None, recv_group=None,
                 device: torch.device | None = None, peer_global: int | None = None,
                 max_unprocessed: int | None = None,
                 landing: Callable[[Header], torch.Tensor | None] | None = None):
        self.rank = rank
        self.peer = peer  # the peer's rank in the reducer's group (frames name it)
        self.peer_global = peer if peer_global is None else peer_global  # what torch.distributed addresses
        self.device = device  # None: gloo, CPU tensors; a CUDA device: NCCL (send_group/recv_group)
        self.recv_group = group if recv_group is None else recv_group
        self.heartbeat = heartbeat
        self.before_receive = before_receive
        self.fingerprint = fingerprint
        self.events = events
        self.timeout = datetime.timedelta(seconds=timeout)
        self.group = group
        self.tag = tag
        self.outbox: queue.Queue = queue.Queue(maxsize=max_queued)
        self.closed = threading.Event()
        # flow control: at most this many received frames wait for the owner (``FrameArrived.done``)
        # before the receiver stops reading -- memory for a peer's messages stays a few frames
        self._credit = None if max_unprocessed is None else threading.Semaphore(max_unprocessed)
        self.landing = landing  # where a frame's payload may land directly (gloo; None: a fresh buffer)
        self._in_order = {"sent": False, "received": False}  # BYE both ways: nothing posted, the groups may go
        self._released = False
        self._rx = threading.Thread(target=self._receive_loop, name=f"codedreduce-rx-{peer}", daemon=True)
        self._tx = threading.Thread(target=self._send_loop, name=f"codedreduce-tx-{peer}", daemon=True)

    def start(self) -> None:
        self._rx.start()
        self._tx.start()

    def send(self, header: Header, payload: torch.Tensor | None = None, block: bool = True) -> bool:
        """Queue a frame; ``False`` if the link is closed (or full and ``block`` is false)."""
        while not self.closed.is_set():  # bounded queue: wait for room, but never past the link's death
            try:
                self.outbox.put((header, payload), timeout=0.2 if block else 0)
                return True
            except queue.Full:
                if not block:
                    return False
        return False

    @property
    def queued(self) -> int:
        return self.outbox.qsize()

    def _send_loop(self) -> None:
        if self.device is not None:
            torch.cuda.set_device(self.device)  # the current device is per thread
        beat = Header(Kind.HEARTBEAT, 0, 0, None, self.rank)
        while True:
            try:
                header, payload = self.outbox.get(timeout=self.heartbeat)
            except queue.Empty:  # idle: tell the peer we are alive (compute may take long)
                header, payload = beat, None
            if header is None:
                return
            try:  # no timeout on sends: a dead peer fails them, a stopped one is caught by its receiver
                self._send_frame(header.encode(self.fingerprint), payload)
                payload = None  # a chunk is a view of its step's whole buffer: keep nothing while idle
            except Exception as err:  # peer died or link broke: report, stop using the link
                if not self.closed.is_set():
                    self.events.put(PeerDead(self.peer, self._why(err, "send failed: ")))
                self.closed.set()
                self._abort()
                return
            if header.kind == Kind.BYE:
                self._in_order["sent"] = True
                return

    def _receive_loop(self) -> None:
        if self.device is not None:
            torch.cuda.set_device(self.device)
        posted = None  # gloo: the next frame's header, received while the last payload was (one round trip less)
        while True:
            if self.before_receive is not None:
                self.before_receive()  # back-pressure: the owner may hold us while it is full
            credit = self._credit  # (stop_flow_control may drop it while we wait)
            while credit is not None and not credit.acquire(timeout=0.2):
                if self.closed.is_set():
                    return
                credit = self._credit
            try:
                if posted is not None:
                    raw, work = posted
                    posted = None
                    self._wait(work)
                else:
                    raw = self._receive(HEADER_LEN, torch.int64)
                header = decode_header(raw, self.fingerprint, self.peer)
                payload = into = None
                if header.numel:
                    into = self.landing(header) if self.landing is not None and self.device is None else None
                    if self.device is None:  # a data frame is never the last: post the next header's receive too
                        payload, work = self._post_receive(header.numel, header.dtype, into)
                        posted = self._post_receive(HEADER_LEN, torch.int64)
                        self._wait(work)
                    else:
                        payload = self._receive(header.numel, header.dtype, into)
            except FrameError as err:
                self.events.put(BadFrame(self.peer, str(err)))
                return
            except Exception as err:
                if not self.closed.is_set():
                    self.events.put(PeerDead(self.peer, self._why(err)))
                self.closed.set()  # nobody will read what we would send: unblock writers
                self._abort()
                return
            self.events.put(FrameArrived(self.peer, header, payload, None if self._credit is None else self._credit.release))
            payload = into = None  # views of a step's result: do not keep them while waiting for the next frame
            if header.kind == Kind.BYE:
                self._in_order["received"] = True
                return

    def _why(self, err: Exception, prefix: str = "") -> str:
        text = _short(err)
        if "Application timeout" in text or "Timed out waiting" in text or isinstance(err, TimeoutError):
            return f"silent for {self.timeout.total_seconds():g} s (stopped, hung or unreachable)"
        return prefix + text

    def _wait(self, work) -> None:
        work.wait(self.timeout)  # silence longer than the timeout (no heartbeat either) means dead

    def _send_frame(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        """Header and payload posted together (gloo), then both awaited: one round trip per frame, not two."""
        if self.device is None:
            works = [dist.isend(header, self.peer_global, group=self.group, tag=self.tag)]
            if payload is not None:
                works.append(dist.isend(payload, self.peer_global, group=self.group, tag=self.tag))
            for work in works:
                work.wait()
            return
        self._send(header)
        if payload is not None:
            self._send(payload)

    def _send(self, tensor: torch.Tensor) -> None:
        if self.device is None:
            dist.isend(tensor, self.peer_global, group=self.group, tag=self.tag).wait()
            return
        staged = tensor.to(self.device)
        self._poll(dist.isend(staged, self.peer_global, group=self.group), None)

    def _post_receive(self, numel: int, dtype: torch.dtype, into: torch.Tensor | None = None) -> tuple:
        """gloo: post a receive (into ``into`` when it fits); ``(buffer, work)``."""
        buf = into if into is not None and into.numel() == numel and into.dtype == dtype else \
            torch.empty(numel, dtype=dtype)
        return buf, dist.irecv(buf, self.peer_global, group=self.recv_group, tag=self.tag)

    def _receive(self, numel: int, dtype: torch.dtype, into: torch.Tensor | None = None) -> torch.Tensor:
        if self.device is None:
            buf, work = self._post_receive(numel, dtype, into)
            self._wait(work)
            return buf
        buf = torch.empty(numel, dtype=dtype, device=self.device)
        self._poll(dist.irecv(buf, self.peer_global, group=self.recv_group), self.timeout.total_seconds())
        return buf.cpu()

    def _poll(self, work, timeout: float | None) -> None:
        """NCCL: ``wait()`` only orders streams; poll completion instead (bounded for receives)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not work.is_completed():
            if self.closed.is_set() and timeout is None:
                raise RuntimeError("link closed")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no frame from rank {self.peer} for {timeout:.0f} s")
            time.sleep(0.0005)
        work.wait()  # raises the communicator's error, if any

    def close(self, join_timeout: float = 2.0) -> None:
        """Let the sender deliver what is queued (the owner queues BYE last), then stop both threads."""
        deadline = time.monotonic() + join_timeout
        self._tx.join(join_timeout)  # the sender returns after sending BYE
        # wait for the peer's BYE: leaving with a receive posted would abort the process in gloo
        self._rx.join(max(0.0, deadline - time.monotonic()))
        self.closed.set()
        if self.device is not None and (self._rx.is_alive() or self._tx.is_alive()):
            self._abort()

    def release(self) -> bool:
        """Destroy this link's process groups once it closed in order (BYE sent and received, both threads done);
        whether they are gone. Every link has groups of its own (``link_groups``) and gloo runs threads for each
        until it is destroyed: without this, every reducer a process opened (one per ``auto`` switch) kept them.
        A link that failed keeps its groups (a receive may still be posted; gloo aborts a process that leaves
        one behind)."""
        if not self._released and all(self._in_order.values()) and not (self._rx.is_alive() or self._tx.is_alive()):
            for group in {id(self.group): self.group, id(self.recv_group): self.recv_group}.values():
                if group is not None:  # never the default group
                    dist.destroy_process_group(group)
            self.group = self.recv_group = None  # gloo stops a group's threads when its last reference goes
            self._released = True
        return self._released

    def stop_flow_control(self) -> None:
        """The owner stops handling frames (closing): let the receiver read on, up to the peer's BYE."""
        credit, self._credit = self._credit, None
        if credit is not None:
            credit.release()  # wakes a receiver waiting for credit; it then finds none to wait for
            # (release(n) notifies n times: a large n took seconds per link)

    def wait_peer_closed(self, timeout: float) -> bool:
        """Wait (bounded) until the peer closed its side; ``False`` if it did not within ``timeout``."""
        self._rx.join(max(0.0, timeout))
        return not self._rx.is_alive()

    def _abort(self) -> None:
        """NCCL: an operation still pending with a dead or silent peer cannot be cancelled, and the process
        group's watchdog would tear the process down when it times out: abort this link's communicators."""
        if self.device is None:
            return
        for group in {id(self.group): self.group, id(self.recv_group): self.recv_group}.values():
            if group is None:  # never the default group
                continue
            try:
                group.abort()
            except Exception:  # best effort: already aborted, or an older torch
                try:
                    group._get_backend(torch.device("cuda")).abort()
                except Exception:
                    pass


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "]" in text and text.startswith("["):  # drop gloo's source-location prefix
        text = text.split("]", 1)[1].strip()
    return text.split(". This is typically")[0][:200]
