"""What connects ``hvd.DistributedSampler`` to ``hvd.DistributedOptimizer``: the loader batches in flight.

The sampler :meth:`~PieceFeed.put`\\ s a :class:`StepPiece` as it starts yielding each batch; the optimizer's
hooks :meth:`~PieceFeed.take` one per backward pass, so they know what the batch weighs and whether it
closes a coded step. Before the sampler yields a new step it asks :meth:`~PieceFeed.skip_step`: a rank
that fell behind, whose next step the others already reduced without it, applies that result and skips
computing the step (catch-up), as the Lightning strategy does.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class StepPiece:
    """One loader batch of this rank: the DDP step it belongs to, the factor its mean-loss gradient gets in
    the step's message, and whether it is the step's last batch on this rank."""

    step: int
    scale: float
    closes_step: bool


class PieceFeed:
    """One per process (the runtime's). Args: ``uncoded``: the plan gives each rank its own batch with weight 1,
    so a loop without ``hvd.DistributedSampler`` (torch's sampler, or none) still decodes."""

    def __init__(self, uncoded: bool) -> None:
        self.uncoded = uncoded
        self.backward_passes_per_step = 1  # the optimizer's (a coded step spans that many DDP steps)
        self._queue: deque[StepPiece] = deque()  # yielded by the sampler, not yet through backward
        self._sampled = False  # a coded sampler has fed this process
        self._mid_step = False  # some, not all, of a DDP step's batches went through backward
        self.steps_done = 0  # DDP steps whose last batch went through backward, or that were skipped
        self.skipped = 0  # steps applied without computing them (catch-up)
        # set by the optimizer: applies the next step's result if the others reduced it already; True if it did
        self._catch_up: Optional[Callable[[], bool]] = None

    # ------------------------------------------------------------------ the sampler's side
    def restart(self) -> None:
        """A new iteration of the sampler (an epoch) begins: what the last one yielded but nobody trained is dropped."""
        if self._mid_step:
            raise RuntimeError(
                "a new epoch began in the middle of a step: this rank's training loop did not run all of the "
                "step's batches (DataLoader(drop_last=True) with a short last step, or a loop that stopped early). "
                "Let the DataLoader finish its epoch, or stop only after an optimizer.step() that updated the model")
        self._queue.clear()
        self._sampled = True

    def put(self, piece: StepPiece) -> None:
        self._queue.append(piece)

    def skip_step(self) -> bool:
        """Before the sampler yields a step: skip it if this rank is caught up with its loader (nothing in
        flight) and the others already reduced the step; the optimizer has then applied its result."""
        if self._queue or self._mid_step or self._catch_up is None or self.backward_passes_per_step != 1:
            return False
        if not self._catch_up():
            return False
        self.steps_done += 1
        self.skipped += 1
        return True

    # ------------------------------------------------------------------ the optimizer's side
    def attach(self, backward_passes_per_step: int, catch_up: Optional[Callable[[], bool]]) -> None:
        self.backward_passes_per_step, self._catch_up = backward_passes_per_step, catch_up

    def take(self) -> tuple[StepPiece, bool]:
        """``(piece, closes_coded_step)`` of the backward pass that starts now."""
        if self._queue:
            piece = self._queue.popleft()
        elif self._sampled:
            raise RuntimeError(
                "a backward pass without a batch from hvd.DistributedSampler: the training DataLoader's batch_size "
                "must be the sampler's, and each batch needs exactly one backward pass")
        elif self.uncoded:
            piece = StepPiece(self.steps_done, 1.0, True)
        else:
            raise RuntimeError(
                "hvd.DistributedOptimizer needs the training data from hvd.DistributedSampler(train_dataset, "
                "batch_size=...): with stragglers >= 1 every rank computes a coded share of the global batch. Use it "
                "for the training DataLoader, or set CODEDREDUCE_STRAGGLERS=0 for an uncoded sum")
        closes = piece.closes_step and (self.steps_done + 1) % self.backward_passes_per_step == 0
        return piece, closes

    def done(self, piece: StepPiece) -> None:
        """The backward pass of ``piece`` ended."""
        self._mid_step = not piece.closes_step
        if piece.closes_step:
            self.steps_done += 1
