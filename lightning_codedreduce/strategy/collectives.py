"""Lightning's collectives (barrier, broadcast, sync_dist, decisions) for CodedReduceStrategy.

While ``fit`` trains (the reducer is open) every collective Lightning calls travels the reduce tree
(:meth:`CodedReducer.all_gather_object`), which waits only for live ranks: a rank that dies just before
an epoch-end checkpoint, an early-stopping decision or an epoch-end ``sync_dist`` does not stop the
survivors, and each result carries the dead set, the same on every survivor (``_known_dead``).
Reductions over the tree combine the survivors' values in rank order, so every rank gets the same bits.

Outside ``fit`` (set-up, sanity check, ``trainer.validate``, ``trainer.save_checkpoint`` afterwards)
they are Lightning's default-group collectives; once a rank is known dead they run locally instead
(barriers skipped, broadcasts keep the local value), because the default group still counts the dead rank.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..engine import CodedReduceError
from ._common import log

# hooks that run once per training batch: a collective there waits for the slowest rank every step
_PER_STEP_HOOKS = frozenset({
    "training_step", "on_train_batch_start", "on_train_batch_end", "on_before_backward", "backward",
    "on_after_backward", "on_before_optimizer_step", "optimizer_step", "on_before_zero_grad",
    "optimizer_zero_grad", "configure_gradient_clipping", "lr_scheduler_step",
})
_OPS = {"sum": "sum", "mean": "mean", "avg": "mean", "max": "max", "min": "min", "product": "product",
        "prod": "product"}


def _op_name(reduce_op: Any) -> str:
    """Lightning's ``reduce_op`` (a string or a ``ReduceOp``; None means sum) as one of ``_OPS``' values."""
    if reduce_op is None:
        return "sum"
    if isinstance(reduce_op, str):
        name = reduce_op.lower()
    else:
        ops = dist.ReduceOp
        name = next((n for n in ("SUM", "AVG", "MAX", "MIN", "PRODUCT") if reduce_op == getattr(ops, n)), "")
        name = name.lower()
    if name not in _OPS:
        raise ValueError(f"CodedReduceStrategy.reduce supports reduce_op 'sum', 'mean', 'max', 'min' and 'product' "
                         f"(or the matching torch.distributed.ReduceOp), got {reduce_op!r}")
    return _OPS[name]


def combine(values: list[torch.Tensor], reduce_op: Any) -> torch.Tensor:
    """The reduction of equally shaped tensors, in the given order (every rank passes the same order)."""
    op = _op_name(reduce_op)
    stacked = torch.stack(values)
    if op in ("sum", "mean"):
        out = stacked.sum(0)
        return out / len(values) if op == "mean" else out
    if op == "product":
        return stacked.prod(0)
    return stacked.amax(0) if op == "max" else stacked.amin(0)


class CollectivesMixin:
    """Lightning's collectives, over the reduce tree while ``fit`` trains (see the module docstring)."""

    def _tree_gather(self, obj: Any) -> dict[int, Any]:
        """Every surviving rank's ``obj`` (``{rank: obj}``) through the reduce tree; learns who died."""
        values, dead = self.reducer.all_gather_object(obj)
        if dead - self._known_dead:
            self._known_dead |= dead
            log.info(f"[rank {self.global_rank}] CodedReduce: rank(s) {sorted(dead)} died; collectives go on without them")
        return values

    def _all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (the survivors' only, through the tree, during fit)."""
        if self.reducer is not None:
            values = self._tree_gather(obj)
            return [values[r] for r in sorted(values)]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, obj)
        return every

    def _dead_ranks(self) -> set[int]:
        """Ranks every survivor knows to be dead once it has applied the same steps (empty: all alive)."""
        reducer = self.reducer
        if reducer is not None:
            self._known_dead |= reducer.agreed_dead(self._reduce_step - 1)
        return self._known_dead

    def _warn_degraded(self, what: str) -> None:
        if "degraded" not in self._warned:
            self._warned.add("degraded")
            if self.global_rank != 0:  # rank 0 always survives a tolerated death (the root is needed)
                return
            warnings.warn(f"CodedReduce: rank(s) {sorted(self._known_dead)} died during fit; after fit Lightning's "
                          f"collectives ({what} and others: barriers, broadcasts, sync_dist, reduce_boolean_decision) "
                          "run locally on each surviving rank", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ Lightning's collectives
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self.reducer is not None:
            self._tree_gather(None)
            return
        if self._dead_ranks():
            log.debug(f"[rank {self.global_rank}] barrier skipped: rank(s) {sorted(self._known_dead)} died")
            return
        return super().barrier(*args, **kwargs)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.reducer is not None:
            values = self._tree_gather(obj if self.global_rank == src else None)
            if src not in values:
                raise CodedReduceError(f"cannot broadcast from rank {src}: it died during training")
            return obj if self.global_rank == src else values[src]
        dead = self._dead_ranks()
        if dead:
            if src in dead:
                raise CodedReduceError(f"cannot broadcast from rank {src}: it died during training")
            self._warn_degraded("broadcast")
            return obj
        return super().broadcast(obj, src)

    def all_gather(self, tensor, group: Optional[Any] = None, sync_grads: bool = False):
        if self.reducer is not None and group is None and not sync_grads and isinstance(tensor, torch.Tensor):
            values = self._tree_gather(tensor.detach().contiguous().cpu())
            if len(values) == self.world_size:
                return torch.stack([values[r] for r in range(self.world_size)]).to(tensor.device)
        if self._dead_ranks():
            raise CodedReduceError(f"all_gather needs every rank, but rank(s) {sorted(self._known_dead)} died during "
                                   "training; gather before training ends or skip it when trainer.strategy._known_dead "
                                   "is not empty")
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def reduce(self, tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean"):
        if not isinstance(tensor, torch.Tensor):
            return tensor
        if self._sync_in_training_step_is_local():
            return tensor
        if self.reducer is not None and group is None:
            gathered = self._tree_gather(tensor.detach().cpu())
            values = [gathered[r] for r in sorted(gathered)]
            odd = [r for r in sorted(gathered) if not isinstance(gathered[r], torch.Tensor)
                   or gathered[r].shape != tensor.shape]
            if odd:
                raise CodedReduceError(
                    f"rank(s) {odd} were in another collective than rank {self.global_rank}'s reduce (sync_dist of a "
                    f"{tuple(tensor.shape)} tensor): the ranks logged different metrics with sync_dist=True. Log the "
                    "same names on every rank")
            out = combine(values, reduce_op).to(tensor.device, tensor.dtype)
            # in place and in the tensor's dtype, like Lightning's all-reduce (callers may keep the tensor)
            return out if tensor.requires_grad else tensor.copy_(out)
        if self._dead_ranks():
            self._warn_degraded("sync_dist")
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    def _sync_in_training_step_is_local(self) -> bool:
        """``self.log(..., sync_dist=True)`` in a per-step hook: warn (it waits for the slowest rank every step),
        and with a chunked plan do not synchronise at all (ranks run training_step different numbers of times)."""
        trainer, lm = self._trainer, self.lightning_module
        fx = self._lightning.current_hook(lm)
        if trainer is None or not trainer.training or self.reducer is None or fx not in _PER_STEP_HOOKS:
            return False
        if fx == "training_step":
            self._warn_once("sync_chunks", (
                "self.log(..., sync_dist=True, on_step=True) in training_step is not synchronised under CodedReduce: "
                "each rank runs training_step once per piece of its coded share (their numbers differ), so the "
                "ranks would wait for different numbers of all-reduces. Each rank logs its own value; use "
                "on_step=False, on_epoch=True (synchronised once at the epoch end)"))
            return True
        self._warn_once("sync_dist", (
            f"self.log(..., sync_dist=True) in {fx} all-reduces on every training step: every step then waits for "
            "the slowest rank, which undoes CodedReduce's straggler tolerance. Log the local value "
            "(sync_dist=False), or use on_step=False, on_epoch=True"))
        return False

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self.reducer is not None:
            votes = self._tree_gather(bool(decision)).values()
            return builtins_all(votes) if all else any(votes)
        if self._dead_ranks():
            return bool(decision)
        return super().reduce_boolean_decision(decision, all=all)

    # ------------------------------------------------------------------ identical parameters and buffers
    def _broadcast_module_states(self, buffers_only: bool = False) -> None:
        """Rank 0's parameters (at set-up) or buffers (before validation, at the end of training) to every rank."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        if self.reducer is None and self._dead_ranks():
            self._warn_degraded("buffer broadcast")
            return
        module = self.lightning_module
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers()]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        flats = [torch.cat([t.detach().reshape(-1) for t in group]) for group in groups.values()]
        if self.reducer is not None:  # during fit: through the tree, one message for all of them
            flats = self._tree_gather([f.cpu() for f in flats] if self.global_rank == 0 else None)[0]
        else:
            flats = [self._broadcast_flat(f) for f in flats]  # one broadcast per dtype/device, not per tensor
        for group, flat in zip(groups.values(), flats):
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    @staticmethod
    def _broadcast_flat(flat: torch.Tensor) -> torch.Tensor:
        if flat.dtype == torch.bool:  # not every backend broadcasts bool
            wire = flat.to(torch.uint8)
        elif flat.is_complex():
            wire = torch.view_as_real(flat).reshape(-1)
        else:
            wire = flat
        dist.broadcast(wire, src=0)
        if flat.is_complex():
            return torch.view_as_complex(wire.view(-1, 2))
        return wire

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.plan is not None and any(True for _ in self.lightning_module.buffers()):
            self._broadcast_module_states(buffers_only=True)


builtins_all = all  # ``reduce_boolean_decision`` has a parameter named ``all`` (Lightning's signature)
