"""Gradient aggregation: the optimizer closure wrapped around the coded reduce, catch-up, pieces.

Call order in one optimizer step (automatic optimization, ``accumulate_grad_batches=a``):

1. ``on_train_batch_start``: the :class:`~.data.TrainLoader` notes which batch of the epoch this is (its
   pieces come from the sampler);
2. for each of the ``a`` micro-batches Lightning calls ``training_step``; the aggregator runs the module
   once per *piece* of this rank's coded share (at most ``batch_size`` samples each, so activation memory
   is DDP's), back-propagates every piece but the last itself and returns the last one's loss, so
   Lightning's ``backward`` finishes the micro-batch. Each piece's loss is weighted
   ``code weight * len(piece) / B_t`` (``B_t``: the step's global batch), so ``.grad`` holds this rank's
   share of the global-batch mean;
3. ``optimizer_step`` wraps the closure: the last micro-batch's backward writes the flat gradient (and one
   "backward reached it" flag per parameter) from gradient hooks, and in the balanced layout hands it to
   the reducer bucket by bucket while backward goes on (:class:`~.gradients.GradientStream`); the tree
   takes it whole after backward. The sum is written back into ``.grad``
   (a parameter backward reached on no contributing rank keeps its ``.grad`` as it was, as under DDP), before
   clipping, ``on_before_optimizer_step`` and the update. A rank that lags finds the step already reduced
   and applies it without computing (catch-up).

Manual optimization: ``training_step`` gets this rank's whole share at once (the strategy picks a 0/1 code
for it) and ``optimizer.step()`` reduces it, scaled ``len(share) / B_t``.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable, Optional

import torch

from ._common import FitContext
from .adaptive import PlanSwitcher
from .data import TrainLoader
from .gradients import (GradientStream, HeldGradients, TouchedParameters, flat_gradient, grad_params, message_dtype,
                        write_gradients)
from .internals import LightningInternals


class ComputeClock:
    """Forward/backward wall time of one optimizer step (``step_records``' ``compute_s``).

    Automatic optimization: the accumulation micro-batches before the stepping one plus its closure.
    Manual: from the batch's start to ``optimizer.step()`` (the user's backward runs in ``training_step``).
    """

    def __init__(self) -> None:
        self._micro = 0.0  # compute of accumulation micro-batches before the stepping one
        self._micro_t0: Optional[float] = None
        self._manual_t0: Optional[float] = None

    def new_batch(self, first_of_step: bool) -> None:
        if first_of_step:
            self._micro = 0.0
        self._manual_t0 = time.perf_counter()

    def micro_batch_starts(self) -> None:
        self._micro_t0 = time.perf_counter()

    def micro_batch_skipped(self) -> None:
        self._micro_t0 = None

    def micro_batch_ends(self) -> None:
        if self._micro_t0 is not None:
            self._micro += time.perf_counter() - self._micro_t0
            self._micro_t0 = None

    def step_compute(self, t0: float, t1: float, automatic: bool) -> float:
        """The step's compute, given that its closure ran from ``t0`` to ``t1``."""
        if automatic:
            return t1 - t0 + self._micro
        return t1 - (self._manual_t0 if self._manual_t0 is not None else t0)

    def step_done(self) -> None:
        self._manual_t0 = time.perf_counter()
        self._micro = 0.0


class GradientAggregator:
    """Replaces DDP's gradient all-reduce (see the module docstring): the piecewise ``training_step``, the
    reducing closure and its catch-up decision, and one ``step_records`` entry per optimizer step.

    Active between :meth:`start` and :meth:`stop` (while the reducer is open); otherwise every hook is
    Lightning's. ``step_fn``/``closure`` arguments are ``DDPStrategy``'s own ``training_step`` and closure.
    """

    def __init__(self, loader: TrainLoader, internals: LightningInternals, bucket_bytes: int,
                 switcher: PlanSwitcher) -> None:
        self._loader = loader
        self._switcher = switcher  # stragglers="auto": may switch the plan before a step, decides after one
        self._lightning = internals
        self._fit: Optional[FitContext] = None
        self._touched = TouchedParameters()  # which parameters backward reached in this step (None grads as DDP)
        self._stream = GradientStream(bucket_bytes)  # the stepping backward's gradients, handed in as they come
        self._touched.on_gradient = self._stream.on_gradient
        self._closure_params: list[torch.nn.Parameter] = []  # the stepping optimizer's, while its closure runs
        self._held = HeldGradients()  # a micro-batch's earlier pieces' gradients across Lightning's zero_grad
        self._clock = ComputeClock()
        self._counting = True  # False while a piece whose samples another rank counts runs (counts_samples)
        self._logged_epoch = -1  # last epoch in which training_step ran here (a catching-up rank must log once)
        self._log_only = False  # the closure of a skipped step runs training_step forward-only, to log
        self._in_closure = False
        self._closure_calls = 0
        # per optimizer step: {"step", "compute_s", "skipped", "early_buckets" (handed in while backward ran)}
        self.step_records: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ life cycle
    def start(self, fit: FitContext) -> None:
        self._fit = fit
        self._logged_epoch = -1
        self._touched.attach([p for p in fit.module.parameters() if p.requires_grad])

    def use(self, fit: FitContext) -> None:
        """The plan changed (``stragglers="auto"``): the same fit with a new reducer."""
        self._fit = fit

    def stop(self) -> None:
        self._touched.detach()
        self._stream.cancel()
        self._fit = None

    @property
    def counts_samples(self) -> bool:
        """Whether the samples ``training_step`` has now are counted on this rank (``is_counted``)."""
        return self._counting

    def _active(self) -> Optional[FitContext]:
        return self._fit if self._loader.sampler is not None else None

    def _catching_up(self, fit: FitContext) -> bool:
        """The others reduced this step without us: apply it without computing. Not when Lightning skips
        backward (StochasticWeightAveraging's BatchNorm epoch): there the forward passes are the point."""
        return fit.reducer.ready(self._loader.reduce_step) and not self._lightning.skips_backward(fit.trainer)

    # ------------------------------------------------------------------ training_step, per piece
    def training_step(self, step_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        fit = self._active()
        if fit is None or not fit.trainer.training or not fit.module.automatic_optimization or not args:
            return step_fn(*args, **kwargs)  # manual optimization: the whole share in one call
        if self._log_only:
            return self._log_only_step(fit, step_fn, *args, **kwargs)
        if not self._in_closure:
            # an accumulation micro-batch: if the step is already reduced, its gradient is not needed
            self._clock.micro_batch_starts()
            if self._catching_up(fit):
                self._clock.micro_batch_skipped()
                if self._logged_epoch != fit.trainer.current_epoch:
                    return self._log_only_step(fit, step_fn, *args, **kwargs)
                return torch.zeros((), device=fit.device, requires_grad=True)
        return self._piecewise_step(fit, step_fn, *args, **kwargs)

    def _run_piece(self, fit: FitContext, step_fn: Callable[..., Any], batch: Any, i: int, rest: tuple,
                   kwargs: dict) -> Any:
        """The module on piece ``i`` of the batch, its logs weighted and its samples counted as the piece says."""
        pieces = self._loader.pieces()
        piece = pieces[i]
        part = batch if len(pieces) == 1 else split_batch(batch, piece.start, piece.stop, pieces[-1].stop)
        self._lightning.weigh_next_logs(fit.trainer, part, piece.log_weight)
        self._logged_epoch = fit.trainer.current_epoch
        self._counting = piece.counted
        try:
            return step_fn(part, *rest, **kwargs)
        finally:
            self._counting = True

    def _log_only_step(self, fit: FitContext, step_fn: Callable[..., Any], batch: Any, *rest: Any, **kwargs: Any):
        """A rank catching up still runs one piece per epoch, forward only, so that it logs what the others
        log: Lightning synchronises an epoch-level ``self.log(..., sync_dist=True)`` only on the ranks that
        logged it, and a rank that logged nothing would be in a different collective than the others."""
        with torch.no_grad():
            self._run_piece(fit, step_fn, batch, 0, rest, kwargs)
        return torch.zeros((), device=fit.device, requires_grad=True)

    def _piecewise_step(self, fit: FitContext, step_fn: Callable[..., Any], batch: Any, *rest: Any, **kwargs: Any):
        """Step 2 of the module docstring: one call of the module per piece, all but the last back-propagated here."""
        pieces, size = self._loader.pieces(), self._loader.step_size()
        m = pieces[-1].stop
        trainer = fit.trainer
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        skip_backward = self._lightning.skips_backward(trainer)  # e.g. StochasticWeightAveraging's BatchNorm epoch
        if len(pieces) > 1 and self._loader.first_of_step(accumulate) and not skip_backward:
            self._held.clear_gradients(fit.module)  # Lightning zeroes them after this call anyway
        display: Optional[torch.Tensor] = None
        term: Optional[torch.Tensor] = None
        out: Any = None
        for i, piece in enumerate(pieces):
            out = self._run_piece(fit, step_fn, batch, i, rest, kwargs)
            value = out.get("loss") if isinstance(out, dict) else out
            if value is None and len(pieces) == 1:
                return out  # the user skips the step (Lightning's convention)
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    "CodedReduceStrategy runs training_step once per piece of a rank's coded share (at most "
                    "batch_size samples each) and weights the losses, so training_step must return the loss tensor "
                    f"(or a dict with 'loss'); got {type(value).__name__}")
            term = value * (piece.weight * len(piece) / size)
            shown = value.detach() * (len(piece) / m)
            display = shown if display is None else display + shown
            if i < len(pieces) - 1 and not skip_backward:
                self._backward_piece(fit, term / accumulate if accumulate > 1 else term)
        if len(pieces) > 1:
            self._lightning.weigh_next_logs(trainer, batch, None)  # later hooks log the whole batch again
            if not skip_backward:
                self._held.hold(fit.module)  # Lightning zeroes .grad between this call and its backward
        loss = term + (display - term.detach())  # the gradient of the last piece, the value of the rank's mean loss
        return {**out, "loss": loss} if isinstance(out, dict) else loss

    def _backward_piece(self, fit: FitContext, loss: torch.Tensor) -> None:
        """A piece's backward inside ``training_step``: the precision plugin's scaling, the module's ``backward``."""
        scaler = self._lightning.grad_scaler(fit.precision_plugin)
        fit.module.backward(scaler.scale(loss) if scaler is not None else loss)

    # ------------------------------------------------------------------ batch and backward
    def start_batch(self, accumulate: int) -> None:
        """After the :class:`TrainLoader` noted the batch: nothing held over, the step's clock (re)started."""
        self._held.drop()
        self._clock.new_batch(self._loader.first_of_step(accumulate))

    def before_backward(self) -> None:
        """After Lightning's ``zero_grad``, before its backward of a micro-batch: the earlier pieces' gradients
        go back into ``.grad``, so backward accumulates into them (no second copy of the gradient). Before
        the step's last backward, the gradient stream starts (when the layout can take it in buckets)."""
        self._held.add_back()
        fit = self._fit
        if self._in_closure and fit is not None and self._streams(fit):
            self._stream.start(fit.reducer, self._loader.reduce_step, self._closure_params,
                               message_dtype(self._closure_params))

    def _streams(self, fit: FitContext) -> bool:
        """Whether this step's gradient is handed in while backward runs (balanced layout, CPU, automatic)."""
        return (self._stream.bucket_bytes > 0 and fit.reducer.plan.balanced is not None and not self._stream.active
                and fit.module.automatic_optimization and fit.device.type == "cpu" and bool(self._closure_params)
                and not self._lightning.skips_backward(fit.trainer))

    def after_backward(self) -> None:
        """After Lightning's backward of a micro-batch: its compute time is noted."""
        if not self._in_closure:
            self._clock.micro_batch_ends()

    # ------------------------------------------------------------------ the reducing closure
    def wrap_closure(self, optimizer: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The closure ``optimizer_step`` hands the optimizer: Lightning's, then the coded reduce."""
        if self._active() is None:
            return closure
        self._closure_calls = 0
        return partial(self._reducing_closure, optimizer, closure)

    def _reducing_closure(self, optimizer: Any, closure: Callable[[], Any]) -> Any:
        """Runs (or, when the step is already reduced, skips) forward/backward, then the coded reduce."""
        self._closure_calls += 1
        if self._closure_calls > 1:
            raise RuntimeError("the optimizer called its closure more than once in one step (e.g. LBFGS); "
                               "CodedReduceStrategy reduces exactly once per optimizer step and does not support it")
        step = self._loader.reduce_step
        self._switcher.before_reduce(step)  # may open a new reducer (a plan switch takes effect at this step)
        fit = self._fit
        automatic = fit.module.automatic_optimization
        params = grad_params(optimizer)
        skipped = automatic and self._catching_up(fit)
        if skipped:  # catch-up: the others reduced this step without us; apply it, do not compute
            out = self._skip_closure(fit, closure)
            flat = fit.reducer.result(step)
            compute = None
        else:
            t0 = time.perf_counter()
            self._in_closure, self._closure_params = True, params
            try:
                out = closure()
            except BaseException:
                self._stream.cancel()
                raise
            finally:
                self._in_closure, self._closure_params = False, []
            compute = self._clock.step_compute(t0, time.perf_counter(), automatic)
            buckets = 0
            if self._stream.active:  # its buckets are on their way already
                flat = self._stream.finish(self._touched, self._mass())
                buckets = self._stream.early_buckets
            else:
                local = self._local_gradient(fit, params)  # a private copy: the balanced layout assembles the sum in it
                # (the tree accumulates in a copy of its own either way: in place would only add a copy back)
                in_place = fit.reducer.plan.balanced is not None and local.device.type == "cpu"
                flat = fit.reducer.reduce(step, local, in_place=in_place)
        self._touched.reset()
        write_gradients(params, flat)
        self._clock.step_done()
        self._loader.step_reduced()
        self.step_records.append({"step": step, "compute_s": compute, "skipped": bool(skipped),
                                  "early_buckets": 0 if skipped else buckets})
        if self._switcher.active:
            samples = sum(len(p) for p in self._loader.pieces() if p.weight != 0)
            self._switcher.after_reduce(step, compute, samples * max(1, fit.trainer.accumulate_grad_batches))
        return out

    def _skip_closure(self, fit: FitContext, closure: Callable[[], Any]) -> Any:
        """A skipped step's closure result: ``training_step`` forward-only when this rank has not logged in
        this epoch yet (see ``_log_only_step``), else an empty result Lightning's loop accepts."""
        if self._logged_epoch == fit.trainer.current_epoch:
            self._lightning.mark_closure_skipped(closure)
            return torch.zeros((), device=fit.device)  # not None: AMP would skip the update
        self._log_only = True  # the closure runs training_step as _log_only_step
        try:
            return closure()
        finally:
            self._log_only = False

    def _local_gradient(self, fit: FitContext, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """This rank's share of the global-batch mean gradient, flat, then one flag per parameter.

        Automatic optimization weighted the losses already (module docstring, step 2). Manual optimization
        back-propagated the mean loss over this rank's share: scale it by ``share / B_t``.
        """
        scale = 1.0 if fit.module.automatic_optimization else self._mass()
        return flat_gradient(params, self._touched, scale, fit.device, self._mass())

    def _mass(self) -> float:
        """This rank's coded share of the step's samples, ``sum(weight * samples) / step size``."""
        return sum(p.weight * len(p) for p in self._loader.pieces()) / self._loader.step_size()


def split_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """Samples ``[start, stop)`` of a collated batch of ``size`` samples, in every structure the same way.

    Tensors whose first dimension is ``size`` are sliced; lists and tuples of ``size`` plain values (names,
    ids: what ``default_collate`` makes of strings and numbers) are sliced; mappings, named tuples and
    other lists and tuples are split element by element; anything else (a scalar, a tensor of another
    length) is passed unchanged.
    """
    found: list[bool] = []

    def split(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.dim() > 0 and obj.shape[0] == size:
                found.append(True)
                return obj[start:stop]
            return obj
        if isinstance(obj, Mapping):
            parts = {k: split(v) for k, v in obj.items()}
            return parts if type(obj) is dict else type(obj)(parts)
        if isinstance(obj, (list, tuple)):
            if len(obj) == size and not any(isinstance(e, (torch.Tensor, Mapping, list, tuple)) for e in obj):
                found.append(True)
                return obj[start:stop]
            parts = [split(e) for e in obj]
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
                return type(obj)(*parts)
            return type(obj)(parts)
        return obj

    out = split(batch)
    if not found:
        raise ValueError(
            f"CodedReduceStrategy runs this rank's {size} samples in pieces, but the batch holds nothing whose length "
            f"is {size} (got {type(batch).__name__}); return batches of per-sample tensors or lists from the "
            f"DataLoader (first dimension: the sample)")
    return out

