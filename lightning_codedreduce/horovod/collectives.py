"""Horovod's collectives on metrics and state, over the reducer's tree collectives.

Every call is one ``CodedReducer.all_gather_object``: it travels the plan's tree and waits only for live
ranks, so a metric's ``allreduce`` after a tolerated death still returns on every survivor (averages are
then over the survivors). Horovod matches collectives by name; here, as in ``torch.distributed``, every
rank must call them in the same order (``name`` is accepted and unused). These are for metrics and state,
not for gradients: every rank's whole tensor travels to every rank.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from typing import Any, Optional

import torch

from .runtime import current


class ReduceOp(enum.IntEnum):
    """Horovod's reduction operations (``hvd.Average``, ``hvd.Sum``, ...)."""

    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


class _GlobalProcessSet:
    """``hvd.global_process_set``: all ranks, the only process set CodedReduce has."""

    def __repr__(self) -> str:
        return "global_process_set"


global_process_set = _GlobalProcessSet()


class Compression:
    """``hvd.Compression``: only ``none`` is offered (see :func:`check_compression`)."""

    class none:  # noqa: N801 - Horovod's spelling
        """No compression."""

    class fp16:  # noqa: N801 - Horovod's spelling
        """Horovod's fp16 compression: refused here."""


def check_compression(compression: Any) -> None:
    if compression is Compression.none or compression is None:
        return
    raise ValueError(f"compression={getattr(compression, '__name__', compression)!r} is not supported: the coded reduce "
                     "decodes exact sums (its codes have coefficients like 2 and -1), and a lossy message would "
                     "lose that exactness; use compression=hvd.Compression.none")


def check_process_set(process_set: Any) -> None:
    if process_set is None or process_set is global_process_set:
        return
    raise ValueError("process sets are not supported: CodedReduce codes the data of all ranks together; leave "
                     "process_set at its default (hvd.global_process_set)")


def resolve_op(average: Optional[bool], op: Optional[int], *, gradients: bool = False) -> ReduceOp:
    """Horovod's ``average``/``op`` pair as one operation (``average`` is its deprecated spelling)."""
    if average is not None and op is not None:
        raise ValueError("op and average cannot both be given; use op=hvd.Average or op=hvd.Sum")
    chosen = ReduceOp.Average if (op is None and average in (None, True)) else (
        ReduceOp.Sum if op is None else ReduceOp(int(op)))
    if chosen == ReduceOp.Adasum:
        raise ValueError("op=hvd.Adasum is not supported: Adasum combines gradients adaptively, which a coded sum "
                         "cannot decode; use op=hvd.Average (the default) or op=hvd.Sum")
    if gradients and chosen not in (ReduceOp.Average, ReduceOp.Sum):
        raise ValueError(f"op=hvd.{chosen.name} is not supported for gradients: the coded reduce decodes sums; use "
                         "op=hvd.Average (the default) or op=hvd.Sum")
    return chosen


def _gather(value: Any) -> list[Any]:
    """``value`` of every live rank, in rank order."""
    values, _dead = current().reducer.all_gather_object(value)
    return [values[r] for r in sorted(values)]


def _from_root(value: Any, root_rank: int) -> Any:
    rt = current()
    if not 0 <= root_rank < rt.info.size:
        raise ValueError(f"root_rank={root_rank} is not a rank of this job (0..{rt.info.size - 1})")
    values, dead = rt.reducer.all_gather_object(value if rt.info.rank == root_rank else None)
    if root_rank not in values:
        raise RuntimeError(f"cannot broadcast from rank {root_rank}: it is dead ({sorted(dead)} died); broadcast from "
                           "a live rank")
    return values[root_rank]


def allreduce(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
              compression: Any = Compression.none, op: Optional[int] = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set: Any = global_process_set) -> torch.Tensor:
    """The reduction of ``tensor`` over the live ranks (default: the average), as a new tensor."""
    check_compression(compression)
    check_process_set(process_set)
    chosen = resolve_op(average, op)
    local = tensor.detach().cpu()
    if prescale_factor != 1.0:
        local = local * prescale_factor
    parts = _gather(local)
    if chosen in (ReduceOp.Average, ReduceOp.Sum):
        out = parts[0].clone()
        for part in parts[1:]:
            out += part
        if chosen == ReduceOp.Average:
            out = out / len(parts) if out.is_floating_point() or out.is_complex() else out // len(parts)
    else:
        combine = {ReduceOp.Min: torch.minimum, ReduceOp.Max: torch.maximum, ReduceOp.Product: torch.mul}[chosen]
        out = parts[0].clone()
        for part in parts[1:]:
            out = combine(out, part)
    if postscale_factor != 1.0:
        out = out * postscale_factor
    return out.to(device=tensor.device, dtype=tensor.dtype)


def allreduce_(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
               op: Optional[int] = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: Any = global_process_set) -> torch.Tensor:
    """In-place :func:`allreduce`."""
    out = allreduce(tensor, average, name, Compression.none, op, prescale_factor, postscale_factor, process_set)
    with torch.no_grad():
        tensor.copy_(out)
    return tensor


def allgather(tensor: torch.Tensor, name: Optional[str] = None, process_set: Any = global_process_set) -> torch.Tensor:
    """The live ranks' tensors concatenated along dimension 0 in rank order (first dimensions may differ)."""
    check_process_set(process_set)
    parts = _gather(tensor.detach().cpu())
    return torch.cat(parts, 0).to(tensor.device)


def allgather_object(obj: Any, name: Optional[str] = None, process_set: Any = global_process_set) -> list[Any]:
    """Every live rank's ``obj`` (picklable), in rank order."""
    check_process_set(process_set)
    return _gather(obj)


def broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
              process_set: Any = global_process_set) -> torch.Tensor:
    """``root_rank``'s ``tensor``, as a new tensor on every rank."""
    check_process_set(process_set)
    value = _from_root(tensor.detach().cpu(), root_rank)
    return value.to(device=tensor.device, dtype=tensor.dtype)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
               process_set: Any = global_process_set) -> torch.Tensor:
    """In-place :func:`broadcast`."""
    out = broadcast(tensor, root_rank, name, process_set)
    with torch.no_grad():
        tensor.copy_(out)
    return tensor


def broadcast_object(obj: Any, root_rank: int = 0, name: Optional[str] = None,
                     process_set: Any = global_process_set) -> Any:
    """``root_rank``'s ``obj`` (picklable) on every rank."""
    check_process_set(process_set)
    return _from_root(obj, root_rank)


def broadcast_parameters(params: Any, root_rank: int, prefix: Optional[str] = None) -> None:
    """Copy ``root_rank``'s parameters (a ``state_dict()`` or ``named_parameters()``) into every rank's, in place."""
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, Iterable) and not isinstance(params, torch.Tensor):  # named_parameters() or parameters()
        items = [item if isinstance(item, tuple) and len(item) == 2 else (i, item) for i, item in enumerate(params)]
    else:
        raise ValueError(f"invalid params of type {type(params).__name__}; pass model.state_dict() or "
                         "model.named_parameters()")
    tensors = [(k, v) for k, v in items if isinstance(v, torch.Tensor)]
    root = _from_root({k: v.detach().cpu() for k, v in tensors}, root_rank)
    with torch.no_grad():
        for k, v in tensors:
            v.copy_(root[k])


def barrier(process_set: Any = global_process_set) -> None:
    """Wait until every live rank has called it."""
    check_process_set(process_set)
    _gather(None)


def join(device: int = -1) -> int:
    """Wait until every live rank has joined; returns the rank that joined last.

    Under Horovod a rank that runs out of data joins early and contributes zeros to the others' reduces.
    ``hvd.DistributedSampler`` gives every rank the same number of steps, so here ``join`` is a barrier.
    """
    times = current().reducer.all_gather_object(time.time())[0]
    return max(times, key=lambda r: (times[r], r))
