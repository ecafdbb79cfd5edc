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
  per equal-weight chunk and combines the (per-sample-mean) losses with the code weights.

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

import importlib
import math
import numbers
import os
import warnings
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..engine import CodedReduceError, CodedReducer
from ..engine.transport import check_transport
from ..environments import horovod_environment_class, is_horovodrun
from ..plan import CodedReducePlan
from ..sampler import CodedReduceBatchSampler
from ._common import _rank_zero_warn, log
from .aggregation import GradientAggregationMixin, HeldGradients, TouchedParameters
from .collectives import CollectivesMixin
from .data import TrainLoaderMixin
from .internals import LightningInternals

STRATEGY_NAME = "codedreduce"
FORK_STRATEGY_NAME = "codedreduce_fork"
# DDP constructor options that make no sense without a DistributedDataParallel wrapper
_DDP_ONLY = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class _CodedReduceMixin(TrainLoaderMixin, GradientAggregationMixin, CollectivesMixin):
    """The strategy's life cycle, independent of which Lightning namespace provides ``DDPStrategy``.

    The parts live in their own modules: ``data`` (training loader), ``aggregation`` (the reducing
    closure), ``collectives`` (Lightning's barriers, broadcasts, sync_dist); every Lightning internal is
    touched through ``internals.LightningInternals`` (checked at set-up).
    """

    strategy_name = STRATEGY_NAME
    _lightning_namespace = "pytorch_lightning"

    def __init__(self, branching: int = 3, stragglers: int = 1, code: str = "auto",
                 global_batch_size: "int | str | None" = None, timeout: float = 30.0,
                 process_group_backend: Optional[str] = None, seed: int = 0, *,
                 process_group_timeout: Optional[timedelta] = None, transport: str = "gloo",
                 **ddp_kwargs: Any) -> None:
        CodedReducePlan(1, branching, stragglers, code, seed)  # validates the options with a clear error now
        check_transport(transport)  # "nccl" on a machine without CUDA/NCCL: a clear error now
        if global_batch_size not in (None, "plan") and (isinstance(global_batch_size, bool)
                                                        or not isinstance(global_batch_size, numbers.Integral)
                                                        or global_batch_size < 1):
            raise ValueError(f"global_batch_size must be a positive integer, None (DDP's: devices * num_nodes * "
                             f"batch_size) or 'plan' (derived from the plan), got {global_batch_size!r}")
        if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ValueError(f"timeout must be a finite, positive number of seconds (how long a silent peer may take "
                             f"before it counts as dead), got {timeout!r}")
        for name in _DDP_ONLY:
            if ddp_kwargs.get(name) is not None:
                raise ValueError(f"{name} is a DistributedDataParallel option; CodedReduceStrategy never wraps the "
                                 "model in DDP, so it cannot be used")
        base = {k: ddp_kwargs.pop(k) for k in ("accelerator", "parallel_devices", "cluster_environment",
                                                "checkpoint_io", "precision_plugin", "start_method")
                if k in ddp_kwargs}
        if ddp_kwargs:
            warnings.warn(f"CodedReduceStrategy ignores the DistributedDataParallel options {sorted(ddp_kwargs)}: "
                          "the model is not wrapped in DDP", UserWarning, stacklevel=2)
        if process_group_timeout is not None:
            base["timeout"] = process_group_timeout
        if base.get("cluster_environment") is None and is_horovodrun():
            # horovodrun sets only HOROVOD_* variables, which Lightning does not read
            base["cluster_environment"] = horovod_environment_class(self._lightning_namespace)()
        super().__init__(process_group_backend=process_group_backend, **base)
        self.branching, self.stragglers, self.code, self.seed = branching, stragglers, code, seed
        self.transport = transport
        self._known_dead: set[int] = set()  # ranks that died (agreed by every survivor)
        self.reduce_timeout = float(timeout)
        self._batch_option = global_batch_size if global_batch_size in (None, "plan") else int(global_batch_size)
        self.plan: Optional[CodedReducePlan] = None
        self.reducer: Optional[CodedReducer] = None
        self.sampler: Optional[CodedReduceBatchSampler] = None
        self.global_batch_size: Optional[int] = self._batch_option if isinstance(self._batch_option, int) else None
        self._lightning = LightningInternals(self._lightning_namespace)  # every Lightning internal goes through it
        self._batch_idx = 0  # batch of the epoch being trained (its pieces come from the sampler)
        self._touched = TouchedParameters()  # which parameters backward reached in this step (None grads as DDP)
        self._held = HeldGradients()  # a micro-batch's earlier pieces' gradients across Lightning's zero_grad
        self._counting = True  # False while a piece whose samples another rank counts runs (counts_samples)
        self._logged_epoch = -1  # last epoch in which training_step ran here (a catching-up rank must log once)
        self._log_only = False  # the closure of a skipped step runs training_step forward-only, to log
        self.step_records: list[dict[str, Any]] = []
        self._reduce_step = 0
        self._loaded_reduce_step: Optional[int] = None
        self._position: tuple[int, int] = (0, 0)  # (epoch, batches consumed in it) of the training loader
        self._resume_check: Optional[tuple[int, int]] = None
        self._in_closure = False
        self._closure_calls = 0
        self._micro_compute = 0.0  # compute of accumulation micro-batches before the stepping one
        self._micro_t0: Optional[float] = None
        self._manual_t0: Optional[float] = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ registration
    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        """Register ``"codedreduce"`` (processes started like ``"ddp"``) and ``"codedreduce_fork"`` (forked, for notebooks)."""
        entries = ((STRATEGY_NAME, "popen", "CodedReduce: straggler-tolerant coded tree all-reduce (DDP-style launch)"),
                   (FORK_STRATEGY_NAME, "fork", "CodedReduce with processes forked (notebooks, interactive use)"))
        for name, start_method, description in entries:
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, start_method=start_method)

    # ------------------------------------------------------------------ helpers
    def _ns(self, module: str):
        return importlib.import_module(f"{self._lightning_namespace}.{module}")

    @property
    def _trainer(self):
        return self._lightning.trainer_of(self.lightning_module)

    @property
    def counts_samples(self) -> bool:
        """Whether the samples ``training_step`` has now are counted on this rank (see ``is_counted``)."""
        return self._counting

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _rank_zero_warn(self, message)

    # ------------------------------------------------------------------ environment / set-up
    def _check_world_size(self) -> None:
        """Lightning checks devices * num_nodes against the launcher only when it starts the processes itself:
        check processes started by torchrun, srun, mpirun, horovodrun or by hand (RANK/WORLD_SIZE/LOCAL_RANK),
        and a process group that an earlier fit left initialised, here."""
        expected = self.num_nodes * self.num_processes
        launched = None
        if dist.is_available() and dist.is_initialized():
            launched = dist.get_world_size()
        else:
            env = getattr(self, "cluster_environment", None)
            if env is not None and env.creates_processes_externally:
                if type(env).__name__ == "LightningEnvironment":  # by hand: WORLD_SIZE, if set
                    try:
                        launched = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
                    except ValueError:
                        launched = None
                else:  # the launcher's own check first: its hints name the launcher's options
                    env.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
                    launched = env.world_size()
        if launched is not None and launched != expected:
            raise ValueError(
                f"The launcher started {launched} processes (WORLD_SIZE={launched}) but the Trainer was configured "
                f"with devices={self.num_processes} and num_nodes={self.num_nodes} ({expected} processes); set "
                f"Trainer(devices=..., num_nodes=...) so that devices * num_nodes == {launched}")

    def _configure_launcher(self) -> None:
        self._check_world_size()
        super()._configure_launcher()

    def set_world_ranks(self) -> None:
        self._adopt_horovodrun_layout()
        super().set_world_ranks()

    def _adopt_horovodrun_layout(self) -> None:
        """Under horovodrun, Trainer(devices=..., num_nodes=...) left at their defaults take horovodrun's layout."""
        env = getattr(self, "cluster_environment", None)
        if env is None or not isinstance(env, horovod_environment_class(self._lightning_namespace)):
            return
        if self.num_processes * self.num_nodes != 1 or env.world_size() == 1:
            return
        local, nodes = env.local_world_size(), env.num_nodes()
        device = self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")
        if device.type == "cuda":
            self.parallel_devices = [torch.device("cuda", i) for i in range(local)]
        else:
            self.parallel_devices = [device] * local
        self.num_nodes = nodes
        log.info(f"horovodrun: {env.world_size()} processes, {local} per host on {nodes} host(s)")

    def setup_environment(self) -> None:
        self._check_world_size()
        super().setup_environment()

    def _setup_model(self, model):
        return model  # never DistributedDataParallel

    def configure_ddp(self) -> None:
        # DDP's constructor would broadcast rank 0's parameters and buffers: do that, without the wrapper
        self._broadcast_module_states()

    def setup(self, trainer) -> None:
        fitting = trainer.state.fn == "fit"
        if fitting:
            self._lightning.check(trainer)
            if self._lightning.layer_sync(self) is not None:
                self._warn_once("syncbn", "sync_batchnorm all-reduces in every forward pass, so every step waits for "
                                          "the slowest rank and CodedReduce cannot skip stragglers")
            self.plan = self._build_plan()
            log.debug(self.plan.describe())
            self._check_same_plan()
            self._check_materialised(self.lightning_module)
            self._lightning.apply_patches(trainer, self._check_sigterm_locally, self._on_first_sigterm)
            self._warn_per_step_collectives(trainer)
        super().setup(trainer)

    def _build_plan(self) -> CodedReducePlan:
        """The plan; ``code="auto"`` becomes fractional repetition (0/1 weights) where it must: manual
        optimization (the user back-propagates the loss) and ``Trainer(deterministic=True)`` (reproducible sums)."""
        manual = self.lightning_module is not None and not self.lightning_module.automatic_optimization
        deterministic = torch.are_deterministic_algorithms_enabled()
        plan = None
        if self.code == "auto" and (manual or deterministic):
            try:
                plan = CodedReducePlan(self.world_size, self.branching, self.stragglers, "frc", self.seed)
            except ValueError:  # no 0/1 code for this shape: the default one (a clear error later if manual)
                pass
        plan = plan or CodedReducePlan(self.world_size, self.branching, self.stragglers, self.code, self.seed)
        if deterministic:
            reason = plan.irreproducible_reason()
            if reason is not None:
                self._warn_once("deterministic", (
                    f"Trainer(deterministic=True): this CodedReduce plan ({self.world_size} ranks, branching="
                    f"{self.branching}, stragglers={self.stragglers}) cannot give bitwise-reproducible runs: {reason}. "
                    "Runs agree to float rounding only; stragglers=0 (or a world size whose code groups have equal "
                    "subtrees, e.g. 3, 5 or 7 ranks with branching=3) is reproducible"))
        return plan

    def _check_sigterm_locally(self) -> None:
        trainer = self._trainer
        if getattr(trainer, "received_sigterm", False):
            raise self._ns("utilities.exceptions").SIGTERMException()

    def _on_first_sigterm(self, signum: int) -> None:
        log.info(f"[rank: {self.global_rank}] Received SIGTERM: {signum}")
        if self.launcher is not None:
            self.launcher.kill(signum)

    def _warn_per_step_collectives(self, trainer) -> None:
        callbacks = self._ns("callbacks")
        for cb in getattr(trainer, "callbacks", []):
            if isinstance(cb, callbacks.Timer):
                self._warn_once("timer", "The Timer callback broadcasts from rank 0 after every training batch: every "
                                         "step then waits for the slowest rank, undoing CodedReduce's straggler tolerance")
            if isinstance(cb, callbacks.ModelCheckpoint) and self._lightning.checkpoints_on_time(cb):
                self._warn_once("ckpt_time", "ModelCheckpoint(train_time_interval=...) broadcasts after every training "
                                             "batch: every step then waits for the slowest rank")

    def _check_same_plan(self) -> None:
        """Every rank must build the same plan: compare the options (not only the fingerprint) to say which differs."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        options = ("branching", "stragglers", "code", "seed", "transport")
        mine = {**{k: getattr(self, k) for k in options}, "plan": self.plan.fingerprint()}
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        differ = [k for k in options if any(e[k] != mine[k] for e in every)]
        if differ or any(e["plan"] != mine["plan"] for e in every):
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {e[k]!r}" for r, e in enumerate(every)) for k in differ)
            raise ValueError(
                f"the ranks built different CodedReduce plans ({detail or 'plan fingerprints differ: ' + str([e['plan'] for e in every])}); "
                "every rank must create CodedReduceStrategy with the same branching, stragglers, code, seed and transport")

    @staticmethod
    def _check_materialised(module) -> None:
        if module is None:
            return
        from torch.nn.parameter import is_lazy

        lazy = [n for n, p in module.named_parameters() if is_lazy(p)] + [n for n, b in module.named_buffers() if is_lazy(b)]
        if lazy:
            raise ValueError(
                f"the model has parameters that are not initialised yet (lazy modules: {', '.join(lazy[:5])}"
                f"{', ...' if len(lazy) > 5 else ''}). CodedReduce broadcasts rank 0's parameters at set-up and reduces a "
                "fixed set of gradients, so they must exist before fit: run one forward pass with a dummy batch in the "
                "LightningModule's __init__ or setup() hook, or give the layers their input sizes")

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self._trainer
        if self.plan is None:
            return
        start = self._loaded_reduce_step if self._loaded_reduce_step is not None else trainer.global_step
        if self._loaded_reduce_step is not None and self._loaded_reduce_step != trainer.global_step:
            log.debug(f"reduce step {self._loaded_reduce_step} from the loader state, global step {trainer.global_step}")
        self._loaded_reduce_step = None
        self._reduce_step = start
        self._logged_epoch = -1
        self._close_reducer()
        if self._known_dead:
            raise CodedReduceError(
                f"rank(s) {sorted(self._known_dead)} died during an earlier fit in this job; a new fit needs every rank "
                "(process groups are created collectively). Restart the job and resume from the last checkpoint "
                "(trainer.fit(..., ckpt_path=...))")
        self._check_gradient_dtypes()
        # a private gloo group: isolates the reducer's point-to-point traffic from Lightning's collectives
        # (and from an earlier fit's reducer), and works when the default backend is NCCL
        group = dist.new_group(backend="gloo")
        self.reducer = CodedReducer(self.plan, timeout=self.reduce_timeout, start_step=start, group=group,
                                    transport=self.transport)
        self._touched.attach([p for p in self.lightning_module.parameters() if p.requires_grad])

    def _close_reducer(self) -> None:
        if self.reducer is None:
            return
        self._dead_ranks()  # remember who died: collectives after fit (save_checkpoint, validate) must avoid them
        self._touched.detach()
        reducer, self.reducer = self.reducer, None
        reducer.close()
        # a rank that finishes while a peer is still catching up must not exit with a receive posted
        for peer in reducer.wait_for_peers(self.reduce_timeout):
            log.warning(f"[rank {self.global_rank}] CodedReduce: rank {peer} did not close its link "
                        f"within {self.reduce_timeout} s")

    def on_train_end(self) -> None:
        """Training is over: make the buffers identical, agree on who died, and close the reducer, so the
        collectives that follow (``trainer.save_checkpoint``, ``trainer.validate``) know which ranks to avoid."""
        super().on_train_end()
        if self.reducer is None:
            return
        if any(True for _ in self.lightning_module.buffers()):
            self._broadcast_module_states(buffers_only=True)
        self._tree_gather(None)
        self._close_reducer()

    # ------------------------------------------------------------------ failures / teardown
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

    def teardown(self) -> None:
        try:
            self._close_reducer()
        finally:
            self._lightning.remove_patches()
            super().teardown()


_CLASS_DOC = """Data-parallel training with CodedReduce instead of DDP's all-reduce (``Trainer(strategy="codedreduce")``).

    Args:
        branching: most children per parent in the reduce tree.
        stragglers: slow or dead children tolerated per parent (0: plain uncoded tree reduce).
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

    After set-up: ``plan`` (the :class:`CodedReducePlan`), ``reducer``, ``sampler``,
    ``global_batch_size`` and ``step_records`` (one ``{"step", "compute_s", "skipped"}`` per optimizer step).
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
        cls = type("CodedReduceStrategy", (_CodedReduceMixin, ddp),
                   {"_lightning_namespace": namespace, "__module__": _PACKAGE, "__doc__": _CLASS_DOC})
        cls.__qualname__ = _CLASS_NAMES[namespace]
        _CLASSES[namespace] = cls
    return _CLASSES[namespace]

