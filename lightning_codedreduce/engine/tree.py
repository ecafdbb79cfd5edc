"""The paper's coded tree (``layout="tree"``): up the tree decoding the first decodable children, down with the sum.

1. A rank sums, with the decoder's coefficients, the *first decodable* set of its own gradient and its
   children's messages (``plan.decoder``), in slot order (reproducible bits), and sends one message to its
   parent. An uncoded own share is always part of that set; a coded one (``coded_self``) is one slot like
   a child's, so a rank whose compute is late still forwards once its children decode without it.
2. The root's sum is the result; every parent sends it down to its live children.
3. A frame for a step this rank already finished is late: drained. A rank that falls behind finds the
   results it missed already published (the caller applies them without computing).
4. A tolerated death is reported up to the root, which announces it down the tree in order with the
   results: ``dead_since[r]`` is the first step whose result every survivor received after the news.
"""
from __future__ import annotations

import collections
import time

import torch

from .frames import FrameError, Header, Kind
from .protocol import Protocol


class TreeProtocol(Protocol):
    """One rank's side of the tree reduce; runs on the protocol thread."""

    def __init__(self, *args, start_step: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        parent = self.plan.parent(self.rank)
        self.parent = None if parent is None else self.links[parent]
        self.children = {c: self.links[c] for c in self.plan.children(self.rank)}
        self.decode_step = start_step  # step whose upward message is being assembled
        self.next_down = start_step  # next DOWN frame expected from the parent
        self.local: dict[int, torch.Tensor] = {}
        self.msgs: dict[int, dict[int, torch.Tensor]] = collections.defaultdict(dict)
        self.reported_up: set[int] = set()  # deaths already reported to the parent

    def on_local(self, step: int, flat: torch.Tensor, when: float, in_place: bool = False,
                 partial: bool = False) -> None:  # (partial: never; the reducer hands the tree the whole gradient)
        if step < self.decode_step:
            return  # this step was reduced without us: nothing to do
        self.local[step] = flat
        self.stat(step).local_ready = when

    def on_data_frame(self, src: int, header: Header, payload: torch.Tensor | None) -> None:
        if header.kind == Kind.DOWN:
            if self.parent is None or src != self.parent.peer:
                raise FrameError(f"DOWN frame from rank {src}, which is not this rank's parent")
            if header.step != self.next_down:
                raise FrameError(f"DOWN frame for step {header.step} from rank {src}; expected step {self.next_down}")
            self.next_down += 1
            self._publish(header.step, payload)
            return
        if header.kind != Kind.UP:
            raise FrameError(f"{header.kind.name} frame from rank {src} in the tree layout")
        if src not in self.children:
            raise FrameError(f"UP frame from rank {src}, which is not a child of rank {self.rank}")
        if header.step > self.decode_step:
            raise FrameError(f"UP frame for step {header.step} from rank {src} while rank {self.rank} "
                             f"is at step {self.decode_step}")
        self.note_arrival(header.step, src)
        if header.step < self.decode_step:
            self.drained += 1  # late: the step was decoded without it
            return
        self.stat(header.step).arrivals[src] = time.monotonic()
        self.msgs[header.step][src] = payload
        self.max_buffered = max(self.max_buffered, sum(len(m) for m in self.msgs.values()))

    def advance(self) -> None:
        step = self.decode_step
        local = self.local.get(step)
        arrived = dict(self.msgs.get(step, {}))
        if local is not None:
            arrived[self.rank] = local
        if not arrived:
            return
        coefs = self.plan.decoder(self.rank, arrived.keys())
        if coefs is None:
            self._check_still_decodable(step, arrived.keys())
            return
        own = coefs.pop(self.rank, None)
        if own is None:  # decoded without this rank's own compute (coded_self): a fresh sum
            first = arrived[min(coefs)]
            out = torch.zeros(first.numel(), dtype=first.dtype)
        else:  # the caller's private flat copy: accumulate in place
            out = local if own == 1.0 else local.mul_(own)
        for child, coef in sorted(coefs.items()):  # slot (group) order, not arrival order: reproducible bits
            msg = arrived[child]
            if msg.numel() != out.numel() or msg.dtype != out.dtype:
                raise FrameError(f"rank {child} sent {msg.numel()} {msg.dtype} values for step {step}; "
                                 f"expected {out.numel()} {out.dtype} (do all ranks have the same model?)")
            if coef == 1.0:
                out += msg
            else:
                out.add_(msg, alpha=coef)
        stat = self.stat(step)
        stat.used = tuple(sorted(coefs))
        stat.sent = time.monotonic()
        self.decode_step = step + 1
        self._purge()
        if self.parent is None:
            self._publish(step, out)
        else:
            self.parent.send(Header(Kind.UP, step, out.numel(), out.dtype, self.rank), out)

    def result_frontier(self) -> int:
        return self.decode_step  # the root publishes (and sends down) every step below it

    def _check_still_decodable(self, step: int, arrived) -> None:
        """Fail (instead of waiting forever) when children that closed are needed for ``step``."""
        gone = [c for c in self.children if c in self.finished and c not in arrived]
        if not gone:
            return
        could_come = [self.rank, *(c for c in self.children if not self.gone(c))]
        if self.plan.decoder(self.rank, [*arrived, *could_come]) is None:
            self.fail(f"CodedReduce stopped: rank(s) {gone} closed before sending step {step}, which "
                      f"rank {self.rank} cannot reduce without them", culprit=gone[0])

    def _publish(self, step: int, result: torch.Tensor) -> None:
        self.send_down(Header(Kind.DOWN, step, result.numel(), result.dtype, self.rank), result)
        self.stat(step).result = time.monotonic()
        self.board.publish(step, result)
        self.decode_step = max(self.decode_step, step + 1)
        self._purge()

    def _purge(self) -> None:
        for step in [s for s in self.local if s < self.decode_step]:
            del self.local[step]
        for step in [s for s in self.msgs if s < self.decode_step]:
            del self.msgs[step]
        self.retire_stats(self.decode_step - 1)

    # ------------------------------------------------------------------ deaths
    def on_dead(self, peer: int, why: str) -> None:
        if peer in self.dead or peer in self.finished:
            return
        self.dead[peer] = why
        if self.parent is not None and peer == self.parent.peer:
            self.fail(f"CodedReduce stopped: parent rank {peer} of rank {self.rank} died ({why})", culprit=peer)
            return
        alive = [self.rank, *(c for c in self.children if c not in self.dead)]
        if self.plan.decoder(self.rank, alive) is None:
            self.fail(f"CodedReduce stopped: rank {peer} died ({why}) and rank {self.rank} cannot decode "
                      f"without it (tolerance {self.plan.tolerance(self.rank)})", culprit=peer)
            return
        self._spread_death(peer)

    # Death notices travel as heartbeats whose ``extra`` names the dead rank: up the tree to the root,
    # then down from the root to every survivor, queued on each link before the next DOWN result, so
    # that every survivor learns of the death at the same step.
    def _spread_death(self, peer: int) -> None:
        if self.parent is None:  # the root: the news goes out before the next result it publishes
            self._announce_down(peer, since=self.decode_step)
        elif peer not in self.reported_up:
            self.reported_up.add(peer)
            self.parent.send(Header(Kind.HEARTBEAT, 0, 0, None, self.rank, extra=peer))

    def on_death_notice(self, src: int, peer: int) -> None:
        if not 0 <= peer < self.plan.world_size or peer == self.rank:
            raise FrameError(f"rank {src} reported the death of rank {peer}, which is not a peer of rank {self.rank}")
        if peer not in self.dead and peer not in self.links:
            self.dead[peer] = f"reported by rank {src}"  # neighbours' deaths are for their links to find
        if src in self.children or self.parent is None:
            self._spread_death(peer)  # on its way up (or arrived at the root)
            return
        self._announce_down(peer, since=self.next_down)  # from the parent: the root's announcement

    def _announce_down(self, peer: int, since: int) -> None:
        """Record that ``peer`` died as of step ``since`` and pass the news on to the children, ahead of that step's result."""
        if peer in self.dead_since:
            return
        with self.board.cond:
            self.dead_since[peer] = since
        self.send_down(Header(Kind.HEARTBEAT, 0, 0, None, self.rank, extra=peer), None)
