"""Gradient bookkeeping for the reduce: which parameters backward reached, gradients held across
Lightning's ``zero_grad``, and the flat message (gradients, then one flag per parameter) the tree sums."""
from __future__ import annotations

from typing import Any, Optional

import torch

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
                  device: torch.device) -> torch.Tensor:
    """The gradients times ``scale``, flat, then one flag per parameter (1: backward reached it)."""
    reached = [touched.touched(p) and p.grad is not None for p in params]
    grads = [(p.grad if t else torch.zeros_like(p)).detach().reshape(-1) for p, t in zip(params, reached)]
    if not grads:  # nothing trainable (all frozen): still one (empty-valued) reduce per step, in step with the others
        return torch.zeros(1, device=device)
    flat = torch.cat(grads)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # half-precision messages would lose the sum's precision (and decode worse)
    if scale != 1.0:
        flat.mul_(scale)
    flags = torch.tensor([1.0 if t else 0.0 for t in reached], dtype=flat.dtype, device=flat.device)
    return torch.cat([flat, flags])


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
