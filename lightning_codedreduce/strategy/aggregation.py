"""Gradient aggregation: the optimizer closure wrapped around the coded reduce, catch-up, pieces.

Call order in one optimizer step (automatic optimization, ``accumulate_grad_batches=a``):

1. ``on_train_batch_start`` notes which batch of the epoch this is (its pieces come from the sampler);
2. for each of the ``a`` micro-batches Lightning calls ``training_step``; the strategy runs the module
   once per *piece* of this rank's coded share (at most ``batch_size`` samples each, so activation memory
   is DDP's), back-propagates every piece but the last itself and returns the last one's loss, so
   Lightning's ``backward`` finishes the micro-batch. Each piece's loss is weighted
   ``code weight * len(piece) / B_t`` (``B_t``: the step's global batch), so ``.grad`` holds this rank's
   share of the global-batch mean;
3. ``optimizer_step`` wraps the closure: after the last micro-batch's backward the flat gradient (and one
   "backward reached it" flag per parameter) is reduced over the tree and written back into ``.grad``
   (a parameter backward reached on no contributing rank keeps its ``.grad`` as it was, as under DDP), before
   clipping, ``on_before_optimizer_step`` and the update. A rank that lags finds the step already reduced
   and applies it without computing (catch-up).

Manual optimization: ``training_step`` gets this rank's whole share at once (the strategy picks a 0/1 code
for it) and ``optimizer.step()`` reduces it, scaled ``len(share) / B_t``.
"""
from __future__ import annotations

import time
from functools import partial
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

# gradient dtypes the reduce carries (half precision is reduced in float32)
_REDUCIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class HeldGradients:
    """The gradients of a micro-batch's earlier pieces, held while Lightning zeroes ``.grad`` (its closure
    runs ``training_step``, then ``zero_grad``, then ``backward``) and added back after its backward."""

    def __init__(self) -> None:
        self._held: list[tuple[torch.nn.Parameter, Optional[torch.Tensor]]] = []  # (parameter, its held gradient)

    @staticmethod
    def clear_gradients(module: torch.nn.Module) -> None:
        for p in module.parameters():
            p.grad = None

    def hold(self, module: torch.nn.Module) -> None:
        self._held = [(p, p.grad) for p in module.parameters() if p.requires_grad]
        for p, _ in self._held:
            p.grad = None

    def add_back(self) -> None:
        for p, grad in self._held:
            if grad is None:
                continue
            if p.grad is None:
                p.grad = grad
            else:
                p.grad += grad
        self._held = []

    def drop(self) -> None:
        self._held = []


class TouchedParameters:
    """Which parameters received a gradient in the current optimizer step (post-accumulate-grad hooks).

    DDP all-reduces a parameter only when backward reached it; one no backward reached on any rank keeps
    its ``.grad`` as it was (``None``, or a stale value that ``optimizer.step`` then uses, as in
    StochasticWeightAveraging's BatchNorm epoch). The reduce carries one flag per parameter, so the
    strategy can do the same.
    """

    def __init__(self) -> None:
        self._touched: set[int] = set()  # id() of the parameters reached by backward since reset()
        self._handles: list[Any] = []  # hook handles, removed by detach()

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        self.detach()
        for p in params:
            self._handles.append(p.register_post_accumulate_grad_hook(lambda t: self._touched.add(id(t))))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._touched = [], set()

    def touched(self, p: torch.nn.Parameter) -> bool:
        return id(p) in self._touched

    def reset(self) -> None:
        self._touched = set()


class GradientAggregationMixin:
    """Replaces DDP's gradient all-reduce: after the (accumulated) backward, this rank's share of the
    global-batch mean gradient is reduced over the tree and written back into ``.grad``."""

    def _check_gradient_dtypes(self) -> None:
        names = {id(p): n for n, p in self.lightning_module.named_parameters()}
        for optimizer in self.optimizers:
            for p in self._grad_params(optimizer):
                if p.dtype not in _REDUCIBLE:
                    raise ValueError(
                        f"parameter {names.get(id(p), '?')} is {p.dtype}; CodedReduce reduces float16, bfloat16, float32 "
                        "and float64 gradients. Set requires_grad=False on it (or keep it as a buffer), or store "
                        "complex values as real pairs (torch.view_as_real)")

    def training_step(self, *args: Any, **kwargs: Any):
        lm = self.lightning_module
        reducer = self.reducer
        if reducer is None or self.sampler is None or not self._trainer.training:
            return super().training_step(*args, **kwargs)
        if not lm.automatic_optimization or not args:
            return super().training_step(*args, **kwargs)  # manual: the whole share in one call
        if self._log_only:
            return self._log_only_step(*args, **kwargs)
        if not self._in_closure:
            # an accumulation micro-batch: if the step is already reduced, its gradient is not needed
            self._micro_t0 = time.perf_counter()
            if self._catching_up():
                self._micro_t0 = None
                if self._logged_epoch != self._trainer.current_epoch:
                    return self._log_only_step(*args, **kwargs)
                return torch.zeros((), device=self.root_device, requires_grad=True)
        return self._piecewise_training_step(*args, **kwargs)

    def _catching_up(self) -> bool:
        """The others reduced this step without us: apply it without computing. Not when Lightning skips
        backward (StochasticWeightAveraging's BatchNorm epoch): there the forward passes are the point."""
        return self.reducer.ready(self._reduce_step) and not self._lightning.skips_backward(self._trainer)

    def _log_only_step(self, batch: Any, *rest: Any, **kwargs: Any):
        """A rank catching up still runs one piece per epoch, forward only, so that it logs what the others
        log: Lightning synchronises an epoch-level ``self.log(..., sync_dist=True)`` only on the ranks that
        logged it, and a rank that logged nothing would be in a different collective than the others."""
        pieces = self.sampler.pieces(self._batch_idx)
        piece = pieces[0]
        part = batch if len(pieces) == 1 else split_batch(batch, piece.start, piece.stop, pieces[-1].stop)
        self._lightning.weigh_next_logs(self._trainer, part, piece.log_weight)
        self._logged_epoch = self._trainer.current_epoch
        self._counting = piece.counted
        try:
            with torch.no_grad():
                super().training_step(part, *rest, **kwargs)
        finally:
            self._counting = True
        return torch.zeros((), device=self.root_device, requires_grad=True)

    def _piecewise_training_step(self, batch: Any, *rest: Any, **kwargs: Any):
        """Step 2 of the module docstring: one call of the module per piece, all but the last back-propagated here."""
        pieces = self.sampler.pieces(self._batch_idx)
        size = self.sampler.step_size(self._batch_idx)
        m = pieces[-1].stop
        self._logged_epoch = self._trainer.current_epoch
        accumulate = max(1, int(self._trainer.accumulate_grad_batches))
        skip_backward = self._lightning.skips_backward(self._trainer)  # e.g. StochasticWeightAveraging's BatchNorm epoch
        if len(pieces) > 1 and self._batch_idx % accumulate == 0 and not skip_backward:
            self._held.clear_gradients(self.lightning_module)  # Lightning zeroes them after this call anyway
        display: Optional[torch.Tensor] = None
        term: Optional[torch.Tensor] = None
        out: Any = None
        for i, piece in enumerate(pieces):
            part = batch if len(pieces) == 1 else split_batch(batch, piece.start, piece.stop, m)
            self._lightning.weigh_next_logs(self._trainer, part, piece.log_weight)
            self._counting = piece.counted
            try:
                out = super().training_step(part, *rest, **kwargs)
            finally:
                self._counting = True
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
                self._backward_piece(term / accumulate if accumulate > 1 else term)
        if len(pieces) > 1:
            self._lightning.weigh_next_logs(self._trainer, batch, None)  # later hooks log the whole batch again
            if not skip_backward:
                self._held.hold(self.lightning_module)  # Lightning zeroes .grad between this call and its backward
        loss = term + (display - term.detach())  # the gradient of the last piece, the value of the rank's mean loss
        if isinstance(out, dict):
            return {**out, "loss": loss}
        return loss

    def _backward_piece(self, loss: torch.Tensor) -> None:
        """A piece's backward inside ``training_step``: the precision plugin's scaling, the module's ``backward``."""
        scaler = self._lightning.grad_scaler(self.precision_plugin)
        self.lightning_module.backward(scaler.scale(loss) if scaler is not None else loss)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self._held.drop()
        accumulate = max(1, int(getattr(self._trainer, "accumulate_grad_batches", 1)))
        if batch_idx % accumulate == 0:
            self._micro_compute = 0.0
        self._manual_t0 = time.perf_counter()  # manual optimization: compute runs from here to optimizer.step()
        super().on_train_batch_start(batch, batch_idx)

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        self._held.add_back()
        if self._micro_t0 is not None and not self._in_closure:
            self._micro_compute += time.perf_counter() - self._micro_t0
            self._micro_t0 = None
        return out

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        if self.reducer is None or self.sampler is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        self._closure_calls = 0
        wrapped = partial(self._reducing_closure, optimizer, closure)
        return super().optimizer_step(optimizer, wrapped, model, **kwargs)

    def _grad_params(self, optimizer) -> list[torch.nn.Parameter]:
        seen, params = set(), []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def _reducing_closure(self, optimizer, closure: Callable[[], Any]) -> Any:
        """Runs (or, when the step is already reduced, skips) forward/backward, then the coded reduce."""
        self._closure_calls += 1
        if self._closure_calls > 1:
            raise RuntimeError("the optimizer called its closure more than once in one step (e.g. LBFGS); "
                               "CodedReduceStrategy reduces exactly once per optimizer step and does not support it")
        reducer, step = self.reducer, self._reduce_step
        automatic = self.lightning_module.automatic_optimization
        params = self._grad_params(optimizer)
        skipped = automatic and self._catching_up()
        if skipped:  # catch-up: the others reduced this step without us; apply it, do not compute
            out: Any = torch.zeros((), device=self.root_device)  # not None: AMP would skip the update
            if self._logged_epoch != self._trainer.current_epoch:
                self._log_only = True  # the closure runs training_step as _log_only_step
                try:
                    out = closure()
                finally:
                    self._log_only = False
            else:
                self._lightning.mark_closure_skipped(closure)
            flat = reducer.result(step)
            compute = None
        else:
            t0 = time.perf_counter()
            self._in_closure = True
            try:
                out = closure()
            finally:
                self._in_closure = False
            t1 = time.perf_counter()
            if automatic:
                compute = t1 - t0 + self._micro_compute
            else:  # the forward/backward ran in training_step before optimizer.step()
                compute = t1 - (self._manual_t0 if self._manual_t0 is not None else t0)
            flat = reducer.reduce(step, self._local_gradient(params))
        self._touched.reset()
        self._write_gradients(params, flat)
        self._manual_t0 = time.perf_counter()
        self._micro_compute = 0.0
        self._reduce_step = step + 1
        self.step_records.append({"step": step, "compute_s": compute, "skipped": bool(skipped)})
        return out

    def _local_gradient(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """This rank's share of the global-batch mean gradient, flat, then one flag per parameter (1: backward reached it).

        Automatic optimization weighted the losses already (module docstring, step 2). Manual optimization
        back-propagated the mean loss over this rank's share: scale it by ``share / B_t``.
        """
        if self.lightning_module.automatic_optimization:
            scale = 1.0
        else:
            pieces = self.sampler.pieces(self._batch_idx)
            scale = sum(p.weight * len(p) for p in pieces) / self.sampler.step_size(self._batch_idx)
        touched = [self._touched.touched(p) and p.grad is not None for p in params]
        grads = [(p.grad if t else torch.zeros_like(p)).detach().reshape(-1) for p, t in zip(params, touched)]
        if not grads:  # nothing trainable (all frozen): still one (empty-valued) reduce per step, in step with the others
            return torch.zeros(1, device=self.root_device)
        flat = torch.cat(grads)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # half-precision messages would lose the sum's precision (and decode worse)
        if scale != 1.0:
            flat.mul_(scale)
        flags = torch.tensor([1.0 if t else 0.0 for t in touched], dtype=flat.dtype, device=flat.device)
        return torch.cat([flat, flags])

    @staticmethod
    def _write_gradients(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
        """Write the reduced gradient back; a parameter whose flags summed to 0 (backward reached it on no
        contributing rank) keeps its ``.grad`` as it was, as under DDP."""
        if not params:
            return
        flags = flat[-len(params):]
        offset = 0
        for p, flag in zip(params, flags.tolist()):
            part = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if flag == 0.0:
                continue
            if p.grad is None:
                p.grad = part.to(device=p.device, dtype=p.dtype).clone()
            else:
                p.grad.copy_(part)


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
