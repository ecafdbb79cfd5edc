"""Point-to-point links over ``torch.distributed`` (gloo): one receiver and one sender thread per link.

Blocking waits in threads are used because gloo receive handles do not report completion by
polling. A sender thread per link means a stopped or slow peer blocks only its own link; its
queue is bounded (back-pressure instead of unbounded memory). An idle sender sends heartbeats, so
a receiver that hears nothing for ``timeout`` seconds knows its peer is dead or stopped. Every
failure is reported as an event, never raised inside a thread.
"""
from __future__ import annotations

import datetime
import queue
import threading
from typing import Callable

import torch
import torch.distributed as dist

from .frames import HEADER_LEN, FrameError, Header, Kind, decode_header

TAG = 0xC0DE


class Link:
    """A bidirectional link to one neighbour rank."""

    def __init__(self, rank: int, peer: int, fingerprint: int, events: queue.Queue, timeout: float,
                 heartbeat: float, max_queued: int = 64, group=None, tag: int = TAG,
                 before_receive: Callable[[], None] | None = None):
        self.rank = rank
        self.peer = peer
        self.heartbeat = heartbeat
        self.before_receive = before_receive
        self.fingerprint = fingerprint
        self.events = events
        self.timeout = datetime.timedelta(seconds=timeout)
        self.group = group
        self.tag = tag
        self.outbox: queue.Queue = queue.Queue(maxsize=max_queued)
        self.closed = threading.Event()
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
        beat = Header(Kind.HEARTBEAT, 0, 0, None, self.rank)
        while True:
            try:
                header, payload = self.outbox.get(timeout=self.heartbeat)
            except queue.Empty:  # idle: tell the peer we are alive (compute may take long)
                header, payload = beat, None
            if header is None:
                return
            try:  # no timeout on sends: a dead peer fails them, a stopped one is caught by its receiver
                dist.isend(header.encode(self.fingerprint), self.peer, group=self.group, tag=self.tag).wait()
                if payload is not None:
                    dist.isend(payload, self.peer, group=self.group, tag=self.tag).wait()
            except Exception as err:  # peer died or link broke: report, stop using the link
                if not self.closed.is_set():
                    self.events.put(("dead", self.peer, f"send failed: {_short(err)}"))
                self.closed.set()
                return
            if header.kind == Kind.BYE:
                return

    def _receive_loop(self) -> None:
        while True:
            if self.before_receive is not None:
                self.before_receive()  # back-pressure: the owner may hold us while it is full
            raw = torch.empty(HEADER_LEN, dtype=torch.int64)
            try:
                self._wait(dist.irecv(raw, self.peer, group=self.group, tag=self.tag))
                header = decode_header(raw, self.fingerprint, self.peer)
                payload = None
                if header.numel:
                    payload = torch.empty(header.numel, dtype=header.dtype)
                    self._wait(dist.irecv(payload, self.peer, group=self.group, tag=self.tag))
            except FrameError as err:
                self.events.put(("bad", self.peer, str(err)))
                return
            except Exception as err:
                if not self.closed.is_set():
                    self.events.put(("dead", self.peer, _short(err)))
                self.closed.set()  # nobody will read what we would send: unblock writers
                return
            self.events.put(("frame", self.peer, header, payload))
            if header.kind == Kind.BYE:
                return

    def _wait(self, work) -> None:
        work.wait(self.timeout)  # silence longer than the timeout (no heartbeat either) means dead

    def close(self, join_timeout: float = 2.0) -> None:
        """Let the sender deliver what is queued (the owner queues BYE last), then stop both threads."""
        self._tx.join(join_timeout)  # the sender returns after sending BYE
        self.closed.set()
        self._rx.join(min(join_timeout, 1.0))


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "]" in text and text.startswith("["):  # drop gloo's source-location prefix
        text = text.split("]", 1)[1].strip()
    return text.split(". This is typically")[0][:200]
