"""The process-wide state behind ``lightning_codedreduce.horovod``: who this process is, the plan, the reducer.

``hvd.init()`` creates one :class:`Runtime`; every other call of the API reads it through :func:`current`.
The reducer carries both the training gradients (``DistributedOptimizer``) and the collectives on metrics
and state (``allreduce``, ``broadcast_object``, ...), which travel its tree and wait only for live ranks.

The plan is configured by ``init``'s keywords or, so that a Horovod script moves over unchanged, by
environment variables: ``CODEDREDUCE_STRAGGLERS`` (default 1), ``CODEDREDUCE_BRANCHING`` (3),
``CODEDREDUCE_LAYOUT`` (``tree``: it survives a dead leaf; ``balanced`` is faster for large gradients but
stops every rank when one dies) and ``CODEDREDUCE_TIMEOUT`` (seconds of silence before a peer counts as
dead, default 30).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from ..engine import CodedReducer
from ..environments import LaunchInfo, launch_info
from ..plan import CodedReducePlan
from .feed import PieceFeed


@dataclass
class Runtime:
    """One per process, from ``init`` to ``shutdown``."""

    info: LaunchInfo  # rank, size and layout as the launcher set them
    plan: CodedReducePlan  # the same on every rank (the reducer checks)
    reducer: CodedReducer  # gradients and control collectives
    owns_process_group: bool  # init() created the default process group, so shutdown() destroys it
    feed: PieceFeed  # loader batches between hvd.DistributedSampler and hvd.DistributedOptimizer


_RUNTIME: Optional[Runtime] = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def init(comm: Any = None, process_sets: Any = None, *, stragglers: Optional[int] = None,
         branching: Optional[int] = None, layout: Optional[str] = None, timeout: Optional[float] = None,
         coded_self: Optional[str] = None) -> None:
    """Join the job: read the launcher's variables, initialise ``torch.distributed`` (gloo) unless it is,
    build the plan and start the reducer. Collective: every rank calls it. A second call does nothing.
    Options left at None come from ``CODEDREDUCE_STRAGGLERS``, ``_BRANCHING``, ``_LAYOUT``, ``_TIMEOUT`` and
    ``_CODED_SELF`` (the tree: ``root`` codes rank 0's own compute, so a slow rank 0 is tolerated)."""
    global _RUNTIME
    if comm is not None:
        raise ValueError("hvd.init(comm=...) selects an MPI communicator; CodedReduce runs over torch.distributed "
                         "(gloo) on all ranks the launcher started. Call hvd.init() without comm")
    if process_sets is not None:
        raise ValueError("process sets are not supported: CodedReduce codes the data of all ranks together, so a "
                         "reduce over a subset would not decode. Call hvd.init() without process_sets")
    if _RUNTIME is not None:
        return
    s = _env_int("CODEDREDUCE_STRAGGLERS", 1) if stragglers is None else stragglers
    n = _env_int("CODEDREDUCE_BRANCHING", 3) if branching is None else branching
    lay = (os.environ.get("CODEDREDUCE_LAYOUT") or "tree") if layout is None else layout
    if lay not in ("tree", "balanced"):
        raise ValueError(f"layout must be 'tree' or 'balanced', got {lay!r} (the Horovod API fixes it at init, before "
                         "the gradient size is known; 'balanced' suits gradients of several MB)")
    wait = float(os.environ.get("CODEDREDUCE_TIMEOUT") or 30.0) if timeout is None else timeout
    own = (os.environ.get("CODEDREDUCE_CODED_SELF") or "none") if coded_self is None else coded_self
    info = launch_info()
    owns = not dist.is_initialized()
    if not owns and info.launcher == "single":  # the script initialised torch.distributed itself: its ranks
        world = dist.get_world_size()
        info = LaunchInfo("torch.distributed", dist.get_rank(), world, dist.get_rank(), world, 0, 1)
    plan = CodedReducePlan(info.size, n, s if info.size > 1 else 0, layout=lay, coded_self=own)  # bad values: the plan's errors
    if owns:
        addr, port = info.main_address()
        os.environ.setdefault("MASTER_ADDR", addr)
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("gloo", rank=info.rank, world_size=info.size)
    elif (dist.get_rank(), dist.get_world_size()) != (info.rank, info.size):
        raise RuntimeError(f"torch.distributed is initialised as rank {dist.get_rank()} of {dist.get_world_size()}, but "
                           f"the launcher ({info.launcher}) says rank {info.rank} of {info.size}")
    uncoded = all(len(shards) == 1 and len(shards[0]) == 1 and shards[0].weight == 1.0
                  for shards in plan.allocation(plan.world_size))
    _RUNTIME = Runtime(info, plan, CodedReducer(plan, timeout=wait), owns, PieceFeed(uncoded))
    atexit.register(shutdown)


def current() -> Runtime:
    """The runtime ``init`` created; a clear error before it."""
    if _RUNTIME is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return _RUNTIME


def is_initialized() -> bool:
    return _RUNTIME is not None


def shutdown() -> None:
    """Stop the reducer (a lagging peer still gets every result first) and leave the process group."""
    global _RUNTIME
    rt, _RUNTIME = _RUNTIME, None
    if rt is None:
        return
    rt.reducer.close()
    rt.reducer.wait_for_peers(rt.reducer.timeout)
    if rt.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
