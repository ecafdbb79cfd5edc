"""Gradient aggregation: the optimizer closure wrapped around the coded reduce, catch-up, weighted chunks."""
from __future__ import annotations

import sys
import time
from functools import partial
from typing import Any, Callable

import torch
from lightning_utilities.core.apply_func import apply_to_collection

# gradient dtypes the reduce carries (half precision is reduced in float32)
_REDUCIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        if lm.automatic_optimization and not self._in_closure:
            # an accumulation micro-batch: if the step is already reduced, its gradient is not needed
            self._micro_t0 = time.perf_counter()
            if reducer.ready(self._reduce_step):
                self._micro_t0 = None
                return torch.zeros((), device=self.root_device, requires_grad=True)
        if self.sampler.uniform_weights or not args:
            return super().training_step(*args, **kwargs)
        return self._chunked_training_step(*args, **kwargs)

    def _chunked_training_step(self, batch: Any, *rest: Any, **kwargs: Any):
        """Non-0/1 codes: one call of the module per equal-weight chunk, losses combined with the weights.

        ``training_step`` must return the mean loss over the samples it was given; the combined loss
        is ``sum(weight_c * len_c / b * loss_c)`` over the chunks (b: this rank's samples per step).
        """
        b = sum(length for length, _ in self.sampler.chunks)
        per_sample = []
        apply_to_collection(batch, torch.Tensor, lambda t: per_sample.append(t.dim() > 0 and t.shape[0] == b))
        if not any(per_sample):
            raise ValueError(
                f"the CodedReduce code of this plan weights this rank's {b} samples unequally, so the strategy splits "
                f"the batch into chunks, but the batch holds no tensor whose first dimension is {b} (got "
                f"{type(batch).__name__}). Use code='frc' (all weights 1), or batches of tensors")
        loss, out, start = None, None, 0
        for length, weight in self.sampler.chunks:
            stop = start + length
            part = apply_to_collection(batch, torch.Tensor,
                                       lambda t, s=start, e=stop: t[s:e] if t.dim() > 0 and t.shape[0] == b else t)
            out = super().training_step(part, *rest, **kwargs)
            value = out.get("loss") if isinstance(out, dict) else out
            if not isinstance(value, torch.Tensor):
                raise ValueError("with a CodedReduce code whose weights are not all 1, training_step must return the "
                                 "loss tensor (or a dict with 'loss'); use code='frc' to return something else")
            term = value * (weight * length / b)
            loss = term if loss is None else loss + term
            start = stop
        if isinstance(out, dict):
            return {**out, "loss": loss}
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        accumulate = max(1, int(getattr(self._trainer, "accumulate_grad_batches", 1)))
        if batch_idx % accumulate == 0:
            self._micro_compute = 0.0
        self._manual_t0 = time.perf_counter()  # manual optimization: compute runs from here to optimizer.step()
        super().on_train_batch_start(batch, batch_idx)

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
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
        skipped = automatic and reducer.ready(step)
        if skipped:  # catch-up: the others reduced this step without us; apply it, do not compute
            self._mark_closure_skipped(closure)
            flat = reducer.result(step)
            out: Any = torch.zeros((), device=self.root_device)  # not None: AMP would skip the update
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
        self._write_gradients(params, flat)
        self._manual_t0 = time.perf_counter()
        self._micro_compute = 0.0
        self._reduce_step = step + 1
        self.step_records.append({"step": step, "compute_s": compute, "skipped": bool(skipped)})
        return out

    def _local_gradient(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """This rank's weighted share of the global-batch mean gradient, flat.

        The loss is a mean over this rank's b samples (chunks already weighted), so ``grad * b / B``
        summed (decoded) over the tree is the mean over the global batch of B samples.
        """
        b = len(self.sampler.sample_weights)
        scale = b / self.global_batch_size
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params]
        if not grads:  # nothing trainable (all frozen): still one (empty-valued) reduce per step, in step with the others
            return torch.zeros(1, device=self.root_device)
        flat = torch.cat(grads)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # half-precision messages would lose the sum's precision (and decode worse)
        return flat.mul_(scale) if scale != 1.0 else flat

    @staticmethod
    def _write_gradients(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
        offset = 0
        for p in params:
            part = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.to(device=p.device, dtype=p.dtype).clone()
            else:
                p.grad.copy_(part)

    @staticmethod
    def _mark_closure_skipped(closure: Any) -> None:
        """Lightning's automatic loop reads the closure's result after the step (``consume_result``) and
        raises "The closure hasn't been executed" when there is none: give it an empty one (loss None:
        the batch's output is ``{}``, as for a skipped step)."""
        if not hasattr(closure, "_result"):
            return
        module = sys.modules.get(type(closure).__module__)
        result_cls = getattr(module, "ClosureResult", None)
        if result_cls is not None:
            closure._result = result_cls(None)

