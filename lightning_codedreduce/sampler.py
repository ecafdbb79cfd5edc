"""Per-rank, per-step sample indices for a :class:`~lightning_codedreduce.plan.CodedReducePlan`.

Every rank draws the same permutation of the dataset each epoch (seeded with ``seed + epoch``, as
``DistributedSampler`` does) and cuts it into global batches of ``global_batch_size``. At every step
a rank yields the dataset indices at the global-batch positions ``plan.shards(rank, B)`` lists, in
shard order; ``sample_weights`` holds the matching code weights.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .plan import CodedReducePlan, Shard
from .plan.plan import check_int


class CodedReduceBatchSampler(Sampler[list[int]]):
    """Yields, per step, this rank's dataset indices of the step's global batch.

    Use as ``DataLoader(dataset, batch_sampler=sampler)``. ``len`` (steps per epoch) is the same on
    every rank. With ``drop_last=False`` the last global batch is padded by wrapping around the
    epoch's permutation, so every step has the same shape.
    """

    def __init__(self, dataset_len: int, plan: CodedReducePlan, rank: int, global_batch_size: int, *,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        self.dataset_len = check_int("dataset_len", dataset_len, 1, "the dataset is empty; pass len(dataset) of a non-empty dataset")
        self.rank = check_int("rank", rank, 0, "use this process's global rank")
        if self.rank >= plan.world_size:
            raise ValueError(f"rank must be < world_size={plan.world_size}, got {rank}; use this process's global rank")
        self.global_batch_size = check_int("global_batch_size", global_batch_size, 1, "pass the number of samples per step")
        low = plan.min_global_batch_size
        if self.global_batch_size < low:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be >= {low} for this plan (every rank needs a "
                f"sample); use at least {low}, e.g. plan.global_batch_for(per_rank_batch)")
        if drop_last and self.dataset_len < self.global_batch_size:
            raise ValueError(
                f"dataset_len={dataset_len} is smaller than global_batch_size={global_batch_size}, so drop_last=True "
                f"leaves no step; use a global batch <= {dataset_len} (and >= {low}) or drop_last=False")
        self.seed = check_int("seed", seed, 0, "use any non-negative integer, the same on every rank")
        self.plan, self.shuffle, self.drop_last = plan, bool(shuffle), bool(drop_last)
        self.shards: list[Shard] = plan.shards(self.rank, self.global_batch_size)
        self._positions = [p for sh in self.shards for p in range(sh.start, sh.stop)]
        self.sample_weights: torch.Tensor = torch.tensor(
            [sh.weight for sh in self.shards for _ in range(len(sh))], dtype=torch.float64)
        self.chunks: list[tuple[int, float]] = []  # runs of equal weight, in yielded order
        for sh in self.shards:
            if self.chunks and self.chunks[-1][1] == sh.weight:
                self.chunks[-1] = (self.chunks[-1][0] + len(sh), sh.weight)
            else:
                self.chunks.append((len(sh), sh.weight))
        self.uniform_weights: bool = all(sh.weight == 1.0 for sh in self.shards)
        self.epoch = 0
        self._step = 0  # next step to yield
        self._resume: int | None = None  # step loaded by load_state_dict, not yet iterated
        self._order_cache: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
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
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.seed + self.epoch)
                order = torch.randperm(self.dataset_len, generator=g).tolist()
            else:
                order = list(range(self.dataset_len))
            self._order_cache = (self.epoch, order)
        return self._order_cache[1]

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch at ``step`` of the current epoch."""
        step = check_int("step", step, 0, "pass a step of the current epoch")
        if step >= len(self):
            raise ValueError(f"step must be < {len(self)} (steps per epoch), got {step}")
        order, b = self._order(), self.global_batch_size
        return [order[i % self.dataset_len] for i in range(step * b, (step + 1) * b)]

    def __iter__(self) -> Iterator[list[int]]:
        start = self._resume if self._resume is not None else 0
        self._resume = None
        order, b, n = self._order(), self.global_batch_size, self.dataset_len
        for step in range(start, len(self)):
            self._step = step + 1  # state_dict() taken after this batch resumes at the next one
            yield [order[(step * b + p) % n] for p in self._positions]

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "step"}``: ``step`` counts the batches already yielded this epoch."""
        return {"epoch": self.epoch, "step": self._step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["step"]`` of ``state["epoch"]`` on the next iteration."""
        self.epoch = check_int("epoch", state["epoch"], 0, "pass a state from state_dict()")
        self._step = self._resume = check_int("step", state["step"], 0, "pass a state from state_dict()")
