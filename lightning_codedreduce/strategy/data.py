"""The training loader: the user's DataLoader rebuilt around the coded batch sampler, and where training is.

:class:`TrainLoader` owns the training position the checkpoint restores (epoch, batches consumed, the
engine's step number), so a resumed run continues at the first batch not yet trained on.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Optional

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from ..plan import CodedReducePlan
from ..sampler import CodedReduceBatchSampler, Piece
from ._common import WarnOnce, log


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
    loader again on resume. The state is the :class:`TrainLoader`'s position (the batches the strategy saw
    start, not the sampler's, because loaders and worker processes prefetch).
    """

    _codedreduce_source: Optional[Callable[[], Optional["TrainLoader"]]] = None

    def _source(self) -> Optional["TrainLoader"]:
        return self._codedreduce_source() if self._codedreduce_source else None

    def state_dict(self) -> dict[str, Any]:
        source = self._source()
        return source.state() if source is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        source = self._source()
        if source is not None:
            source.load_state(state_dict)


def _check_map_style(dl: object) -> None:
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
                         "batch_size=... (the per-rank batch, as with DDP) and shuffle=True/False instead")


def _data_order(dl: DataLoader, world_size: int, sampler_name: Callable[[Any], str]) -> tuple[bool, int, bool]:
    """``(shuffle, seed, the sampler's drop_last)`` of the loader's sampler: DDP's when Lightning injected one."""
    sampler = dl.sampler
    if type(sampler) is DistributedSampler:  # Lightning's injected one (or the user's own): DDP's samples
        if sampler.num_replicas != world_size:
            raise ValueError(f"the training DataLoader's DistributedSampler has num_replicas={sampler.num_replicas} "
                             f"but {world_size} ranks train; leave the sampler to Lightning")
        return bool(sampler.shuffle), int(sampler.seed), bool(sampler.drop_last)
    if isinstance(sampler, RandomSampler):  # Trainer(use_distributed_sampler=False)
        if sampler.replacement or sampler._num_samples is not None:
            raise ValueError("CodedReduceStrategy supports RandomSampler without replacement over the whole "
                             "dataset only; use shuffle=True")
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    else:
        raise ValueError(f"CodedReduceStrategy cannot use the custom sampler {sampler_name(sampler)}: it decides "
                         "which samples every rank processes. Use shuffle=True or shuffle=False (or a "
                         "DistributedSampler) in the training DataLoader")
    return shuffle, int(os.environ.get("PL_GLOBAL_SEED", 0) or 0), False


def _check_sizes(n: int, B: int, plan: CodedReducePlan, option: "int | str | None", drop_last: bool) -> None:
    if n == 0:
        raise ValueError("the training dataset is empty (len(dataset) == 0); CodedReduce needs at least "
                         f"{plan.min_global_batch_size} samples per step")
    low = plan.min_global_batch_size
    if option is not None and B < low:
        raise ValueError(f"global_batch_size={B} is too small for the CodedReduce plan of {plan.world_size} ranks "
                         f"(branching={plan.branching}, stragglers={plan.stragglers}): it needs at least {low} "
                         f"samples per step so that every rank gets one; use global_batch_size>={low}")
    if option is not None and drop_last and n < B:
        raise ValueError(f"the training dataset has {n} samples, fewer than the global batch of {B}, so "
                         f"drop_last=True leaves no step; use a smaller batch or drop_last=False")


def _check_manual_weights(plan: CodedReducePlan, B: int) -> None:
    """Manual optimization back-propagates the user's loss: the strategy cannot weight it per sample."""
    if all(sh.weight == 1.0 for shards in plan.allocation(B) for sh in shards):
        return
    raise ValueError(
        f"manual optimization needs a CodedReduce code whose sample weights are all 1, but the plan for "
        f"{plan.world_size} ranks (branching={plan.branching}, stragglers={plan.stragglers}, code={plan.code!r}) "
        f"weights samples unequally and the strategy cannot reweight a loss you back-propagate yourself. "
        f"Use code='frc' or a branching divisible by stragglers+1 (e.g. branching={2 * (plan.stragglers + 1)})")


def _rebuild(dl: DataLoader, batch_sampler: CodedReduceBatchSampler) -> CodedReduceDataLoader:
    """The loader's options (workers, collate, pinning, ...) around the coded batch sampler."""
    kwargs: dict[str, Any] = dict(num_workers=dl.num_workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory,
                                  timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
                                  multiprocessing_context=dl.multiprocessing_context, generator=dl.generator,
                                  persistent_workers=dl.persistent_workers,
                                  pin_memory_device=getattr(dl, "pin_memory_device", ""))
    if dl.num_workers > 0:
        kwargs["prefetch_factor"] = dl.prefetch_factor
    if hasattr(dl, "in_order"):
        kwargs["in_order"] = dl.in_order
    return CodedReduceDataLoader(dl.dataset, batch_sampler=batch_sampler, **kwargs)


def _steps_per_epoch(steps: int, limit: "int | float") -> int:
    """``len(sampler)`` cut by ``Trainer(limit_train_batches=...)`` as Lightning cuts it."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(steps, limit)
    if isinstance(limit, float) and limit < 1.0:
        return int(steps * limit)
    return steps


class TrainLoader:
    """Builds the training loader (``process_dataloader``) and keeps the training position for exact resume.

    The position: the epoch and the batches of it that started, the batch being trained (its pieces come
    from the sampler) and the engine's step number (``reduce_step``, one per optimizer step reduced).
    """

    def __init__(self, batch_option: "int | str | None", warn: WarnOnce, sampler_name: Callable[[Any], str]) -> None:
        self._option = batch_option
        self._warn = warn
        self._sampler_name = sampler_name  # names the user's sampler in an error message
        self.sampler: Optional[CodedReduceBatchSampler] = None
        self.global_batch_size: Optional[int] = batch_option if isinstance(batch_option, int) else None
        self._plan_fingerprint: Optional[str] = None
        self._limit: "int | float" = 1.0  # Trainer(limit_train_batches=...)
        self._epoch, self._consumed = 0, 0
        self._batch_idx = 0
        self._reduce_step = 0
        self._loaded_reduce_step: Optional[int] = None
        self._resume_check: Optional[tuple[int, int]] = None
        self._prefetch = 2  # the loader's prefetch (workers x prefetch_factor) plus Lightning's own one batch

    # ------------------------------------------------------------------ the position
    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batches of it that started)``."""
        return self._epoch, self._consumed

    @property
    def reduce_step(self) -> int:
        """The engine's number of the next optimizer step to reduce."""
        return self._reduce_step

    def step_reduced(self) -> None:
        self._reduce_step += 1

    def begin_fit(self, global_step: int) -> int:
        """The step number the reducer starts at: the checkpoint's (loaded with the loader state), else Lightning's."""
        start = self._loaded_reduce_step if self._loaded_reduce_step is not None else global_step
        if self._loaded_reduce_step is not None and self._loaded_reduce_step != global_step:
            log.debug(f"reduce step {self._loaded_reduce_step} from the loader state, global step {global_step}")
        self._loaded_reduce_step = None
        self._reduce_step = start
        return start

    def start_batch(self, epoch: int, batch_idx: int) -> None:
        if self._resume_check is not None:
            expected, self._resume_check = self._resume_check, None
            if (epoch, batch_idx) != expected:
                self._warn.warn(f"CodedReduce resumed the sampler at epoch {expected[0]} batch {expected[1]} but "
                                f"Lightning continues at epoch {epoch} batch {batch_idx}")
        self._epoch, self._consumed = epoch, batch_idx + 1
        self._batch_idx = batch_idx

    def pieces(self) -> tuple[Piece, ...]:
        """This rank's pieces of the batch being trained."""
        return self.sampler.pieces(self._batch_idx, self._epoch)

    def switch_point(self, accumulate: int, lead_batches: int) -> tuple[int, int, int]:
        """Where a plan switch decided now can take effect: ``(epoch, batch, optimizer steps ahead)`` of the first
        batch of an optimizer step at least ``lead_batches`` after the batch being trained (the loader may have
        prefetched the batches before it), or of the next epoch's first batch, whichever comes first."""
        accumulate = max(1, accumulate)
        batches = _steps_per_epoch(len(self.sampler), self._limit)
        epoch, batch, ahead = self._epoch, self._batch_idx + 1, 1
        while batch < batches and batch - self._batch_idx < lead_batches:
            batch, ahead = batch + accumulate, ahead + 1
        return (epoch + 1, 0, ahead) if batch >= batches else (epoch, batch, ahead)

    def position_after(self, steps: int, accumulate: int) -> tuple[int, int]:
        """``(epoch, batch)`` of the first batch of the optimizer step ``steps`` (>= 1) after the one whose last
        batch is being trained (Lightning steps at an epoch's last batch, accumulated or not)."""
        accumulate = max(1, accumulate)
        batches = _steps_per_epoch(len(self.sampler), self._limit)
        epoch, batch = self._epoch, self._batch_idx + 1  # the next step's first batch
        for later in range(steps):
            batch += accumulate if later else 0
            if batch >= batches:
                epoch, batch = epoch + 1, 0
        return epoch, batch

    @property
    def prefetched_batches(self) -> int:
        """How many batches the training loader may have drawn from the sampler ahead of the one trained."""
        return self._prefetch

    def step_size(self) -> int:
        """The global batch of the batch being trained."""
        return self.sampler.step_size(self._batch_idx)

    def first_of_step(self, accumulate: int) -> bool:
        """Whether the batch being trained is the first accumulation micro-batch of its optimizer step."""
        return self._batch_idx % max(1, accumulate) == 0

    # ------------------------------------------------------------------ building the loader
    def build(self, dl: object, plan: CodedReducePlan, rank: int, *, automatic: bool, limit_batches: "int | float",
              gather: Callable[[Any], list[Any]]) -> DataLoader:
        """``dl`` with this rank's coded share of DDP's global batches (or of fixed ones); ``gather`` is an
        all-gather over every rank (the ranks must agree on the data)."""
        _check_map_style(dl)
        world = plan.world_size
        shuffle, data_seed, sampler_drop_last = _data_order(dl, world, self._sampler_name)
        n, b = len(dl.dataset), int(dl.batch_size)
        option = self._option
        B = b * world if option is None else plan.global_batch_for(b) if option == "plan" else option
        mine = (n, B, shuffle, bool(dl.drop_last), data_seed)
        every = gather(mine)
        if any(e[:4] != mine[:4] for e in every):
            raise ValueError(f"the ranks disagree on the training data (dataset length, global batch, shuffle, "
                             f"drop_last): {every}; every rank must build the same DataLoader")
        data_seed = every[0][4]  # rank 0's seed: every rank must draw the same permutation
        _check_sizes(n, B, plan, option, bool(dl.drop_last))
        if not automatic:
            _check_manual_weights(plan, B)
        if option is None:
            batch_sampler = CodedReduceBatchSampler(n, plan, rank, seed=data_seed, shuffle=shuffle,
                                                    drop_last=bool(dl.drop_last), per_rank_batch=b,
                                                    num_replicas=world, sampler_drop_last=sampler_drop_last)
        else:
            batch_sampler = CodedReduceBatchSampler(n, plan, rank, B, seed=data_seed, shuffle=shuffle,
                                                    drop_last=bool(dl.drop_last))
        batch_sampler.sampler = _EpochForwarder(batch_sampler)  # so Lightning's _set_sampler_epoch reaches it
        if type(dl) is not DataLoader and type(dl) is not CodedReduceDataLoader:
            self._warn("subclass", f"the training loader ({type(dl).__name__}) is rebuilt as a plain torch "
                                   "DataLoader around the CodedReduce batch sampler; subclass behaviour is lost")
        loader = _rebuild(dl, batch_sampler)
        self._prefetch = 1 + (loader.num_workers * (loader.prefetch_factor or 2) if loader.num_workers else 1)
        loader._codedreduce_source = weakref.ref(self)
        self.sampler, self.global_batch_size = batch_sampler, B
        self._plan_fingerprint, self._limit = plan.fingerprint(), limit_batches
        self._epoch, self._consumed = 0, 0
        self._announce(plan, b, B)
        return loader

    def _announce(self, plan: CodedReducePlan, b: int, B: int) -> None:
        reduced = f", fewer at parent(s) {plan.reduced_tolerance} (too few children)" if plan.reduced_tolerance else ""
        how = {None: f"DDP's: {plan.world_size} ranks x batch_size={b}, the samples of DDP's DistributedSampler",
               "plan": f"derived from the plan for batch_size={b} (global_batch_size='plan')"}.get(
            self._option, "fixed by global_batch_size")
        self._warn.info("global_batch", (
            f"CodedReduce: {plan.world_size} ranks, branching {plan.branching}, tolerating {plan.stragglers} "
            f"straggler(s) per parent{reduced} (redundancy {plan.redundancy:.2f}); global batch {B} samples per step "
            f"({how}), rank 0 computes {len(self.sampler.sample_weights)}; {len(self.sampler)} steps per epoch"
            + (f"; ranks run their shares in pieces of at most {b}" if self._option is None else "")))

    # ------------------------------------------------------------------ loader state (Lightning's "combined_loader")
    def state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "consumed": self._consumed, "reduce_step": self._reduce_step,
                "global_batch_size": self.global_batch_size, "plan": self._plan_fingerprint}

    def load_state(self, state: dict[str, Any]) -> None:
        if not state or self.sampler is None:
            return
        epoch, consumed = int(state.get("epoch", 0)), int(state.get("consumed", 0))
        old_batch = state.get("global_batch_size")
        if old_batch not in (None, self.global_batch_size):
            self._warn.warn(f"resuming with global batch {self.global_batch_size} from a checkpoint trained with "
                            f"{old_batch}: the position in the epoch is approximate")
            consumed = (consumed * old_batch) // self.global_batch_size
        if consumed >= _steps_per_epoch(len(self.sampler), self._limit):  # the epoch was finished: the next one
            epoch, consumed = epoch + 1, 0
        self.sampler.load_state_dict({"epoch": epoch, "step": consumed})
        self._epoch, self._consumed = epoch, consumed
        self._resume_check = (epoch, consumed)
        if state.get("reduce_step") is not None:
            self._loaded_reduce_step = int(state["reduce_step"])
