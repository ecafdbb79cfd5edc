"""``CodedReduceStrategy``: PyTorch Lightning glue for the CodedReduce engine (DESIGN §4).

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

Batch-size semantics: by default the DataLoader's ``batch_size`` keeps its DDP meaning, the samples
one rank processes per step (so memory is as with DDP), and the global batch is
``plan.global_batch_for(batch_size)`` (logged once on rank 0). ``global_batch_size=`` fixes the global
batch instead. The gradient every rank applies is the mean over the global batch, as with DDP,
provided ``training_step`` returns the *mean* loss over the batch it was given.
"""
from __future__ import annotations

import importlib
import logging
import math
import numbers
import os
import sys
import time
import warnings
import weakref
from datetime import timedelta
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from .engine import CodedReduceError, CodedReducer
from .engine.transport import check_transport
from .environments import horovod_environment_class, is_horovodrun
from .plan import CodedReducePlan
from .sampler import CodedReduceBatchSampler

log = logging.getLogger(__name__)

STRATEGY_NAME = "codedreduce"
FORK_STRATEGY_NAME = "codedreduce_fork"

# hooks that run once per training batch: a collective there waits for the slowest rank every step
_PER_STEP_HOOKS = frozenset({
    "training_step", "on_train_batch_start", "on_train_batch_end", "on_before_backward", "backward",
    "on_after_backward", "on_before_optimizer_step", "optimizer_step", "on_before_zero_grad",
    "optimizer_zero_grad", "configure_gradient_clipping", "lr_scheduler_step",
})
# DDP constructor options that make no sense without a DistributedDataParallel wrapper
_DDP_ONLY = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")
# gradient dtypes the reduce carries (half precision is reduced in float32)
_REDUCIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _rank_zero_warn(strategy, message: str, category=UserWarning) -> None:
    if strategy.global_rank == 0:
        warnings.warn(message, category, stacklevel=3)


def _rank_zero_info(strategy, message: str) -> None:
    """Through Lightning's own info logger (shown by default, like Lightning's set-up messages)."""
    if strategy.global_rank == 0:
        try:
            strategy._ns("utilities.rank_zero").rank_zero_info(message)
        except (ImportError, AttributeError):
            log.info(message)


class _EpochForwarder:
    """Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler`` only.

    Installed as ``batch_sampler.sampler`` so the coded batch sampler gets the epoch too.
    """

    def __init__(self, batch_sampler: CodedReduceBatchSampler):
        self._target = weakref.ref(batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        target = self._target()
        if target is not None:
            target.set_epoch(epoch)


class CodedReduceDataLoader(DataLoader):
    """The training loader the strategy builds: a plain ``DataLoader`` over a coded batch sampler.

    It is *stateful* for Lightning (``state_dict``/``load_state_dict``): Lightning stores the state in
    the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and loads it before it iterates the
    loader again on resume, so training continues at the first batch not yet trained on (the
    position is the strategy's count of consumed batches, not the sampler's, because loaders and
    worker processes prefetch).
    """

    _codedreduce_strategy: Optional[Callable[[], Any]] = None

    def state_dict(self) -> dict[str, Any]:
        strategy = self._codedreduce_strategy() if self._codedreduce_strategy else None
        return strategy._loader_state() if strategy is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        strategy = self._codedreduce_strategy() if self._codedreduce_strategy else None
        if strategy is not None:
            strategy._load_loader_state(state_dict)


class _CodedReduceMixin:
    """The strategy's behaviour, independent of which Lightning namespace provides ``DDPStrategy``."""

    strategy_name = STRATEGY_NAME
    _lightning_namespace = "pytorch_lightning"

    def __init__(self, branching: int = 3, stragglers: int = 1, code: str = "auto",
                 global_batch_size: Optional[int] = None, timeout: float = 30.0,
                 process_group_backend: Optional[str] = None, seed: int = 0, *,
                 process_group_timeout: Optional[timedelta] = None, transport: str = "gloo",
                 **ddp_kwargs: Any) -> None:
        CodedReducePlan(1, branching, stragglers, code, seed)  # validates the options with a clear error now
        check_transport(transport)  # "nccl" on a machine without CUDA/NCCL: a clear error now
        if global_batch_size is not None and (isinstance(global_batch_size, bool)
                                              or not isinstance(global_batch_size, numbers.Integral)
                                              or global_batch_size < 1):
            raise ValueError(f"global_batch_size must be a positive integer or None (derive it from the "
                             f"DataLoader's batch_size), got {global_batch_size!r}")
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
        self._known_dead: set[int] = set()  # ranks that died (agreed by every survivor): collectives go local
        self._chunked_plan = False  # set with the training loader: some rank runs training_step per chunk
        self.reduce_timeout = float(timeout)
        self._fixed_global_batch = None if global_batch_size is None else int(global_batch_size)
        self.plan: Optional[CodedReducePlan] = None
        self.reducer: Optional[CodedReducer] = None
        self.sampler: Optional[CodedReduceBatchSampler] = None
        self.global_batch_size: Optional[int] = self._fixed_global_batch
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
        self._internal_reduce = 0
        self._patched: list[tuple[object, str, bool, Any]] = []

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
        lm = self.lightning_module
        return None if lm is None else lm._trainer

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _rank_zero_warn(self, message)

    def _patch(self, obj: object, name: str, value: Any) -> None:
        """Replace an attribute of one Lightning object (undone in teardown)."""
        if obj is None or not hasattr(obj, name):
            return
        had = name in vars(obj)
        self._patched.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def _unpatch(self) -> None:
        while self._patched:
            obj, name, had, old = self._patched.pop()
            if had:
                setattr(obj, name, old)
            else:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass

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

    def _broadcast_module_states(self, buffers_only: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        if self._dead_ranks():
            self._warn_degraded("buffer broadcast")
            return
        module = self.lightning_module
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers()]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():  # one broadcast per dtype/device, not per tensor
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            if flat.dtype == torch.bool:  # not every backend broadcasts bool
                flat = flat.to(torch.uint8)
            elif flat.is_complex():
                flat = torch.view_as_real(flat).reshape(-1)
            dist.broadcast(flat, src=0)
            if group[0].is_complex():
                flat = torch.view_as_complex(flat.view(-1, 2))
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def setup(self, trainer) -> None:
        fitting = trainer.state.fn == "fit"
        if fitting:
            if self._layer_sync is not None:
                self._warn_once("syncbn", "sync_batchnorm all-reduces in every forward pass, so every step waits for "
                                          "the slowest rank and CodedReduce cannot skip stragglers")
            self.plan = CodedReducePlan(self.world_size, self.branching, self.stragglers, self.code, self.seed)
            log.debug(self.plan.describe())
            self._check_same_plan()
            self._check_materialised(self.lightning_module)
            self._install_patches(trainer)
            self._warn_per_step_collectives(trainer)
        super().setup(trainer)

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

    def _check_gradient_dtypes(self) -> None:
        names = {id(p): n for n, p in self.lightning_module.named_parameters()}
        for optimizer in self.optimizers:
            for p in self._grad_params(optimizer):
                if p.dtype not in _REDUCIBLE:
                    raise ValueError(
                        f"parameter {names.get(id(p), '?')} is {p.dtype}; CodedReduce reduces float16, bfloat16, float32 "
                        "and float64 gradients. Set requires_grad=False on it (or keep it as a buffer), or store "
                        "complex values as real pairs (torch.view_as_real)")

    def _dead_ranks(self) -> set[int]:
        """Ranks every survivor knows to be dead once it has applied the same steps (empty: all alive)."""
        reducer = self.reducer
        if reducer is not None and hasattr(reducer, "agreed_dead"):
            self._known_dead |= reducer.agreed_dead(self._reduce_step - 1)
        return self._known_dead

    def _warn_degraded(self, what: str) -> None:
        if "degraded" not in self._warned:
            self._warned.add("degraded")
            if self.global_rank != 0:  # rank 0 always survives a tolerated death (the root is needed)
                return
            warnings.warn(f"CodedReduce: rank(s) {sorted(self._known_dead)} died and training goes on without them; "
                          f"Lightning's collectives ({what} and others: barriers, broadcasts, sync_dist, "
                          "reduce_boolean_decision) now run locally on each surviving rank", UserWarning, stacklevel=3)

    def _install_patches(self, trainer) -> None:
        """Two instance-level patches of Lightning 2.6 internals (undone in teardown).

        1. ``TrainingEpochLoop._broadcast_sigterm_tensor`` runs ``dist.broadcast`` before *every* training
           batch; with gloo the root blocks until every rank has reached it, i.e. a global barrier per step
           that would wait for stragglers. It is replaced by a local check. The SIGTERM handler's matching
           broadcast is removed too (unmatched, it would block rank 0 forever).
        2. ``_DataConnector._prepare_dataloader`` is made to leave the *training* loader alone, so the
           strategy sees the user's own sampler (for shuffle) and batch sampler (to reject it).
        """
        exceptions = self._ns("utilities.exceptions")
        connector = getattr(trainer, "_signal_connector", None)

        def check_sigterm_locally() -> None:
            if getattr(trainer, "received_sigterm", False):
                raise exceptions.SIGTERMException()

        def sigterm_notifier(signum, frame) -> None:
            log.info(f"[rank: {self.global_rank}] Received SIGTERM: {signum}")
            if not connector.received_sigterm and self.launcher is not None:
                self.launcher.kill(signum)
            connector.received_sigterm = True

        epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if not any(o is epoch_loop for o, *_ in self._patched):
            self._patch(epoch_loop, "_broadcast_sigterm_tensor", check_sigterm_locally)
            self._patch(connector, "_sigterm_notifier_fn", sigterm_notifier)
            data_connector = getattr(trainer, "_data_connector", None)
            original = getattr(data_connector, "_prepare_dataloader", None)
            if original is not None:
                def prepare(dataloader, shuffle: bool, mode=None):
                    if mode == "train":
                        return dataloader  # the strategy injects its own sampler in process_dataloader
                    return original(dataloader, shuffle=shuffle, mode=mode)
                self._patch(data_connector, "_prepare_dataloader", prepare)

    def _warn_per_step_collectives(self, trainer) -> None:
        callbacks = self._ns("callbacks")
        for cb in getattr(trainer, "callbacks", []):
            if isinstance(cb, callbacks.Timer):
                self._warn_once("timer", "The Timer callback broadcasts from rank 0 after every training batch: every "
                                         "step then waits for the slowest rank, undoing CodedReduce's straggler tolerance")
            if isinstance(cb, callbacks.ModelCheckpoint) and getattr(cb, "_train_time_interval", None) is not None:
                self._warn_once("ckpt_time", "ModelCheckpoint(train_time_interval=...) broadcasts after every training "
                                             "batch: every step then waits for the slowest rank")

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self._trainer
        if trainer is None or trainer.state.stage != "train" or self.plan is None:
            return dataloader
        return self._build_train_loader(dataloader)

    def _build_train_loader(self, dl: object) -> DataLoader:
        if not isinstance(dl, DataLoader):
            raise ValueError(f"CodedReduceStrategy needs the training data as a torch DataLoader over a map-style "
                             f"dataset (it decides which samples every rank processes); got {type(dl).__name__}")
        if isinstance(dl.dataset, IterableDataset):
            raise ValueError("CodedReduceStrategy cannot train from an IterableDataset: the coded allocation gives "
                             "several ranks the same samples, so it needs random access. Use a map-style Dataset "
                             "(with __getitem__ and __len__)")
        if dl.batch_size is None:
            raise ValueError("CodedReduceStrategy replaces the training DataLoader's batch sampler with its own, but "
                             f"this loader has a custom batch_sampler ({type(dl.batch_sampler).__name__}). Pass "
                             "batch_size=... (the per-rank batch, as with DDP) and shuffle=True/False instead, or fix "
                             "the global batch with CodedReduceStrategy(global_batch_size=...)")
        sampler = dl.sampler
        if isinstance(sampler, RandomSampler):
            if sampler.replacement or sampler._num_samples is not None:
                raise ValueError("CodedReduceStrategy supports RandomSampler without replacement over the whole "
                                 "dataset only; use shuffle=True")
            shuffle, data_seed = True, None
        elif isinstance(sampler, SequentialSampler):
            shuffle, data_seed = False, None
        elif isinstance(sampler, DistributedSampler):
            shuffle, data_seed = bool(sampler.shuffle), int(sampler.seed)
        else:
            raise ValueError(f"CodedReduceStrategy cannot use the custom sampler {type(sampler).__name__}: it decides "
                             "which samples every rank processes. Use shuffle=True or shuffle=False (or a "
                             "DistributedSampler) in the training DataLoader")
        if data_seed is None:
            data_seed = int(os.environ.get("PL_GLOBAL_SEED", 0) or 0)
        n = len(dl.dataset)
        if self._fixed_global_batch is not None:
            B = self._fixed_global_batch
        else:
            B = self.plan.global_batch_for(int(dl.batch_size))
        low = self.plan.min_global_batch_size
        # every rank must agree on the data (dataset length, global batch, order seed): check collectively
        mine = (n, B, shuffle, bool(dl.drop_last), data_seed)
        every = [None] * self.world_size
        dist.all_gather_object(every, mine)
        if any(e[:4] != mine[:4] for e in every):
            raise ValueError(f"the ranks disagree on the training data (dataset length, global batch, shuffle, "
                             f"drop_last): {every}; every rank must build the same DataLoader")
        data_seed = every[0][4]  # rank 0's seed: every rank must draw the same permutation
        if n == 0:
            raise ValueError("the training dataset is empty (len(dataset) == 0); CodedReduce needs at least "
                             f"{self.plan.min_global_batch_size} samples per step")
        if B < low:
            raise ValueError(f"global_batch_size={B} is too small for the CodedReduce plan of {self.world_size} ranks "
                             f"(branching={self.branching}, stragglers={self.stragglers}): it needs at least {low} "
                             f"samples per step so that every rank gets one; use global_batch_size>={low}")
        if dl.drop_last and n < B:
            raise ValueError(f"the training dataset has {n} samples, fewer than the global batch of {B}, so "
                             f"drop_last=True leaves no step; use a smaller batch or drop_last=False")
        uniform = all(sh.weight == 1.0 for r in range(self.world_size) for sh in self.plan.shards(r, B))
        if not self.lightning_module.automatic_optimization and not uniform:
            raise ValueError(
                f"manual optimization needs a CodedReduce code whose sample weights are all 1, but the plan for "
                f"{self.world_size} ranks (branching={self.branching}, stragglers={self.stragglers}, code={self.code!r}) "
                f"weights samples unequally and the strategy cannot reweight a loss you back-propagate yourself. "
                f"Use code='frc' or a branching divisible by stragglers+1 (e.g. branching={2 * (self.stragglers + 1)})")
        batch_sampler = CodedReduceBatchSampler(n, self.plan, self.global_rank, B, seed=data_seed,
                                                shuffle=shuffle, drop_last=bool(dl.drop_last))
        batch_sampler.sampler = _EpochForwarder(batch_sampler)  # so Lightning's _set_sampler_epoch reaches it
        if type(dl) is not DataLoader and type(dl) is not CodedReduceDataLoader:
            self._warn_once("subclass", f"the training loader ({type(dl).__name__}) is rebuilt as a plain torch "
                                        "DataLoader around the CodedReduce batch sampler; subclass behaviour is lost")
        kwargs: dict[str, Any] = dict(num_workers=dl.num_workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory,
                                      timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
                                      multiprocessing_context=dl.multiprocessing_context, generator=dl.generator,
                                      persistent_workers=dl.persistent_workers,
                                      pin_memory_device=getattr(dl, "pin_memory_device", ""))
        if dl.num_workers > 0:
            kwargs["prefetch_factor"] = dl.prefetch_factor
        if hasattr(dl, "in_order"):
            kwargs["in_order"] = dl.in_order
        loader = CodedReduceDataLoader(dl.dataset, batch_sampler=batch_sampler, **kwargs)
        loader._codedreduce_strategy = weakref.ref(self)
        self.sampler, self.global_batch_size = batch_sampler, B
        self._chunked_plan = not uniform  # some rank calls training_step once per weighted chunk
        self._position = (0, 0)
        if "global_batch" not in self._warned:
            self._warned.add("global_batch")
            reduced = (f", fewer at parent(s) {self.plan.reduced_tolerance} (too few children)"
                       if self.plan.reduced_tolerance else "")
            how = "fixed by global_batch_size" if self._fixed_global_batch is not None else \
                f"derived from the DataLoader's per-rank batch_size={dl.batch_size}"
            _rank_zero_info(self, f"CodedReduce: {self.world_size} ranks, branching {self.branching}, tolerating "
                                  f"{self.stragglers} straggler(s) per parent{reduced} (redundancy {self.plan.redundancy:.2f}); "
                                  f"global batch {B} samples per step ({how}), rank 0 computes "
                                  f"{len(batch_sampler.sample_weights)}; {len(batch_sampler)} steps per epoch")
        return loader

    # -- loader state (checkpointed by Lightning's fit loop as "combined_loader")
    def _loader_state(self) -> dict[str, Any]:
        epoch, consumed = self._position
        return {"epoch": epoch, "consumed": consumed, "reduce_step": self._reduce_step,
                "global_batch_size": self.global_batch_size,
                "plan": None if self.plan is None else self.plan.fingerprint()}

    def _load_loader_state(self, state: dict[str, Any]) -> None:
        if not state or self.sampler is None:
            return
        epoch, consumed = int(state.get("epoch", 0)), int(state.get("consumed", 0))
        old_batch = state.get("global_batch_size")
        if old_batch not in (None, self.global_batch_size):
            _rank_zero_warn(self, f"resuming with global batch {self.global_batch_size} from a checkpoint trained with "
                                  f"{old_batch}: the position in the epoch is approximate")
            consumed = (consumed * old_batch) // self.global_batch_size
        trainer = self._trainer
        steps = len(self.sampler)
        limit = getattr(trainer, "limit_train_batches", 1.0)
        if isinstance(limit, int) and not isinstance(limit, bool):
            steps = min(steps, limit)
        elif isinstance(limit, float) and limit < 1.0:
            steps = int(steps * limit)
        if consumed >= steps:  # the epoch was finished: start the next one
            epoch, consumed = epoch + 1, 0
        self.sampler.load_state_dict({"epoch": epoch, "step": consumed})
        self._position = (epoch, consumed)
        self._resume_check = (epoch, consumed)
        if state.get("reduce_step") is not None:
            self._loaded_reduce_step = int(state["reduce_step"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        trainer = self._trainer
        epoch = trainer.current_epoch
        if self._resume_check is not None:
            expected, self._resume_check = self._resume_check, None
            if (epoch, batch_idx) != expected:
                _rank_zero_warn(self, f"CodedReduce resumed the sampler at epoch {expected[0]} batch {expected[1]} but "
                                      f"Lightning continues at epoch {epoch} batch {batch_idx}")
        self._position = (epoch, batch_idx + 1)
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))
        if batch_idx % accumulate == 0:
            self._micro_compute = 0.0
        self._manual_t0 = time.perf_counter()  # manual optimization: compute runs from here to optimizer.step()
        super().on_train_batch_start(batch, batch_idx)

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

    def _close_reducer(self) -> None:
        if self.reducer is None:
            return
        self._dead_ranks()  # remember who died: collectives after fit (save_checkpoint, validate) must avoid them
        reducer, self.reducer = self.reducer, None
        reducer.close()
        # CodedReducer.close() waits only ~1 s for each peer's goodbye; a rank that finishes while a peer
        # is still catching up would leave a gloo receive pending, and a process that exits with one
        # aborts ("terminate called without an active exception"). Wait for the peers (bounded).
        deadline = time.monotonic() + self.reduce_timeout
        for link in reducer._links():
            rx = getattr(link, "_rx", None)
            if rx is not None and rx.is_alive():
                rx.join(max(0.0, deadline - time.monotonic()))
                if rx.is_alive():
                    log.warning(f"[rank {self.global_rank}] CodedReduce: rank {link.peer} did not close its link "
                                f"within {self.reduce_timeout} s")

    def training_step(self, *args: Any, **kwargs: Any):
        lm = self.lightning_module
        reducer = self.reducer
        if reducer is None or self.sampler is None or not self._trainer.training:
            return super().training_step(*args, **kwargs)
        if lm.automatic_optimization and not self._in_closure:
            # an accumulation micro-batch: if the step is already reduced, its gradient is not needed
            self._micro_t0 = time.perf_counter()
            if reducer.ready(self._reduce_step):
                self._micro_t0 = None
                return torch.zeros((), device=self.root_device, requires_grad=True)
        if self.sampler.uniform_weights or not args:
            return super().training_step(*args, **kwargs)
        return self._chunked_training_step(*args, **kwargs)

    def _chunked_training_step(self, batch: Any, *rest: Any, **kwargs: Any):
        """Non-0/1 codes: one call of the module per equal-weight chunk, losses combined with the weights.

        ``training_step`` must return the mean loss over the samples it was given; the combined loss
        is ``sum(weight_c * len_c / b * loss_c)`` over the chunks (b: this rank's samples per step).
        """
        b = sum(length for length, _ in self.sampler.chunks)
        per_sample = []
        apply_to_collection(batch, torch.Tensor, lambda t: per_sample.append(t.dim() > 0 and t.shape[0] == b))
        if not any(per_sample):
            raise ValueError(
                f"the CodedReduce code of this plan weights this rank's {b} samples unequally, so the strategy splits "
                f"the batch into chunks, but the batch holds no tensor whose first dimension is {b} (got "
                f"{type(batch).__name__}). Use code='frc' (all weights 1), or batches of tensors")
        loss, out, start = None, None, 0
        for length, weight in self.sampler.chunks:
            stop = start + length
            part = apply_to_collection(batch, torch.Tensor,
                                       lambda t, s=start, e=stop: t[s:e] if t.dim() > 0 and t.shape[0] == b else t)
            out = super().training_step(part, *rest, **kwargs)
            value = out.get("loss") if isinstance(out, dict) else out
            if not isinstance(value, torch.Tensor):
                raise ValueError("with a CodedReduce code whose weights are not all 1, training_step must return the "
                                 "loss tensor (or a dict with 'loss'); use code='frc' to return something else")
            term = value * (weight * length / b)
            loss = term if loss is None else loss + term
            start = stop
        if isinstance(out, dict):
            return {**out, "loss": loss}
        return loss

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        if self._micro_t0 is not None and not self._in_closure:
            self._micro_compute += time.perf_counter() - self._micro_t0
            self._micro_t0 = None
        return out

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        if self.reducer is None or self.sampler is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        self._closure_calls = 0
        wrapped = partial(self._reducing_closure, optimizer, closure)
        return super().optimizer_step(optimizer, wrapped, model, **kwargs)

    def _grad_params(self, optimizer) -> list[torch.nn.Parameter]:
        seen, params = set(), []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def _reducing_closure(self, optimizer, closure: Callable[[], Any]) -> Any:
        """Runs (or, when the step is already reduced, skips) forward/backward, then the coded reduce."""
        self._closure_calls += 1
        if self._closure_calls > 1:
            raise RuntimeError("the optimizer called its closure more than once in one step (e.g. LBFGS); "
                               "CodedReduceStrategy reduces exactly once per optimizer step and does not support it")
        reducer, step = self.reducer, self._reduce_step
        automatic = self.lightning_module.automatic_optimization
        params = self._grad_params(optimizer)
        skipped = automatic and reducer.ready(step)
        if skipped:  # catch-up: the others reduced this step without us; apply it, do not compute
            self._mark_closure_skipped(closure)
            flat = reducer.result(step)
            out: Any = torch.zeros((), device=self.root_device)  # not None: AMP would skip the update
            compute = None
        else:
            t0 = time.perf_counter()
            self._in_closure = True
            try:
                out = closure()
            finally:
                self._in_closure = False
            t1 = time.perf_counter()
            if automatic:
                compute = t1 - t0 + self._micro_compute
            else:  # the forward/backward ran in training_step before optimizer.step()
                compute = t1 - (self._manual_t0 if self._manual_t0 is not None else t0)
            flat = reducer.reduce(step, self._local_gradient(params))
        self._write_gradients(params, flat)
        self._manual_t0 = time.perf_counter()
        self._micro_compute = 0.0
        self._reduce_step = step + 1
        self.step_records.append({"step": step, "compute_s": compute, "skipped": bool(skipped)})
        return out

    def _local_gradient(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """This rank's weighted share of the global-batch mean gradient, flat.

        The loss is a mean over this rank's b samples (chunks already weighted), so ``grad * b / B``
        summed (decoded) over the tree is the mean over the global batch of B samples.
        """
        b = len(self.sampler.sample_weights)
        scale = b / self.global_batch_size
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params]
        if not grads:  # nothing trainable (all frozen): still one (empty-valued) reduce per step, in step with the others
            return torch.zeros(1, device=self.root_device)
        flat = torch.cat(grads)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # half-precision messages would lose the sum's precision (and decode worse)
        return flat.mul_(scale) if scale != 1.0 else flat

    @staticmethod
    def _write_gradients(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
        offset = 0
        for p in params:
            part = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.to(device=p.device, dtype=p.dtype).clone()
            else:
                p.grad.copy_(part)

    @staticmethod
    def _mark_closure_skipped(closure: Any) -> None:
        """Lightning's automatic loop reads the closure's result after the step (``consume_result``) and
        raises "The closure hasn't been executed" when there is none: give it an empty one (loss None:
        the batch's output is ``{}``, as for a skipped step)."""
        if not hasattr(closure, "_result"):
            return
        module = sys.modules.get(type(closure).__module__)
        result_cls = getattr(module, "ClosureResult", None)
        if result_cls is not None:
            closure._result = result_cls(None)

    # ------------------------------------------------------------------ collectives
    # After a tolerated death every default-group collective would wait for (or fail on) the dead rank.
    # The survivors agree on who died at the same step (CodedReducer.agreed_dead), so all of them switch
    # to local behaviour at the same point: barriers are skipped, a broadcast keeps the local value (Lightning
    # broadcasts values every rank computes alike: paths, decisions), decisions are local, and only rank 0
    # writes checkpoints (as always). Before any death they are Lightning's ordinary collectives.
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self._dead_ranks():
            log.debug(f"[rank {self.global_rank}] barrier skipped: rank(s) {sorted(self._known_dead)} died")
            return
        return self._guarded("barrier", super().barrier, *args, **kwargs)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        dead = self._dead_ranks()
        if dead:
            if src in dead:
                raise CodedReduceError(f"cannot broadcast from rank {src}: it died during training")
            self._warn_degraded("broadcast")
            return obj
        return self._guarded("broadcast", super().broadcast, obj, src)

    def all_gather(self, tensor, group: Optional[Any] = None, sync_grads: bool = False):
        if self._dead_ranks():
            raise CodedReduceError(f"all_gather needs every rank, but rank(s) {sorted(self._known_dead)} died during "
                                   "training; gather before training ends or skip it when trainer.strategy._known_dead "
                                   "is not empty")
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def reduce(self, tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean"):
        if isinstance(tensor, torch.Tensor) and self._dead_ranks():
            self._warn_degraded("sync_dist")
            return tensor
        if not self._internal_reduce and isinstance(tensor, torch.Tensor):
            trainer = self._trainer
            lm = self.lightning_module
            fx = getattr(lm, "_current_fx_name", None)
            if (trainer is not None and trainer.training and self.reducer is not None and fx == "training_step"
                    and getattr(self, "_chunked_plan", False)):
                # ranks with weighted samples run training_step once per chunk: the number of such
                # all-reduces differs between ranks, so none of them may wait for the others
                self._warn_once("sync_chunks", (
                    "self.log(..., sync_dist=True, on_step=True) in training_step is not synchronised with this "
                    "CodedReduce plan: its code weights some ranks' samples unequally, so those ranks run "
                    "training_step once per chunk and the ranks would wait for different numbers of all-reduces. "
                    "Each rank logs its own value; use on_step=False, on_epoch=True (synchronised once at the "
                    "epoch end), or code='frc'"))
                return tensor
            if (trainer is not None and trainer.training and self.reducer is not None
                    and fx in _PER_STEP_HOOKS):
                self._warn_once("sync_dist", (
                    f"self.log(..., sync_dist=True) in {lm._current_fx_name} all-reduces on every training step: every "
                    "step then waits for the slowest rank, which undoes CodedReduce's straggler tolerance. Log the "
                    "local value (sync_dist=False), or use on_step=False, on_epoch=True"))
        return self._guarded("all-reduce", super().reduce, tensor, group=group, reduce_op=reduce_op)

    def _guarded(self, what: str, collective: Callable, *args: Any, **kwargs: Any) -> Any:
        """A default-group collective during fit that fails because a rank died just before it (before the
        survivors agreed on the death, see _dead_ranks): say so, instead of gloo's "connection closed"."""
        try:
            return collective(*args, **kwargs)
        except RuntimeError as err:
            reducer = self.reducer
            if reducer is None:
                raise
            deadline = time.monotonic() + min(self.reduce_timeout, 5.0)  # the news may still be on its way
            while not reducer.dead and reducer.error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if not reducer.dead and reducer.error is None:
                raise
            raise CodedReduceError(
                f"Lightning's {what} failed on rank {self.global_rank}: rank(s) {sorted(reducer.dead)} died just before it, "
                "before every surviving rank had learnt of the death (survivors agree on a death at the next "
                "training step and then keep collectives away from it). Restart and resume from the last checkpoint "
                f"(trainer.fit(..., ckpt_path=...)). ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self._dead_ranks():
            return bool(decision)
        self._internal_reduce += 1
        try:
            return super().reduce_boolean_decision(decision, all=all)
        finally:
            self._internal_reduce -= 1

    # ------------------------------------------------------------------ keep buffers identical
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.plan is not None and any(True for _ in self.lightning_module.buffers()):
            self._broadcast_module_states(buffers_only=True)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.plan is not None and any(True for _ in self.lightning_module.buffers()):
            self._broadcast_module_states(buffers_only=True)

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
        if self.plan.tolerates(set(reducer.dead) | {self.global_rank}):
            return
        reducer.abort(f"{type(exception).__name__}: {str(exception)[:200]}")

    def teardown(self) -> None:
        try:
            self._close_reducer()
        finally:
            self._unpatch()
            super().teardown()


_CLASS_DOC = """Data-parallel training with CodedReduce instead of DDP's all-reduce (``Trainer(strategy="codedreduce")``).

    Args:
        branching: most children per parent in the reduce tree.
        stragglers: slow or dead children tolerated per parent (0: plain uncoded tree reduce).
        code: ``"auto"`` or ``"frc"`` (fractional repetition only: every sample weight is 1).
        global_batch_size: samples per optimizer step over all ranks; default: derived from the
            training DataLoader's ``batch_size`` (per-rank batch, as with DDP) by the plan.
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
                   {"_lightning_namespace": namespace, "__module__": __name__, "__doc__": _CLASS_DOC})
        cls.__qualname__ = _CLASS_NAMES[namespace]
        _CLASSES[namespace] = cls
    return _CLASSES[namespace]


def __getattr__(name: str):
    for namespace, attr in _CLASS_NAMES.items():
        if name == attr:
            return strategy_class(namespace)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
