"""Horovod's PyTorch API over the coded reduce: ``import lightning_codedreduce.horovod as hvd``.

A ``horovod.torch`` training script moves over by changing its import and its training sampler::

    import lightning_codedreduce.horovod as hvd
    hvd.init()
    sampler = hvd.DistributedSampler(train_dataset, batch_size=args.batch_size)  # was torch's DistributedSampler
    loader = DataLoader(train_dataset, batch_size=args.batch_size, sampler=sampler)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

It runs under ``horovodrun -np N --gloo``, ``torchrun`` and ``mpirun``. Every rank computes a coded share
of the same global batch Horovod's script would (``batch_size`` per rank, ``size()`` ranks), the reduce
waits only for the fastest ranks whose messages determine the exact sum, and the optimizer applies the
same average Horovod's would. The plan is set by ``init``'s keywords or ``CODEDREDUCE_*`` variables
(:mod:`.runtime`). The README's "Moving a Horovod script" lists what differs.
"""
from __future__ import annotations

from .collectives import (Compression, ReduceOp, allgather, allgather_object, allreduce, allreduce_, barrier,
                          broadcast, broadcast_, broadcast_object, broadcast_parameters, global_process_set, join)
from .optimizer import DistributedOptimizer, broadcast_optimizer_state
from .runtime import current, init, is_initialized, shutdown
from .sampler import DistributedSampler

Average, Sum, Adasum, Min, Max, Product = (ReduceOp.Average, ReduceOp.Sum, ReduceOp.Adasum, ReduceOp.Min,
                                           ReduceOp.Max, ReduceOp.Product)


def rank() -> int:
    return current().info.rank


def size() -> int:
    return current().info.size


def local_rank() -> int:
    return current().info.local_rank


def local_size() -> int:
    return current().info.local_size


def cross_rank() -> int:
    return current().info.cross_rank


def cross_size() -> int:
    return current().info.cross_size


def is_homogeneous() -> bool:
    info = current().info
    return info.local_size * info.cross_size == info.size


def gloo_enabled() -> bool:
    return True


def mpi_enabled() -> bool:
    return False


def nccl_built() -> bool:
    return False


def plan():
    """The :class:`~lightning_codedreduce.plan.CodedReducePlan` every rank runs (``print(hvd.plan().describe())``)."""
    return current().plan


def skipped_steps() -> int:
    """Steps this rank applied without computing them: the others had reduced them while it was behind
    (CodedReduce's, not Horovod's)."""
    return current().feed.skipped


# Horovod names this module does not offer, and why (anything else unknown is a plain AttributeError)
_NOT_OFFERED = {
    **dict.fromkeys(("allreduce_async", "allreduce_async_", "allgather_async", "broadcast_async", "broadcast_async_",
                     "alltoall", "alltoall_async", "reducescatter", "reducescatter_async", "grouped_allreduce",
                     "grouped_allreduce_async", "synchronize", "poll"),
                    "asynchronous handles, all-to-all and reduce-scatter are not offered: use the blocking "
                    "collectives (allreduce, allgather, broadcast, broadcast_object), which survive a dead rank"),
    **dict.fromkeys(("ProcessSet", "add_process_set", "remove_process_set"),
                    "process sets are not supported: CodedReduce codes the data of all ranks together"),
    **dict.fromkeys(("SyncBatchNorm",), "SyncBatchNorm needs every rank in every forward pass, which a straggler-"
                    "tolerant reduce does not wait for; use BatchNorm (statistics per rank, as under DDP)"),
    **dict.fromkeys(("elastic",), "elastic Horovod is not supported: the coded allocation is for a fixed world"),
}


def __getattr__(name: str):
    if name in _NOT_OFFERED:
        raise AttributeError(f"lightning_codedreduce.horovod.{name}: {_NOT_OFFERED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Adasum", "Average", "Compression", "DistributedOptimizer", "DistributedSampler", "Max", "Min", "Product",
           "Sum", "allgather", "allgather_object", "allreduce", "allreduce_", "barrier", "broadcast", "broadcast_",
           "broadcast_object", "broadcast_optimizer_state", "broadcast_parameters", "cross_rank", "cross_size",
           "gloo_enabled", "global_process_set", "init", "is_homogeneous", "is_initialized", "join", "local_rank",
           "local_size", "mpi_enabled", "nccl_built", "plan", "rank", "shutdown", "size", "skipped_steps"]
