"""Lightning's collectives (barrier, broadcast, sync_dist, decisions) for CodedReduceStrategy.

While ``fit`` trains (the reducer is open) every collective Lightning calls travels the reduce tree
(:meth:`CodedReducer.all_gather_object`), which waits only for live ranks: a rank that dies just before
an epoch-end checkpoint, an early-stopping decision or an epoch-end ``sync_dist`` does not stop the
survivors, and each result carries the dead set, the same on every survivor (``known_dead``).
Reductions over the tree combine the survivors' values in rank order, so every rank gets the same bits.

Outside ``fit`` (set-up, sanity check, ``trainer.validate``, ``trainer.save_checkpoint`` afterwards)
they are Lightning's default-group collectives; once a rank is known dead they run locally instead
(barriers skipped, broadcasts keep the local value), because the default group still counts the dead rank.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..engine import CodedReduceError
from ._common import FitContext, WarnOnce, log

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


class LightningCollectives:
    """Lightning's collectives, over the reduce tree while ``fit`` trains (see the module docstring).

    Active between :meth:`start` and :meth:`stop` (while the reducer is open). Each method takes Lightning's
    own collective as ``default``: what runs outside ``fit`` while every rank is alive.
    """

    def __init__(self, warn: WarnOnce) -> None:
        self._warn = warn
        self._reducer: Optional[Any] = None  # the open CodedReducer
        self._rank, self._world_size = 0, 1
        self._known_dead: set[int] = set()  # ranks that died (agreed by every survivor)

    def start(self, fit: FitContext) -> None:
        self._reducer, self._rank, self._world_size = fit.reducer, fit.rank, fit.world_size

    def stop(self) -> None:
        """The reducer closes: remember who died, so the collectives after fit avoid them."""
        self.dead_ranks()
        self._reducer = None

    @property
    def known_dead(self) -> frozenset[int]:
        """Ranks that died during a fit, the same on every survivor."""
        return frozenset(self._known_dead)

    def gather(self, obj: Any) -> dict[int, Any]:
        """Every surviving rank's ``obj`` (``{rank: obj}``) through the reduce tree; learns who died."""
        values, dead = self._reducer.all_gather_object(obj)
        if dead - self._known_dead:
            self._known_dead |= dead
            log.info(f"[rank {self._rank}] CodedReduce: rank(s) {sorted(dead)} died; collectives go on without them")
        return values

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (the survivors' only, through the tree, during fit)."""
        if self._reducer is not None:
            values = self.gather(obj)
            return [values[r] for r in sorted(values)]
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, obj)
        return every

    def dead_ranks(self) -> set[int]:
        """Ranks every survivor knows to be dead once it has applied the same steps (empty: all alive)."""
        reducer = self._reducer
        if reducer is not None:
            self._known_dead |= reducer.agreed_dead(reducer.next_step - 1)
        return self._known_dead

    def _warn_degraded(self, what: str) -> None:
        # rank 0 always survives a tolerated death (the root is needed), so it is the one that warns
        self._warn("degraded", f"CodedReduce: rank(s) {sorted(self._known_dead)} died during fit; after fit "
                               f"Lightning's collectives ({what} and others: barriers, broadcasts, sync_dist, "
                               "reduce_boolean_decision) run locally on each surviving rank")

    # ------------------------------------------------------------------ Lightning's collectives
    def barrier(self, default: Callable[[], Any]) -> None:
        if self._reducer is not None:
            self.gather(None)
            return
        if self.dead_ranks():
            log.debug(f"[rank {self._rank}] barrier skipped: rank(s) {sorted(self._known_dead)} died")
            return
        default()

    def broadcast(self, obj: Any, src: int, default: Callable[[], Any]) -> Any:
        if self._reducer is not None:
            values = self.gather(obj if self._rank == src else None)
            if src not in values:
                raise CodedReduceError(f"cannot broadcast from rank {src}: it died during training")
            return obj if self._rank == src else values[src]
        dead = self.dead_ranks()
        if dead:
            if src in dead:
                raise CodedReduceError(f"cannot broadcast from rank {src}: it died during training")
            self._warn_degraded("broadcast")
            return obj
        return default()

    def all_gather(self, tensor: Any, group: Optional[Any], sync_grads: bool, default: Callable[[], Any]) -> Any:
        if self._reducer is not None and group is None and not sync_grads and isinstance(tensor, torch.Tensor):
            values = self.gather(tensor.detach().contiguous().cpu())
            if len(values) == self._world_size:
                return torch.stack([values[r] for r in range(self._world_size)]).to(tensor.device)
        if self.dead_ranks():
            raise CodedReduceError(f"all_gather needs every rank, but rank(s) {sorted(self._known_dead)} died during "
                                   "training; gather before training ends or skip it when trainer.strategy.known_dead "
                                   "is not empty")
        return default()

    def reduce(self, tensor: Any, group: Optional[Any], reduce_op: Optional[Any], hook: Optional[str],
               default: Callable[[], Any]) -> Any:
        """``hook``: the LightningModule hook running while ``fit`` trains (None otherwise): a ``sync_dist``
        there may be a per-step collective (see ``_sync_in_training_step_is_local``)."""
        if not isinstance(tensor, torch.Tensor):
            return tensor
        if self._sync_in_training_step_is_local(hook):
            return tensor
        if self._reducer is not None and group is None:
            gathered = self.gather(tensor.detach().cpu())
            values = [gathered[r] for r in sorted(gathered)]
            odd = [r for r in sorted(gathered) if not isinstance(gathered[r], torch.Tensor)
                   or gathered[r].shape != tensor.shape]
            if odd:
                raise CodedReduceError(
                    f"rank(s) {odd} were in another collective than rank {self._rank}'s reduce (sync_dist of a "
                    f"{tuple(tensor.shape)} tensor): the ranks logged different metrics with sync_dist=True. Log the "
                    "same names on every rank")
            out = combine(values, reduce_op).to(tensor.device, tensor.dtype)
            # in place and in the tensor's dtype, like Lightning's all-reduce (callers may keep the tensor)
            return out if tensor.requires_grad else tensor.copy_(out)
        if self.dead_ranks():
            self._warn_degraded("sync_dist")
            return tensor
        return default()

    def _sync_in_training_step_is_local(self, hook: Optional[str]) -> bool:
        """``self.log(..., sync_dist=True)`` in a per-step hook: warn (it waits for the slowest rank every step),
        and with a chunked plan do not synchronise at all (ranks run training_step different numbers of times)."""
        if self._reducer is None or hook not in _PER_STEP_HOOKS:
            return False
        if hook == "training_step":
            self._warn("sync_chunks", (
                "self.log(..., sync_dist=True, on_step=True) in training_step is not synchronised under CodedReduce: "
                "each rank runs training_step once per piece of its coded share (their numbers differ), so the "
                "ranks would wait for different numbers of all-reduces. Each rank logs its own value; use "
                "on_step=False, on_epoch=True (synchronised once at the epoch end)"))
            return True
        self._warn("sync_dist", (
            f"self.log(..., sync_dist=True) in {hook} all-reduces on every training step: every step then waits for "
            "the slowest rank, which undoes CodedReduce's straggler tolerance. Log the local value "
            "(sync_dist=False), or use on_step=False, on_epoch=True"))
        return False

    def reduce_boolean_decision(self, decision: bool, all: bool, default: Callable[[], bool]) -> bool:
        if self._reducer is not None:
            votes = self.gather(bool(decision)).values()
            return builtins_all(votes) if all else any(votes)
        if self.dead_ranks():
            return bool(decision)
        return default()

    # ------------------------------------------------------------------ identical parameters and buffers
    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers to every rank (before validation, at the end of training), if the module has any."""
        if any(True for _ in module.buffers()):
            self.broadcast_module_states(module, buffers_only=True)

    def broadcast_module_states(self, module: torch.nn.Module, buffers_only: bool = False) -> None:
        """Rank 0's parameters (at set-up) or buffers to every rank (DDP's constructor does this for DDP)."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        if self._reducer is None and self.dead_ranks():
            self._warn_degraded("buffer broadcast")
            return
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers()]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        flats = [torch.cat([t.detach().reshape(-1) for t in group]) for group in groups.values()]
        if self._reducer is not None:  # during fit: through the tree, one message for all of them
            flats = self.gather([f.cpu() for f in flats] if self._rank == 0 else None)[0]
        else:
            flats = [_broadcast_flat(f) for f in flats]  # one broadcast per dtype/device, not per tensor
        for group, flat in zip(groups.values(), flats):
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


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


builtins_all = all  # ``reduce_boolean_decision`` has a parameter named ``all`` (Lightning's signature)
