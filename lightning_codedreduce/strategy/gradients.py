"""Gradient bookkeeping for the reduce: which parameters backward reached, gradients held across
Lightning's ``zero_grad``, and the flat message (gradients, then one flag per parameter) the tree sums."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..engine.buckets import BucketLayout

# gradient dtypes the reduce carries (half precision is reduced in float32)
_REDUCIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class HeldGradients:
    """The gradients of a micro-batch's earlier pieces, held while Lightning zeroes ``.grad`` (its closure
    runs ``training_step``, then ``zero_grad``, then ``backward``) and put back before its backward, which then accumulates into them."""

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
        self.on_gradient: Optional[Callable[[torch.nn.Parameter], None]] = None  # called after each accumulation

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        self.detach()
        for p in params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._reached))

    def _reached(self, p: torch.nn.Parameter) -> None:
        self._touched.add(id(p))
        if self.on_gradient is not None:
            self.on_gradient(p)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._touched = [], set()

    def touched(self, p: torch.nn.Parameter) -> bool:
        return id(p) in self._touched

    def reset(self) -> None:
        self._touched = set()


def grad_params(optimizer: Any) -> list[torch.nn.Parameter]:
    """The optimizer's trainable parameters, each once, in its order (the same on every rank)."""
    seen, params = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def check_gradient_dtypes(module: torch.nn.Module, optimizers: list[Any]) -> None:
    """A clear error now for a parameter whose gradient the reduce cannot carry (complex, integer)."""
    names = {id(p): n for n, p in module.named_parameters()}
    for optimizer in optimizers:
        for p in grad_params(optimizer):
            if p.dtype not in _REDUCIBLE:
                raise ValueError(
                    f"parameter {names.get(id(p), '?')} is {p.dtype}; CodedReduce reduces float16, bfloat16, float32 "
                    "and float64 gradients. Set requires_grad=False on it (or keep it as a buffer), or store "
                    "complex values as real pairs (torch.view_as_real)")


def flat_gradient(params: list[torch.nn.Parameter], touched: TouchedParameters, scale: float,
                  device: torch.device, mass: float = 1.0) -> torch.Tensor:
    """The gradients times ``scale``, flat, then one flag per parameter: ``mass`` where backward reached it, else 0.

    ``mass``: this rank's coded share of the step (``sum(weight * samples) / step size``). Flags are decoded
    with the gradients, so the decoded flag is the share of the step whose ranks reached the parameter: 1
    when every contributing rank did. A flag of 1 per rank would decode to ``sum`` of the decoding
    coefficients, which is 0 for some arrival sets of a coded root (e.g. -0.5 and 0.5)."""
    reached = [touched.touched(p) and p.grad is not None for p in params]
    grads = [(p.grad if t else torch.zeros_like(p)).detach().reshape(-1) for p, t in zip(params, reached)]
    if not grads:  # nothing trainable (all frozen): still one (empty-valued) reduce per step, in step with the others
        return torch.zeros(1, device=device)
    flat = torch.cat(grads)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # half-precision messages would lose the sum's precision (and decode worse)
    if scale != 1.0:
        flat.mul_(scale)
    flags = torch.tensor([mass if t else 0.0 for t in reached], dtype=flat.dtype, device=flat.device)
    return torch.cat([flat, flags])


def message_dtype(params: list[torch.nn.Parameter]) -> torch.dtype:
    """The reduced message's dtype (as :func:`flat_gradient` makes it): float64 if any gradient
    is, else float32 (half-precision gradients are reduced in float32)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def write_gradients(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
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


class GradientStream:
    """The step's message written while the stepping backward produces it, and handed to the reducer in
    buckets (``CodedReducer.begin`` / ``filled`` / ``finish``), so the balanced layout's chunks travel while
    backward goes on, as DDP's buckets do.

    Call order in one optimizer step: :meth:`start` before Lightning's last backward of the step (held
    pieces' gradients are back in ``.grad`` by then, so each parameter's hook sees its final gradient);
    :meth:`on_gradient` from the post-accumulate-grad hooks; :meth:`finish` after that backward. The
    message is :func:`flat_gradient`'s, bit for bit: parameters in the optimizer's order, then the flags.
    A bucket is the parameters (from the last, which backward reaches first) that add up to
    ``bucket_bytes`` (the first one to 1 MiB, as DDP's, so communication starts early); it is handed in
    when all of its gradients are written. Parameters backward did not
    reach in that pass (unused ones, or ones only earlier pieces reached) are written at :meth:`finish`.
    """

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = bucket_bytes
        self._layout_key: Optional[tuple[int, ...]] = None  # id() of the parameters the layout below is for
        self._offsets: dict[int, tuple[int, int, int]] = {}  # id(param) -> (start, stop, bucket)
        self._buckets: list[tuple[int, int, int]] = []  # (start, stop, parameters in it)
        self._params: list[torch.nn.Parameter] = []
        self._reducer: Any = None  # the reducer the step was begun on (None: no step streaming)
        self._step = -1
        self._flat: Optional[torch.Tensor] = None
        self._left: list[int] = []  # per bucket: parameters not written yet
        self._written: set[int] = set()  # id() of parameters written this step
        self.early_buckets = 0  # buckets of the current (or last) step handed in while backward ran

    @property
    def active(self) -> bool:
        return self._reducer is not None

    def _plan_buckets(self, params: list[torch.nn.Parameter]) -> None:
        key = tuple(id(p) for p in params)
        if key == self._layout_key:
            return
        layout = BucketLayout.of(params, self.bucket_bytes)
        self._offsets = {id(p): slot for p, slot in zip(params, layout.slots)}
        self._buckets = list(layout.buckets)
        self._layout_key, self._params = key, params

    def start(self, reducer: Any, step: int, params: list[torch.nn.Parameter], dtype: torch.dtype) -> None:
        self._plan_buckets(params)
        total = sum(p.numel() for p in params)
        self._flat = torch.empty(total + len(params), dtype=dtype)
        self._left = [count for _, _, count in self._buckets]
        self._written, self.early_buckets = set(), 0
        reducer.begin(step, self._flat, segments=[(lo, hi) for lo, hi, _ in self._buckets])  # the ring's order
        self._reducer, self._step = reducer, step

    def on_gradient(self, p: torch.nn.Parameter) -> None:
        """A parameter's gradient is final for this step: write it, hand in its bucket once complete."""
        where = self._offsets.get(id(p)) if self._reducer is not None else None
        if where is None or p.grad is None or id(p) in self._written:
            return
        lo, hi, bucket = where
        self._flat[lo:hi].copy_(p.grad.detach().reshape(-1))
        self._written.add(id(p))
        self._left[bucket] -= 1
        if self._left[bucket] == 0:
            start, stop, _ = self._buckets[bucket]
            self._reducer.filled(self._step, start, stop)
            self.early_buckets += 1

    def finish(self, touched: "TouchedParameters", mass: float = 1.0) -> torch.Tensor:
        """Write what backward did not reach in the streamed pass, and the flags (``flat_gradient``'s); wait for
        the sum."""
        flat, n = self._flat, len(self._params)
        for i, p in enumerate(self._params):
            lo, hi, _ = self._offsets[id(p)]
            reached = touched.touched(p) and p.grad is not None
            if id(p) not in self._written:
                if reached:
                    flat[lo:hi].copy_(p.grad.detach().reshape(-1))
                else:
                    flat[lo:hi].zero_()
            flat[flat.numel() - n + i] = mass if reached else 0.0
        reducer, step = self._reducer, self._step
        self.cancel()
        return reducer.finish(step)

    def cancel(self) -> None:
        """Forget the step (after :meth:`finish`, or when its backward never came)."""
        self._reducer, self._flat, self._written = None, None, set()
