"""``hvd.DistributedSampler``: torch's ``DistributedSampler`` signature, CodedReduce's data allocation.

Under Horovod (or DDP) with ``DistributedSampler(num_replicas=W)`` and ``DataLoader(batch_size=b)``, step
``t``'s global batch is the block ``order[t*W*b : (t+1)*W*b]`` of the epoch's index list (``W*m`` at a short
last step, ``m`` per rank). Here that block is cut into ``W`` *units* of ``b`` (or ``m``) samples, and the
plan allocates units as if the global batch had ``W`` samples (``plan.allocation(W)``): this rank yields
the units it computes, one after the other, with the code weight of each.

A rank's ``DataLoader(batch_size=b)`` therefore cuts its stream into *pieces* that are exactly one unit
each (a short last step's units are cut into pieces of up to ``b``), and each piece's mean loss has the
gradient ``mean_u``. ``DistributedOptimizer`` adds ``weight * mean_u`` of every piece into the step's
message (:meth:`DistributedSampler.pieces` tells it how much each piece weighs and where a step ends),
the reduce decodes ``sum_u mean_u``, and dividing by ``W`` gives Horovod's average of the ranks' means:
the same global batch, the same update.

A rank computes several units per step (the redundancy), so its loader has several batches per step, and
only the ``optimizer.step()`` that ends a step updates the parameters. The loader's ``batch_size`` must be
the sampler's ``batch_size``.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional, Sized

from torch.utils.data import Sampler

from ..plan import CodedReducePlan
from ..plan.plan import check_int
from ..sampler import ddp_epoch_indices, ddp_num_samples
from .feed import StepPiece
from .runtime import current


class DistributedSampler(Sampler[int]):
    """Args (as ``torch.utils.data.distributed.DistributedSampler``'s, plus ``batch_size``):
        dataset: the training dataset (only its length is used).
        num_replicas, rank: default ``hvd.size()`` / ``hvd.rank()``; other values are refused.
        shuffle, seed, drop_last: as torch's (the epoch's index list is exactly the one torch's draws).
        batch_size: the training ``DataLoader``'s ``batch_size``: where a step ends in this rank's stream.
        plan: the plan to allocate by (default: the one ``hvd.init`` built).
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, *, batch_size: Optional[int] = None,
                 plan: Optional[CodedReducePlan] = None) -> None:
        if batch_size is None:
            raise TypeError("hvd.DistributedSampler(dataset, ..., batch_size=b) needs the training DataLoader's "
                            "batch_size: each rank computes whole batches of several ranks, and a step ends after "
                            "its last one")
        self.batch_size = check_int("batch_size", batch_size, 1, "pass the DataLoader's batch_size")
        self._runtime = current() if plan is None else None
        self.plan = plan if plan is not None else self._runtime.plan
        world = self.plan.world_size
        if num_replicas is not None and num_replicas != world:
            raise ValueError(f"num_replicas={num_replicas}, but the coded allocation is for all {world} ranks; leave "
                             "num_replicas out (or pass hvd.size())")
        if rank is None:
            if self._runtime is None:
                raise ValueError("pass rank= together with plan=")
            rank = self._runtime.info.rank
        self.rank = check_int("rank", rank, 0, "use hvd.rank()")
        if self.rank >= world:
            raise ValueError(f"rank must be < {world}, got {rank}; use hvd.rank()")
        self.dataset_len = check_int("len(dataset)", len(dataset), 1, "the dataset is empty")
        self.shuffle, self.seed, self.drop_last = bool(shuffle), seed, bool(drop_last)
        self.epoch = 0
        self.units: list[tuple[int, float]] = [(u, sh.weight) for sh in self.plan.allocation(world)[self.rank]
                                               for u in range(sh.start, sh.stop)]
        self.per_rank = ddp_num_samples(self.dataset_len, world, self.drop_last)  # m under torch's sampler
        self.full_steps, self.tail = divmod(self.per_rank, self.batch_size)
        if self.tail:
            mixed = [r for r, shards in enumerate(self.plan.allocation(world)) if len({sh.weight for sh in shards}) > 1]
            if mixed:
                raise ValueError(
                    f"the last step of an epoch is short ({self.per_rank} samples per rank, not a multiple of "
                    f"batch_size={self.batch_size}), and this plan's code weighs the units of ranks {mixed} "
                    "differently, so their short batches cannot be cut into pieces of one weight. Use a batch_size "
                    f"that divides {self.per_rank}, a dataset whose length per rank it divides, or a plan whose "
                    "codes are all fractional repetition (CODEDREDUCE_LAYOUT=balanced, or a branching that "
                    "stragglers+1 divides)")
        self.steps = self.full_steps + (1 if self.tail else 0)  # steps per epoch, the same on every rank

    # ---------------------------------------------------------------- what the optimizer needs
    def step_size(self, step: int) -> int:
        """Samples per unit (per DDP rank) at ``step``: ``batch_size`` except a short last step."""
        return self.batch_size if step < self.full_steps else self.tail

    def pieces(self) -> list[StepPiece]:
        """This rank's loader batches of one epoch, in order (the same every epoch)."""
        out: list[StepPiece] = []
        for step in range(self.steps):
            m = self.step_size(step)
            if m == self.batch_size:
                out.extend(StepPiece(step, w, False) for _, w in self.units)
            else:  # a short last step: its units (one weight, checked) cut into pieces of up to batch_size
                total, w = m * len(self.units), self.units[0][1]
                for start in range(0, total, self.batch_size):
                    out.append(StepPiece(step, w * min(self.batch_size, total - start) / m, False))
            out[-1] = StepPiece(step, out[-1].scale, True)
        return out

    # ---------------------------------------------------------------- torch's Sampler
    def __len__(self) -> int:
        return len(self.units) * self.per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, 0, "pass the current epoch number")

    def __iter__(self) -> Iterator[int]:
        feed = self._runtime.feed if self._runtime is not None else None
        if feed is not None:
            feed.restart()
        world = self.plan.world_size
        order = ddp_epoch_indices(self.dataset_len, world, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                                  drop_last=self.drop_last)
        pieces: list[list[StepPiece]] = [[] for _ in range(self.steps)]
        for piece in self.pieces():
            pieces[piece.step].append(piece)
        for step in range(self.steps):
            if feed is not None and feed.skip_step():  # behind: the others reduced this step, its result is applied
                continue
            m, block = self.step_size(step), step * world * self.batch_size
            indices = [i for unit, _ in self.units for i in order[block + unit * m: block + (unit + 1) * m]]
            start = 0
            for piece in pieces[step]:
                if feed is not None:
                    feed.put(piece)
                stop = min(len(indices), start + self.batch_size)
                yield from indices[start:stop]
                start = stop

    def __repr__(self) -> str:
        return (f"hvd.DistributedSampler(rank={self.rank}, units={[u for u, _ in self.units]}, "
                f"batch_size={self.batch_size}, steps={self.steps}, redundancy={len(self.units)})")

