"""``CodedReduceStrategy``'s life cycle: PyTorch Lightning glue for the CodedReduce engine (DESIGN §4).

``Trainer(strategy="codedreduce")`` trains data-parallel like ``"ddp"`` but replaces DDP's gradient
all-reduce by the straggler-tolerant coded tree reduce of :class:`~lightning_codedreduce.engine.CodedReducer`:

* the model is never wrapped in ``DistributedDataParallel``; rank 0's parameters and buffers are
  broadcast once at set-up (and buffers again before validation and at the end of training);
* the training ``DataLoader`` is rebuilt around a :class:`~lightning_codedreduce.sampler.CodedReduceBatchSampler`
  (validation/test keep Lightning's ``DistributedSampler``);
* the optimizer closure is wrapped: after the (accumulated) backward, this rank's gradient is scaled
  to its share of the global-batch mean, reduced, and written back into ``.grad`` before clipping,
  ``on_before_optimizer_step`` and the optimizer update. A rank that lags finds the step already
  reduced and applies it without running forward/backward (catch-up);
* for codes whose sample weights are not all 1 the strategy's ``training_step`` calls the module once
  per equal-weight chunk and combines the (per-sample-mean) losses with the code weights;
* ``stragglers="auto"``: a :class:`~.adaptive.PlanSwitcher` chooses the plan from measured compute times and
  switches it (sampler and reducer) at steps every rank agrees on.

Batch-size semantics (DESIGN §6): by default the training run is DDP's: the global batch is
``devices * num_nodes * batch_size``, its samples are those of the ``DistributedSampler`` Lightning
injects for DDP (seed, shuffling, padding, ``drop_last``), and a rank whose coded share is larger than
``batch_size`` runs it in pieces of at most ``batch_size`` samples. ``global_batch_size="plan"`` derives
the global batch from the plan instead (the busiest rank gets about ``batch_size`` samples: fewer
samples per step than DDP, more steps per epoch); an integer fixes it. The gradient every rank applies
is the mean over the global batch, as with DDP, provided ``training_step`` returns the *mean* loss over
the batch it was given.
"""
from __future__ import annotations

import dataclasses
import importlib
from datetime import timedelta
from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..adapt import Candidate, PlanAdvisor
from ..engine import CodedReduceError, CodedReducer
from ..environments import horovod_environment_class, is_horovodrun
from ..plan import CodedReducePlan
from ..plan.layout import DEFAULT_CHUNK_BYTES
from ..plan.plan import check_int
from ..sampler import CodedReduceBatchSampler
from . import checks
from ._common import FitContext, WarnOnce, log, override
from .adaptive import PlanSwitcher
from .aggregation import GradientAggregator
from .collectives import LightningCollectives
from .data import TrainLoader
from .gradients import check_gradient_dtypes
from .internals import LightningInternals

STRATEGY_NAME = "codedreduce"
AUTO = "auto"  # stragglers="auto": the plan chosen from measurements while training
FORK_STRATEGY_NAME = "codedreduce_fork"
_SAME_ON_EVERY_RANK = ("branching", "stragglers", "code", "seed", "transport", "layout", "chunk_bytes", "speeds",
                       "coded_self")


def _define(ddp: type, namespace: str) -> type:
    """The strategy class over ``ddp`` (the ``DDPStrategy`` of ``namespace``).

    Its hooks only delegate: the training loader to :class:`TrainLoader`, gradients to
    :class:`GradientAggregator`, Lightning's collectives to :class:`LightningCollectives`, every Lightning
    internal to :class:`LightningInternals`; what remains here is the life cycle (set-up checks, the
    reducer opened at the start of training and closed at its end or on failure).
    """

    class CodedReduceStrategy(ddp):
        strategy_name = STRATEGY_NAME
        _lightning_namespace = namespace

        def __init__(self, branching: int = 3, stragglers: "int | str" = 1, code: str = "auto",
                     global_batch_size: "int | str | None" = None, timeout: float = 30.0,
                     process_group_backend: Optional[str] = None, seed: int = 0, *,
                     process_group_timeout: Optional[timedelta] = None, transport: str = "gloo",
                     layout: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES, bucket_cap_mb: float = 25.0,
                     speeds: Optional[Sequence[float]] = None, adapt_every: int = 50, adapt_patience: int = 2,
                     coded_self: str = "none", **ddp_kwargs: Any) -> None:
            self.adapt_every = checks.check_adapt(stragglers, adapt_every, speeds)
            self.adapt_patience = check_int("adapt_patience", adapt_patience, 1, "use e.g. 2 decisions in a row")
            checks.check_options(branching, 0 if stragglers == AUTO else stragglers, code, global_batch_size, timeout,
                                 seed, transport)
            checks.check_layout(layout, chunk_bytes, coded_self)
            checks.check_bucket_cap(bucket_cap_mb)
            self.speeds = checks.check_speeds(speeds)
            base = checks.ddp_base_options(ddp_kwargs, process_group_timeout)
            if base.get("cluster_environment") is None and is_horovodrun():
                # horovodrun sets only HOROVOD_* variables, which Lightning does not read
                base["cluster_environment"] = horovod_environment_class(namespace)()
            super().__init__(process_group_backend=process_group_backend, **base)
            self.branching, self.stragglers, self.code, self.seed = branching, stragglers, code, seed
            self.transport = transport
            self.layout, self.chunk_bytes, self.coded_self = layout, chunk_bytes, coded_self
            self.reduce_timeout = float(timeout)
            self.plan: Optional[CodedReducePlan] = None
            self.reducer: Optional[CodedReducer] = None
            batch_option = global_batch_size if global_batch_size in (None, "plan") else int(global_batch_size)
            self._warn = WarnOnce(namespace)
            self._lightning = LightningInternals(namespace)  # every Lightning internal goes through it
            self._collectives = LightningCollectives(self._warn)
            self._loader = TrainLoader(batch_option, self._warn, self._lightning.user_sampler_name)
            self._switcher = PlanSwitcher(self.adapt_every, self._loader, self._warn)
            self._aggregator = GradientAggregator(self._loader, self._lightning, int(bucket_cap_mb * 2**20),
                                                  self._switcher)
            self._fit: Optional[FitContext] = None  # while the reducer is open

        @classmethod
        @override
        def register_strategies(cls, strategy_registry) -> None:
            """Register ``"codedreduce"`` (processes started like ``"ddp"``) and ``"codedreduce_fork"`` (forked, for notebooks)."""
            entries = ((STRATEGY_NAME, "popen", "CodedReduce: straggler-tolerant coded tree all-reduce (DDP-style launch)"),
                       (FORK_STRATEGY_NAME, "fork", "CodedReduce with processes forked (notebooks, interactive use)"))
            for name, start_method, description in entries:
                if name not in strategy_registry:
                    strategy_registry.register(name, cls, description=description, start_method=start_method)

        # ------------------------------------------------------------------ what users and callbacks read
        @property
        def sampler(self) -> Optional[CodedReduceBatchSampler]:
            """This rank's coded batch sampler of the training loader (after the loader is built)."""
            return self._loader.sampler

        @property
        def global_batch_size(self) -> Optional[int]:
            """Samples per optimizer step over all ranks (known once the training loader is built)."""
            return self._loader.global_batch_size

        @property
        def step_records(self) -> list[dict[str, Any]]:
            """One ``{"step", "compute_s", "skipped", "early_buckets"}`` per optimizer step (``StragglerMonitor`` reads them)."""
            return self._aggregator.step_records

        @property
        def plan_decisions(self) -> list[dict[str, Any]]:
            """``stragglers="auto"``: every plan switch, when it was decided and took effect, and why."""
            return self._switcher.decisions

        @property
        def counts_samples(self) -> bool:
            """Whether the samples ``training_step`` has now are counted on this rank (see ``is_counted``)."""
            return self._aggregator.counts_samples

        @property
        def known_dead(self) -> frozenset[int]:
            """Ranks that died during a fit, agreed by every survivor (collectives after fit avoid them)."""
            return self._collectives.known_dead

        @property
        def _trainer(self) -> Optional[Any]:
            return self._lightning.trainer_of(self.lightning_module)

        # ------------------------------------------------------------------ launch and set-up
        @override
        def _configure_launcher(self) -> None:
            checks.check_world_size(self.num_nodes, self.num_processes, self.cluster_environment)
            super()._configure_launcher()

        @override
        def set_world_ranks(self) -> None:
            layout = checks.horovodrun_layout(self.cluster_environment, namespace, self.num_processes * self.num_nodes,
                                              self.parallel_devices)
            if layout is not None:
                self.parallel_devices, self.num_nodes = layout
            super().set_world_ranks()

        @override
        def setup_environment(self) -> None:
            checks.check_world_size(self.num_nodes, self.num_processes, self.cluster_environment)
            super().setup_environment()

        @override
        def _setup_model(self, model):
            return model  # never DistributedDataParallel

        @override
        def configure_ddp(self) -> None:
            # DDP's constructor would broadcast rank 0's parameters and buffers: do that, without the wrapper
            self._collectives.broadcast_module_states(self.lightning_module)

        @override
        def setup(self, trainer) -> None:
            if trainer.state.fn == "fit":
                self._prepare_fit(trainer)
            super().setup(trainer)

        def _prepare_fit(self, trainer) -> None:
            """Checks the Lightning internals, builds the plan (the same on every rank) and patches Lightning."""
            self._lightning.check(trainer)
            if self._lightning.layer_sync(self) is not None:
                self._warn("syncbn", "sync_batchnorm all-reduces in every forward pass, so every step waits for "
                                     "the slowest rank and CodedReduce cannot skip stragglers")
            module = self.lightning_module
            manual = module is not None and not module.automatic_optimization
            checks.check_materialised(module)  # before the plan: the layout is chosen by the gradient's size
            stragglers, layout = self.stragglers, self.layout
            if self.stragglers == AUTO:  # starts uncoded, like DDP (the balanced layout: gloo's all-reduce at s=0)
                stragglers, layout = 0, ("balanced" if self.layout == "auto" and self.world_size >= 3 else self.layout)
            if self.stragglers == AUTO and torch.are_deterministic_algorithms_enabled():
                self._warn("auto_deterministic", "stragglers='auto' switches plans by measured timings, so two runs "
                                                 "agree to float rounding only; fix stragglers for bitwise runs")
            self.plan = checks.build_plan(self.world_size, self.branching, stragglers, self.code, self.seed,
                                          manual=manual, warn=self._warn, layout=layout,
                                          chunk_bytes=self.chunk_bytes, gradient_bytes=checks.message_bytes(module),
                                          speeds=self.speeds, coded_self=self.coded_self)
            log.debug(self.plan.describe())
            checks.check_same_plan({k: getattr(self, k) for k in _SAME_ON_EVERY_RANK}, self.plan)
            self._lightning.apply_patches(trainer, self._on_first_sigterm)
            checks.warn_per_step_collectives(trainer, namespace, self._lightning, self._warn)

        def _on_first_sigterm(self, signum: int) -> None:
            log.info(f"[rank: {self.global_rank}] Received SIGTERM: {signum}")
            if self.launcher is not None:
                self.launcher.kill(signum)

        @override
        def process_dataloader(self, dataloader: object) -> object:
            trainer = self._trainer
            if trainer is None or trainer.state.stage != "train" or self.plan is None:
                return dataloader
            return self._loader.build(dataloader, self.plan, self.global_rank,
                                      automatic=self.lightning_module.automatic_optimization,
                                      limit_batches=trainer.limit_train_batches,
                                      gather=self._collectives.all_gather_object)

        # ------------------------------------------------------------------ the reducer's life cycle
        @override
        def on_train_start(self) -> None:
            super().on_train_start()
            if self.plan is not None:
                self._open_reducer()

        def _open_reducer(self) -> None:
            self._close_reducer()
            start = self._loader.begin_fit(self._trainer.global_step)
            if self.known_dead:
                raise CodedReduceError(
                    f"rank(s) {sorted(self.known_dead)} died during an earlier fit in this job; a new fit needs every "
                    "rank (process groups are created collectively). Restart the job and resume from the last "
                    "checkpoint (trainer.fit(..., ckpt_path=...))")
            check_gradient_dtypes(self.lightning_module, self.optimizers)
            self.reducer = self._new_reducer(self.plan, start)
            fit = self._fit = FitContext(trainer=self._trainer, module=self.lightning_module, reducer=self.reducer,
                                         rank=self.global_rank, world_size=self.world_size, device=self.root_device,
                                         precision_plugin=self.precision_plugin)
            self._collectives.start(fit)
            self._aggregator.start(fit)
            if self.stragglers == AUTO:
                self._switcher.start(fit, self._advisor(), Candidate(0, None, self.plan.layout), self._switch_plan,
                                     self._collectives.gather)

        def _advisor(self) -> PlanAdvisor:
            """``stragglers="auto"``'s: candidates share this run's branching, code, seed, chunks and global batch, in
            either layout unless the user fixed one."""
            layouts = ("tree", "balanced") if self.layout == "auto" and self.world_size >= 3 else (self.plan.layout,)
            return PlanAdvisor(self.world_size, branching=self.branching, layouts=layouts, chunk_bytes=self.chunk_bytes,
                               seed=self.seed, code=self.plan.code, patience=self.adapt_patience,
                               message_bytes=checks.message_bytes(self.lightning_module) or 0,
                               global_batch=self._loader.global_batch_size)

        def _new_reducer(self, plan: CodedReducePlan, start: int) -> CodedReducer:
            # a private gloo group: isolates the reducer's point-to-point traffic from Lightning's collectives
            # (and from an earlier reducer), and works when the default backend is NCCL; the reducer destroys it
            # once closed (a switch of ``stragglers="auto"`` opens another)
            group = dist.new_group(backend="gloo")
            return CodedReducer(plan, timeout=self.reduce_timeout, start_step=start, group=group,
                                transport=self.transport, owns_group=True)

        def _switch_plan(self, plan: CodedReducePlan, start: int) -> None:
            """``stragglers="auto"`` decided a new plan from ``start`` on: every rank closes its reducer after the
            old plan's last step and opens one for the new plan (collectively, so this step waits for every rank)."""
            self._collectives.stop()
            self._retire(self.reducer)
            self.plan, self.reducer = plan, self._new_reducer(plan, start)
            self._fit = dataclasses.replace(self._fit, reducer=self.reducer)
            self._collectives.start(self._fit)
            self._aggregator.use(self._fit)
            self._switcher.use(self._fit)

        def _retire(self, reducer: CodedReducer) -> None:
            reducer.close()
            # a rank that finishes while a peer is still catching up must not exit with a receive posted
            for peer in reducer.wait_for_peers(self.reduce_timeout):
                log.warning(f"[rank {self.global_rank}] CodedReduce: rank {peer} did not close its link "
                            f"within {self.reduce_timeout} s")

        def _close_reducer(self) -> None:
            reducer, self.reducer = self.reducer, None
            if reducer is None:
                return
            self._collectives.stop()  # remembers who died: collectives after fit (save_checkpoint, validate) avoid them
            self._aggregator.stop()
            self._switcher.stop()
            self._fit = None
            self._retire(reducer)

        @override
        def on_train_end(self) -> None:
            """Training is over: make the buffers identical, agree on who died, and close the reducer, so the
            collectives that follow (``trainer.save_checkpoint``, ``trainer.validate``) know which ranks to avoid."""
            super().on_train_end()
            if self.reducer is None:
                return
            self._collectives.broadcast_buffers(self.lightning_module)
            self._collectives.gather(None)
            self._close_reducer()

        @override
        def on_exception(self, exception: BaseException) -> None:
            """This rank stops with an error. If the plan can do without it, it just leaves (the others go
            on, as when a process dies); otherwise it aborts the reduce so every rank raises
            ``CodedReduceError`` naming it at once, instead of within the reducer's timeout.
            """
            super().on_exception(exception)
            reducer = self.reducer
            if reducer is None or reducer.error is not None:
                return
            if self.plan.survives(set(reducer.dead) | {self.global_rank}):
                return
            reducer.abort(f"{type(exception).__name__}: {str(exception)[:200]}")

        @override
        def teardown(self) -> None:
            try:
                self._close_reducer()
            finally:
                self._lightning.remove_patches()
                super().teardown()

        # ------------------------------------------------------------------ training: GradientAggregator
        @override
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            trainer = self._trainer
            self._loader.start_batch(trainer.current_epoch, batch_idx)
            self._aggregator.start_batch(int(getattr(trainer, "accumulate_grad_batches", 1)))
            super().on_train_batch_start(batch, batch_idx)

        @override
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            return self._aggregator.training_step(super().training_step, *args, **kwargs)

        @override
        def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
            self._aggregator.before_backward()
            out = super().backward(closure_loss, optimizer, *args, **kwargs)
            self._aggregator.after_backward()
            return out

        @override
        def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
            return super().optimizer_step(optimizer, self._aggregator.wrap_closure(optimizer, closure), model, **kwargs)

        # ------------------------------------------------------------------ Lightning's collectives: LightningCollectives
        @override
        def barrier(self, *args: Any, **kwargs: Any) -> None:
            self._collectives.barrier(partial(super().barrier, *args, **kwargs))

        @override
        def broadcast(self, obj: Any, src: int = 0) -> Any:
            return self._collectives.broadcast(obj, src, partial(super().broadcast, obj, src))

        @override
        def all_gather(self, tensor, group: Optional[Any] = None, sync_grads: bool = False):
            default = partial(super().all_gather, tensor, group=group, sync_grads=sync_grads)
            return self._collectives.all_gather(tensor, group, sync_grads, default)

        @override
        def reduce(self, tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean"):
            default = partial(super().reduce, tensor, group=group, reduce_op=reduce_op)
            return self._collectives.reduce(tensor, group, reduce_op, self._training_hook(), default)

        def _training_hook(self) -> Optional[str]:
            """The LightningModule hook running now, while ``fit`` trains (a ``sync_dist`` there may run every step)."""
            trainer = self._trainer
            if trainer is None or not trainer.training:
                return None
            return self._lightning.current_hook(self.lightning_module)

        @override
        def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
            default = partial(super().reduce_boolean_decision, decision, all=all)
            return self._collectives.reduce_boolean_decision(decision, all, default)

        @override
        def on_validation_start(self) -> None:
            super().on_validation_start()
            if self.plan is not None:
                self._collectives.broadcast_buffers(self.lightning_module)

    return CodedReduceStrategy


_CLASS_DOC = """Data-parallel training with CodedReduce instead of DDP's all-reduce (``Trainer(strategy="codedreduce")``).

    Args:
        branching: most children per parent in the reduce tree.
        stragglers: slow or dead children tolerated per parent (0: plain uncoded tree reduce), or ``"auto"``:
            start uncoded (in the balanced layout unless ``layout`` is fixed) and, every ``adapt_every`` steps,
            switch to the plan (either layout unless fixed; ``stragglers`` 0 with or without speed-proportional
            loads, 1 or 2) that the measured compute times predict to be fastest for the same global batch
            (``lightning_codedreduce.adapt``). Switches take effect at a step every rank agrees
            on; the training run does not change. Decisions: ``plan_decisions``, the Lightning loggers
            (``codedreduce/stragglers``, ``codedreduce/predicted_gain``) and ``StragglerMonitor``'s summary.
        code: ``"auto"`` or ``"frc"`` (fractional repetition only: every sample weight is 1). ``"auto"``
            becomes ``"frc"`` under manual optimization and ``Trainer(deterministic=True)``.
        global_batch_size: samples per optimizer step over all ranks. Default ``None``: DDP's,
            ``devices * num_nodes * batch_size``, with DDP's samples in every step (a rank whose coded
            share is larger runs it in pieces of at most ``batch_size``). ``"plan"``: derived from the
            plan so that the busiest rank gets about ``batch_size`` samples (fewer per step than DDP,
            more steps per epoch). An integer fixes it.
        timeout: seconds a silent peer may take before it counts as dead.
        process_group_backend: backend of Lightning's process group (the reduce uses ``transport``).
        seed: seed of the plan's code search (the same on every rank).
        process_group_timeout: timeout of the default process group (``DDPStrategy(timeout=...)``).
        transport: ``"gloo"`` (default; CUDA gradients are staged through host memory) or ``"nccl"``
            (frames over NCCL, one pair of 2-rank communicators per tree link; needs CUDA).
        layout: how the gradient travels: ``"tree"`` (the paper's; tolerates dead ranks),
            ``"balanced"`` (chunks owned by every rank: ring all-reduce's bandwidth, any slow rank
            tolerated, rank 0 included, but no dead one) or ``"auto"`` (default: balanced for gradients of
            2 MiB and more, and where ``Trainer(deterministic=True)`` meets a tree that cannot be reproducible).
        chunk_bytes: chunk size of the balanced layout.
        bucket_cap_mb: as DDP's: in the balanced layout the gradient is handed to the reduce in buckets of
            about this many MiB (from the last parameters, which backward reaches first) as soon as backward
            has produced each one, so communication overlaps the rest of backward. ``0``: the whole
            gradient after backward. The tree always takes it whole.
        adapt_every: ``stragglers="auto"``: optimizer steps between decisions (each waits once for every rank).
        adapt_patience: ``stragglers="auto"``: a plan replaces the current one only when it is predicted at least
            10 % faster in this many decisions in a row (one predicted 1.5x faster or more: in the first).
        speeds: relative compute speed of every rank, for hardware that is persistently slower (e.g.
            ``[1, 1, 0.5, 1]``: rank 2 takes twice as long per sample). Every rank's share of the global batch
            is sized so that all ranks finish together; the global batch, and so the training run, is
            unchanged. ``None`` (default): all equal. Pair with ``stragglers=0`` when slowness is only
            persistent, so that no sample is computed twice.
        coded_self: the tree layout: whose own compute is one more slot of its code, so that a parent whose
            compute is slow still forwards on time. ``"none"`` (default, the paper's tree: a slow rank 0 delays
            every step), ``"root"`` (rank 0 tolerated like any rank, for R a little higher; a slow internal
            parent already counts as one straggling child) or ``"all"`` (every parent; R higher still). The
            balanced layout always tolerates a slow rank 0.

    After set-up: ``plan`` (the :class:`CodedReducePlan`), ``reducer``, ``sampler``,
    ``global_batch_size`` and ``step_records`` (one ``{"step", "compute_s", "skipped", "early_buckets"}`` per
    optimizer step; ``early_buckets``: buckets handed to the reduce while backward ran).
    ``training_step`` must return the *mean* loss over its batch.
    """

# one class per Lightning namespace, each a subclass of that namespace's DDPStrategy; the module
# attribute names let pickle find them (spawned processes)
_PACKAGE = __name__.rsplit(".", 1)[0]  # pickle finds the classes as lightning_codedreduce.strategy.<name>
_CLASS_NAMES = {"pytorch_lightning": "CodedReduceStrategy", "lightning.pytorch": "LightningPytorchCodedReduceStrategy"}
_CLASSES: dict[str, type] = {}


def strategy_class(namespace: str = "pytorch_lightning") -> type:
    """The strategy class for ``pytorch_lightning`` or for the unified ``lightning.pytorch`` package.

    Created on first use, so importing this module imports neither.
    """
    if namespace not in _CLASS_NAMES:
        raise ValueError(f"unknown Lightning namespace {namespace!r}; use one of {sorted(_CLASS_NAMES)}")
    if namespace not in _CLASSES:
        ddp = importlib.import_module(f"{namespace}.strategies").DDPStrategy
        cls = _define(ddp, namespace)
        cls.__module__, cls.__doc__ = _PACKAGE, _CLASS_DOC
        cls.__qualname__ = _CLASS_NAMES[namespace]
        _CLASSES[namespace] = cls
    return _CLASSES[namespace]

