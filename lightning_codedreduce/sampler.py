"""Per-rank, per-step sample indices for a :class:`~lightning_codedreduce.plan.CodedReducePlan`.

Two ways to cut an epoch into global batches:

* **DDP's** (``per_rank_batch=b``, ``num_replicas=W``; what the Lightning strategy uses by default):
  the epoch's index list is exactly the one ``torch.utils.data.DistributedSampler(num_replicas=W)``
  draws (its seed, ``seed + epoch`` shuffling, padding or ``drop_last``), and step ``t``'s global batch
  is the block ``indices[t*W*b : (t+1)*W*b]`` of it: the union of what the W ranks' ``DataLoader(batch_size=b)``
  would give at step ``t`` under DDP. The last block is shorter unless the loader drops it
  (``drop_last``), as under DDP. So the coded allocation changes only *who* computes which sample.
* **fixed** (``global_batch_size=B``): a permutation of the dataset cut into blocks of ``B``; the last
  block is padded by wrapping around (``drop_last=False``) or dropped.

At every step a rank yields the dataset indices at the block positions ``plan.shards(rank, B_t)``
lists, in shard order. :meth:`pieces` cuts them into runs a rank can run through the model at once:
equal code weight, at most ``per_rank_batch`` samples (so activation memory stays DDP's), cut at the
boundaries of every rank's shards (so ranks that compute the same samples cut them the same way and
get bitwise equal gradients), each marked with who counts its samples once (metrics) and how much
it weighs in an epoch-level mean logged over all ranks.

The plan can change from a given (epoch, step) on (:meth:`switch_plan`, ``stragglers="auto"``): the
global batches stay the same, only who computes which of their samples changes.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Sampler

from .plan import CodedReducePlan, Shard
from .plan.plan import check_int


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of one rank's batch of one step, all with the same code ``weight``.

    ``counted``: this rank is the one (the lowest rank computing them) that counts these samples in
    per-sample metrics. ``log_weight``: their weight in an epoch-level mean over all ranks, an integer
    so that every position of the global batch weighs the same in total (``0`` for a padding piece of
    a rank that has no sample in a short last batch).
    """

    start: int
    stop: int
    weight: float
    counted: bool
    log_weight: int

    def __len__(self) -> int:
        return self.stop - self.start


def ddp_epoch_indices(dataset_len: int, num_replicas: int, *, shuffle: bool, seed: int, epoch: int,
                      drop_last: bool = False) -> list[int]:
    """The index list ``DistributedSampler(num_replicas=W, shuffle, seed, drop_last)`` draws in ``epoch``,
    before it deals ``indices[rank::W]`` to each rank (padded by repetition, or truncated)."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        indices = torch.randperm(dataset_len, generator=g).tolist()
    else:
        indices = list(range(dataset_len))
    total = ddp_num_samples(dataset_len, num_replicas, drop_last) * num_replicas
    if drop_last:
        return indices[:total]
    padding = total - len(indices)
    if padding <= len(indices):
        return indices + indices[:padding]
    return indices + (indices * math.ceil(padding / len(indices)))[:padding]


def ddp_num_samples(dataset_len: int, num_replicas: int, drop_last: bool) -> int:
    if drop_last and dataset_len % num_replicas:
        return math.ceil((dataset_len - num_replicas) / num_replicas)
    return math.ceil(dataset_len / num_replicas)


class CodedReduceBatchSampler(Sampler[list[int]]):
    """Yields, per step, this rank's dataset indices of the step's global batch.

    Use as ``DataLoader(dataset, batch_sampler=sampler)``. ``len`` (steps per epoch) is the same on
    every rank. Give either ``global_batch_size`` (fixed blocks) or ``per_rank_batch`` and
    ``num_replicas`` (DDP's blocks; ``sampler_drop_last`` is the ``DistributedSampler``'s ``drop_last``,
    ``drop_last`` the per-rank loader's).
    """

    def __init__(self, dataset_len: int, plan: CodedReducePlan, rank: int, global_batch_size: int | None = None, *,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, per_rank_batch: int | None = None,
                 num_replicas: int | None = None, sampler_drop_last: bool = False) -> None:
        self.dataset_len = check_int("dataset_len", dataset_len, 1, "the dataset is empty; pass len(dataset) of a non-empty dataset")
        self.rank = check_int("rank", rank, 0, "use this process's global rank")
        if self.rank >= plan.world_size:
            raise ValueError(f"rank must be < world_size={plan.world_size}, got {rank}; use this process's global rank")
        self.seed = check_int("seed", seed, 0, "use any non-negative integer, the same on every rank")
        self.plan, self.shuffle, self.drop_last = plan, bool(shuffle), bool(drop_last)
        self.sampler_drop_last = bool(sampler_drop_last)
        if (global_batch_size is None) == (per_rank_batch is None):
            raise ValueError("give either global_batch_size (fixed global batches) or per_rank_batch and num_replicas "
                             "(DDP's global batches), not both or neither")
        if per_rank_batch is not None:
            self.per_rank_batch = check_int("per_rank_batch", per_rank_batch, 1, "use the DataLoader's batch_size")
            replicas = plan.world_size if num_replicas is None else num_replicas
            self.num_replicas = check_int("num_replicas", replicas, 1, "use the number of DDP ranks")
            self.global_batch_size = self.per_rank_batch * self.num_replicas
            self.ddp_order = True
            per_rank = ddp_num_samples(self.dataset_len, self.num_replicas, self.sampler_drop_last)
            if per_rank == 0 or (self.drop_last and per_rank < self.per_rank_batch):
                raise ValueError(
                    f"the dataset has {dataset_len} samples: {per_rank} per rank under DDP's sampler, fewer than "
                    f"batch_size={per_rank_batch}, so drop_last=True leaves no step; use a smaller batch_size or drop_last=False")
            self._per_rank_samples = per_rank
        else:
            self.global_batch_size = check_int("global_batch_size", global_batch_size, 1,
                                               "pass the number of samples per step")
            self.per_rank_batch, self.num_replicas, self.ddp_order = None, None, False
            low = plan.min_global_batch_size
            if self.global_batch_size < low:
                raise ValueError(
                    f"global_batch_size={global_batch_size} must be >= {low} for this plan (every rank needs a "
                    f"sample); use at least {low}, e.g. plan.global_batch_for(per_rank_batch)")
            if drop_last and self.dataset_len < self.global_batch_size:
                raise ValueError(
                    f"dataset_len={dataset_len} is smaller than global_batch_size={global_batch_size}, so drop_last=True "
                    f"leaves no step; use a global batch <= {dataset_len} (and >= {low}) or drop_last=False")
        B = self.global_batch_size
        self.shards: list[Shard] = [sh for sh in plan.allocation(B)[self.rank]]
        self.sample_weights: torch.Tensor = torch.tensor(
            [sh.weight for sh in self.shards for _ in range(len(sh))], dtype=torch.float64)
        self.chunks: list[tuple[int, float]] = []  # runs of equal weight, in yielded order (full steps)
        for sh in self.shards:
            if self.chunks and self.chunks[-1][1] == sh.weight:
                self.chunks[-1] = (self.chunks[-1][0] + len(sh), sh.weight)
            else:
                self.chunks.append((len(sh), sh.weight))
        self.uniform_weights: bool = all(sh.weight == 1.0 for sh in self.shards)  # this rank's
        self._switches: list[tuple[tuple[int, int], CodedReducePlan]] = []  # (epoch, step) from which a plan holds
        self.epoch = 0
        self._step = 0  # next step to yield
        self._resume: int | None = None  # step loaded by load_state_dict, not yet iterated
        self._order_cache: tuple[int, list[int]] | None = None

    # ---------------------------------------------------------------- epoch layout
    def __len__(self) -> int:
        if self.ddp_order:
            m, b = self._per_rank_samples, self.per_rank_batch
            return m // b if self.drop_last else math.ceil(m / b)
        n, b = self.dataset_len, self.global_batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; restarts at step 0 unless a loaded state is for this epoch."""
        epoch = check_int("epoch", epoch, 0, "pass the current epoch number")
        if self._resume is not None and epoch == self.epoch:
            return
        self.epoch, self._step, self._resume = epoch, 0, None

    def _order(self) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            if self.ddp_order:
                order = ddp_epoch_indices(self.dataset_len, self.num_replicas, shuffle=self.shuffle, seed=self.seed,
                                          epoch=self.epoch, drop_last=self.sampler_drop_last)
            else:
                order = ddp_epoch_indices(self.dataset_len, 1, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
            self._order_cache = (self.epoch, order)
        return self._order_cache[1]

    def step_size(self, step: int) -> int:
        """Samples in the global batch of ``step`` (``global_batch_size`` except a short last DDP block)."""
        if not self.ddp_order:
            return self.global_batch_size
        b = self.per_rank_batch
        return self.num_replicas * (min(self._per_rank_samples, (step + 1) * b) - step * b)

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch at ``step`` of the current epoch."""
        step = check_int("step", step, 0, "pass a step of the current epoch")
        if step >= len(self):
            raise ValueError(f"step must be < {len(self)} (steps per epoch), got {step}")
        order, start = self._order(), step * self.global_batch_size
        return [order[i % len(order)] for i in range(start, start + self.step_size(step))]

    # ---------------------------------------------------------------- this rank's share
    def switch_plan(self, epoch: int, step: int, plan: CodedReducePlan) -> None:
        """From ``step`` of ``epoch`` on, allocate by ``plan`` (same world size). Call it before the sampler
        yields that step (a loader prefetches a few batches ahead)."""
        if plan.world_size != self.plan.world_size:
            raise ValueError(f"the new plan is for {plan.world_size} ranks, the sampler's for {self.plan.world_size}")
        if (epoch, step) < (self.epoch, self._step):
            raise ValueError(f"step {step} of epoch {epoch} was already yielded (the sampler is at step {self._step} "
                             f"of epoch {self.epoch}): switch further ahead")
        self._switches.append(((epoch, step), plan))
        self._switches.sort(key=lambda s: s[0])

    def plan_at(self, step: int, epoch: int | None = None) -> CodedReducePlan:
        """The plan that allocates ``step`` of ``epoch`` (default: the current epoch)."""
        at = (self.epoch if epoch is None else epoch, step)
        plan = self.plan
        for start, later in self._switches:
            if start <= at:
                plan = later
        return plan

    def positions(self, step: int, epoch: int | None = None) -> list[int]:
        """Positions of the global batch of ``step`` that this rank computes, in yielded order."""
        return list(_rank_layout(self.plan_at(step, epoch), self.rank, self.step_size(step), self.per_rank_batch)[0])

    def pieces(self, step: int, epoch: int | None = None) -> tuple[Piece, ...]:
        """How this rank's batch of ``step`` is run through the model (see the module docstring)."""
        return _rank_layout(self.plan_at(step, epoch), self.rank, self.step_size(step), self.per_rank_batch)[1]

    def __iter__(self) -> Iterator[list[int]]:
        start = self._resume if self._resume is not None else 0
        self._resume = None
        for step in range(start, len(self)):
            self._step = step + 1  # state_dict() taken after this batch resumes at the next one
            batch = self.global_batch(step)
            yield [batch[p] for p in self.positions(step)]

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "step"}``: ``step`` counts the batches already yielded this epoch."""
        return {"epoch": self.epoch, "step": self._step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["step"]`` of ``state["epoch"]`` on the next iteration."""
        self.epoch = check_int("epoch", state["epoch"], 0, "pass a state from state_dict()")
        self._step = self._resume = check_int("step", state["step"], 0, "pass a state from state_dict()")


@lru_cache(maxsize=64)
def _rank_layout(plan: CodedReducePlan, rank: int, size: int, max_piece: int | None) -> tuple[tuple[int, ...], tuple[Piece, ...]]:
    """``(positions, pieces)`` of ``rank`` in a global batch of ``size`` samples.

    The global batch is cut into *atoms* at every rank's shard boundaries, so each atom is computed by one
    set of ranks. A rank's consecutive atoms with the same set of ranks and the same code weight form a
    run, and each run is cut into ``ceil(len / max_piece)`` pieces of near-equal size. Ranks that compute
    the same samples therefore cut them the same way (bitwise equal gradients), and no piece is smaller
    than it must be (a 1-sample piece cannot run BatchNorm in train mode).
    """
    shards = plan.allocation(size)
    edges = sorted({0, size, *(e for rank_shards in shards for sh in rank_shards for e in (sh.start, sh.stop))})
    index = {e: i for i, e in enumerate(edges)}
    cover = [0] * (len(edges) - 1)  # per atom: bit r set when rank r computes it
    for r, rank_shards in enumerate(shards):
        for sh in rank_shards:
            for i in range(index[sh.start], index[sh.stop]):
                cover[i] |= 1 << r
    copies = {bin(mask).count("1") for mask in cover if mask}
    lcm = math.lcm(*copies) if copies else 1
    if not shards[rank]:  # a short last batch left this rank nothing: one padding sample that weighs nothing
        return (0,), (Piece(0, 1, 0.0, False, 0),)
    runs: list[tuple[tuple[int, float], list[int]]] = []  # ((cover, weight), positions), in shard order
    for sh in shards[rank]:
        for i in range(index[sh.start], index[sh.stop]):
            key = (cover[i], sh.weight)
            if not runs or runs[-1][0] != key:
                runs.append((key, []))
            runs[-1][1].extend(range(edges[i], edges[i + 1]))
    positions: list[int] = []
    pieces: list[Piece] = []
    for (mask, weight), run in runs:
        counted = mask & -mask == 1 << rank  # the lowest rank computing these samples counts them
        per_sample = lcm // bin(mask).count("1")
        count = -(-len(run) // max_piece) if max_piece else 1
        start = len(positions)
        for k in range(count):
            length = len(run) // count + (k < len(run) % count)
            pieces.append(Piece(start, start + length, weight, counted, per_sample * length))
            start += length
        positions.extend(run)
    return tuple(positions), tuple(pieces)
