"""``hvd.DistributedOptimizer``: the script's optimizer, whose ``step`` applies the coded reduce's average.

As in Horovod, the returned object is an instance of a subclass of the script's optimizer class (so LR
schedulers, ``isinstance`` checks and ``state_dict`` work unchanged) built on the same parameter groups;
the communication lives in :class:`~.gradients.CodedGradients`.

Call order in a training loop (one batch of the loader per iteration)::

    optimizer.zero_grad()
    loss.backward()        # hooks add this batch into the step's message; a closing batch hands it in
    optimizer.step()       # synchronize(): wait for the sum, write the average into .grad; then the update

A rank computes several batches per step (its coded share), so only the ``step()`` after a step's last
batch updates the parameters; the others return ``None`` without touching them. ``synchronize()`` and
``with optimizer.skip_synchronize():`` work as in Horovod (e.g. to clip the averaged gradient).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from .collectives import ReduceOp, broadcast_object, check_compression, check_process_set, global_process_set, resolve_op
from .gradients import DEFAULT_BUCKET_BYTES, CodedGradients
from .runtime import current


class _DistributedOptimizer(torch.optim.Optimizer):
    """Methods copied into the dynamic subclass (Horovod's pattern); ``super(self.__class__, self)`` is the
    script's optimizer class."""

    codedreduce = True  # marks the wrapper (broadcast_optimizer_state steps the wrapped class on its own)

    def __init__(self, params: Any, named_parameters: Any, op: ReduceOp, backward_passes_per_step: int,
                 sparse_as_dense: bool, bucket_bytes: int) -> None:
        super(self.__class__, self).__init__(params)
        runtime = current()
        trained = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if named_parameters is not None:
            named = list(named_parameters)
            if any(not isinstance(item, tuple) for item in named):
                raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced "
                                 "by model.named_parameters().")
            names = [k for k, _ in named]
            dups = sorted({k for k in names if names.count(k) > 1})
            if dups:
                raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: {', '.join(dups)}")
            unnamed = {id(p) for p in trained} - {id(v) for _, v in named}
            if unnamed:
                raise ValueError("named_parameters was specified, but one or more model parameters were not named.")
        self.op = op
        self.backward_passes_per_step = backward_passes_per_step
        scale = 1.0 / runtime.info.size if op == ReduceOp.Average else 1.0
        wrapped_step = super(self.__class__, self).step
        self._edit: Optional[Callable[[], Any]] = None  # edit_gradients(): runs before every update

        def apply_caught_up() -> None:  # a step the others reduced while this rank was behind
            if self._edit is not None:
                self._edit()
            wrapped_step()

        self._gradients = CodedGradients(trained, runtime, scale, apply_caught_up,
                                         backward_passes_per_step=backward_passes_per_step,
                                         bucket_bytes=bucket_bytes, sparse_as_dense=sparse_as_dense)
        self._synchronized = False  # synchronize() ran since the last step()
        self._has_result = False  # ... and wrote a coded step's average into .grad
        self._should_synchronize = True
        self._edits_gradients = False  # the script calls synchronize() itself: no catch-up (see synchronize)

    @property
    def early_buckets(self) -> int:
        """Buckets of the last step handed to the reduce while its backward still ran."""
        return self._gradients.early_buckets

    def edit_gradients(self, edit: Optional[Callable[[], Any]]) -> None:
        """Run ``edit()`` on the averaged gradient before every update, e.g.
        ``optimizer.edit_gradients(lambda: clip_grad_norm_(model.parameters(), 1.0))`` with a plain ``step()``.

        Not Horovod's: a Horovod script clips between ``synchronize()`` and ``step()``, which a rank that skips
        a step it fell behind on cannot repeat; an edit registered here is also run before those updates, so
        the script keeps catch-up (``None`` removes it)."""
        self._edit = edit

    def synchronize(self) -> None:
        """Wait for the step's reduce and write the average into ``.grad`` (nothing between a step's batches).

        A script that calls it may change the gradient before ``step()`` (e.g. clip it), which a rank catching
        up could not repeat: unless the change is registered with :meth:`edit_gradients`, a lagging rank then
        computes every step instead of skipping it."""
        if self._edit is None:
            self._edits_gradients = True
            self._gradients.catch_up_allowed(False)
        self._synchronize()

    def _synchronize(self) -> None:
        self._has_result = self._gradients.synchronize() or self._has_result
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside does not synchronize (after an explicit ``synchronize()``)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Any = None) -> Any:
        plain = self._should_synchronize and not self._synchronized and not self._edits_gradients
        if plain or self._edit is not None:  # a skipped step can repeat what this update does
            self._gradients.catch_up_allowed(True)
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your code.")
            self._synchronize()
        self._synchronized = False
        if not self._has_result:
            return None  # not a step's last batch on this rank: its gradient waits in the step's message
        self._has_result = False
        if self._edit is not None:
            self._edit()
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._gradients.pending:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before optimizer.step() "
                                 "or optimizer.synchronize(). This is prohibited as it can cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None, compression: Any = None,
                         backward_passes_per_step: int = 1, op: Optional[int] = None,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups: Any = None,
                         sparse_as_dense: bool = False, process_set: Any = global_process_set, *,
                         bucket_cap_mb: float = DEFAULT_BUCKET_BYTES / 2 ** 20) -> torch.optim.Optimizer:  # noqa: N802
    """Horovod's ``DistributedOptimizer`` over the coded reduce.

    ``op``: ``hvd.Average`` (default) or ``hvd.Sum``. ``gradient_predivide_factor``, ``groups`` and
    ``num_groups`` only change how Horovod splits and fuses its all-reduces, never the result, so they are
    accepted and have no effect. ``bucket_cap_mb`` (not Horovod's): gradients are handed to the reduce in
    buckets of this size (DDP's default), the first at 1 MiB. Refused, with the reason: compression other
    than ``hvd.Compression.none``, ``op=hvd.Adasum`` (and Min/Max/Product), process sets other than the global one.
    """
    check_compression(compression)
    check_process_set(process_set)
    chosen = resolve_op(None, op, gradients=True)
    if gradient_predivide_factor != 1.0 and chosen != ReduceOp.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
    if getattr(optimizer, "codedreduce", False):
        raise ValueError("the optimizer is already an hvd.DistributedOptimizer; wrap the plain optimizer once")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, chosen, backward_passes_per_step, sparse_as_dense,
               int(bucket_cap_mb * 2 ** 20))


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int, model: Any = None) -> None:
    """Copy ``root_rank``'s optimizer state and hyperparameters into every rank's optimizer.

    As Horovod does, a fresh optimizer's state is first created by one step on zero gradients (of the
    wrapped optimizer, never the reduce), so that every rank has the same state structure.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    state = optimizer.state_dict()
    if len(state["state"]) == 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        if getattr(optimizer, "codedreduce", False):  # the wrapped optimizer's own step: no reduce
            super(optimizer.__class__, optimizer).step()
        else:
            optimizer.step()
        state = optimizer.state_dict()
    if len(state["state"]) == 0:
        return  # a stateless optimizer: its hyperparameters are the script's, the same everywhere
    root = broadcast_object(_to_cpu(state), root_rank)
    if current().info.rank != root_rank:
        optimizer.load_state_dict(root)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
