"""The gradient side of ``hvd.DistributedOptimizer``: backward passes into one coded step's message.

1. The runtime's :class:`~.feed.PieceFeed` says which loader batch (:class:`~.feed.StepPiece`) a backward
   pass computes, and whether it closes a coded step (the last batch of the last of
   ``backward_passes_per_step`` steps).
2. :class:`CodedGradients`' post-accumulate-grad hooks add each batch's gradient, times its piece's
   weight, into a flat message and clear ``.grad`` (so the script's ``zero_grad`` and the next batch
   start from nothing). During the closing backward a bucket is handed to the reducer
   (``CodedReducer.begin``/``filled``) as soon as all of its gradients are final, so the balanced
   layout's chunks travel while backward goes on; the rest is handed in when that backward ends.
3. ``synchronize`` waits for the decoded sum (``finish``) and writes the average into ``.grad``.
4. Catch-up: before a lagging rank computes a step the others already reduced, :meth:`CodedGradients.catch_up`
   writes that result into ``.grad`` and runs the wrapped optimizer's step (``apply``), without computing.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..engine.buckets import BucketLayout
from .feed import PieceFeed, StepPiece
from .runtime import Runtime

DEFAULT_BUCKET_BYTES = 25 << 20  # DDP's bucket_cap_mb


class CodedGradients:
    """Post-accumulate-grad hooks on ``params`` that build each coded step's message (module docstring).

    ``result_scale`` turns the decoded sum of the ranks' mean gradients into the script's ``op``:
    ``1 / size`` for ``hvd.Average``, ``1`` for ``hvd.Sum``.
    """

    def __init__(self, params: list[torch.nn.Parameter], runtime: Runtime, result_scale: float,
                 apply: Callable[[], None], *, backward_passes_per_step: int = 1,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, sparse_as_dense: bool = False) -> None:
        self._params = params
        self._reducer = runtime.reducer
        self._feed: PieceFeed = runtime.feed
        self._apply = apply  # the wrapped optimizer's own step (catch-up)
        self._result_scale = result_scale
        self._sparse_as_dense = sparse_as_dense
        self._layout = BucketLayout.of(params, bucket_bytes)
        self._slot = {id(p): slot for p, slot in zip(params, self._layout.slots)}
        self._dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        self._flat: Optional[torch.Tensor] = None  # the coded step's message, accumulated over its batches
        self._piece: Optional[StepPiece] = None  # the batch the running backward computes
        self._closes = False  # ... and whether it closes the coded step
        self._step: Optional[int] = None  # the reducer's step of the closing backward
        self._left: list[int] = []  # per bucket: its parameters not final yet (closing backward)
        self._final: set[int] = set()  # id() of parameters final in the closing backward
        self._ready: Optional[int] = None  # a step handed in whole, waiting for synchronize()
        self.early_buckets = 0  # buckets of the last closing backward handed in while it ran
        self._sparse: set[int] = set()  # id() of parameters whose gradients came sparse (sparse_as_dense): written back sparse
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in params]
        self._backward_passes_per_step = backward_passes_per_step
        self._feed.attach(backward_passes_per_step, None)  # catch-up: see catch_up_allowed

    @property
    def pending(self) -> bool:
        """Whether a coded step is handed in and waits for :meth:`synchronize`."""
        return self._ready is not None

    # ------------------------------------------------------------------ in backward
    def _on_gradient(self, p: torch.nn.Parameter) -> None:
        grad = p.grad
        if grad.is_sparse:
            if not self._sparse_as_dense:  # refused before this backward touches the step
                raise ValueError("a sparse gradient (e.g. nn.Embedding(sparse=True)) cannot be coded; pass "
                                 "hvd.DistributedOptimizer(..., sparse_as_dense=True) or use a dense embedding")
            grad = grad.to_dense()
            self._sparse.add(id(p))
        if self._piece is None:
            self._open_piece()
        lo, hi, bucket = self._slot[id(p)]
        self._flat[lo:hi].add_(grad.detach().reshape(-1).cpu(), alpha=self._piece.scale)  # (CUDA: staged to host)
        p.grad = None
        if self._closes and id(p) not in self._final:
            self._final.add(id(p))
            self._left[bucket] -= 1
            if self._left[bucket] == 0:
                start, stop, _ = self._layout.buckets[bucket]
                self._reducer.filled(self._step, start, stop)
                self.early_buckets += 1

    def _open_piece(self) -> None:
        if self._ready is not None:
            raise RuntimeError("a backward pass began before optimizer.step() (or synchronize()) took the last "
                               "step's result; call optimizer.step() after every batch's backward")
        self._piece, self._closes = self._feed.take()
        if self._flat is None:
            self._flat = torch.zeros(self._layout.total, dtype=self._dtype)
        if self._closes:
            self._step = self._reducer.next_step
            self._reducer.begin(self._step, self._flat, segments=[(lo, hi) for lo, hi, _ in self._layout.buckets])
            self._left = [members for _, _, members in self._layout.buckets]
            self._final, self.early_buckets = set(), 0
        # runs when this backward pass ends (DDP's reducer uses the same engine callback)
        torch.autograd.Variable._execution_engine.queue_callback(self._close_piece)

    def _close_piece(self) -> None:
        piece, closes = self._piece, self._closes
        self._piece, self._closes = None, False
        self._feed.done(piece)
        if closes:
            for j, (start, stop, _) in enumerate(self._layout.buckets):
                if self._left[j] > 0:  # parameters this backward did not reach keep what earlier batches added
                    self._reducer.filled(self._step, start, stop)
            self._ready = self._step

    # ------------------------------------------------------------------ after backward
    def synchronize(self) -> bool:
        """If a coded step is handed in: wait for its sum, write the result into ``.grad``; returns whether it did."""
        if self._ready is None:
            return False
        step, self._ready, self._flat = self._ready, None, None
        self._write(self._reducer.finish(step))
        return True

    def catch_up_allowed(self, allowed: bool) -> None:
        """Allowed once the script is seen to step plainly; not when it edits the averaged gradient before its
        step (a skipped step could not repeat that)."""
        self._feed.attach(self._backward_passes_per_step, self.catch_up if allowed else None)

    def catch_up(self) -> bool:
        """If the others already reduced this rank's next step: apply its result without computing it."""
        step = self._reducer.next_step
        if self._ready is not None or self._piece is not None or self._flat is not None or not self._reducer.ready(step):
            return False
        self._write(self._reducer.result(step).clone())
        self._apply()
        return True

    def _write(self, out: torch.Tensor) -> None:
        if self._result_scale != 1.0:
            out.mul_(self._result_scale)
        for p, (lo, hi, _) in zip(self._params, self._layout.slots):
            grad = out[lo:hi].view_as(p).to(device=p.device, dtype=p.dtype)
            p.grad = grad.to_sparse() if id(p) in self._sparse else grad

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
