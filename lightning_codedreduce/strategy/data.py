"""The training loader: the user's DataLoader rebuilt around the coded batch sampler, and its resumable state."""
from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Optional

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from ..sampler import CodedReduceBatchSampler
from ._common import _rank_zero_info, _rank_zero_warn


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


class TrainLoaderMixin:
    """Builds the training loader (``process_dataloader``) and tracks its position for exact resume."""

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
                             "batch_size=... (the per-rank batch, as with DDP) and shuffle=True/False instead")
        sampler = dl.sampler
        sampler_drop_last = False
        if type(sampler) is DistributedSampler:  # Lightning's injected one (or the user's own): DDP's samples
            shuffle, data_seed, sampler_drop_last = bool(sampler.shuffle), int(sampler.seed), bool(sampler.drop_last)
            if sampler.num_replicas != self.world_size:
                raise ValueError(f"the training DataLoader's DistributedSampler has num_replicas={sampler.num_replicas} "
                                 f"but {self.world_size} ranks train; leave the sampler to Lightning")
        elif isinstance(sampler, RandomSampler):  # Trainer(use_distributed_sampler=False)
            if sampler.replacement or sampler._num_samples is not None:
                raise ValueError("CodedReduceStrategy supports RandomSampler without replacement over the whole "
                                 "dataset only; use shuffle=True")
            shuffle, data_seed = True, None
        elif isinstance(sampler, SequentialSampler):
            shuffle, data_seed = False, None
        else:
            raise ValueError(f"CodedReduceStrategy cannot use the custom sampler {self._lightning.user_sampler_name(sampler)}: it decides "
                             "which samples every rank processes. Use shuffle=True or shuffle=False (or a "
                             "DistributedSampler) in the training DataLoader")
        if data_seed is None:
            data_seed = int(os.environ.get("PL_GLOBAL_SEED", 0) or 0)
        n = len(dl.dataset)
        b = int(dl.batch_size)
        option = self._batch_option
        B = b * self.world_size if option is None else self.plan.global_batch_for(b) if option == "plan" else option
        # every rank must agree on the data (dataset length, batch, order seed): check collectively
        mine = (n, B, shuffle, bool(dl.drop_last), data_seed)
        every = self._all_gather_object(mine)
        if any(e[:4] != mine[:4] for e in every):
            raise ValueError(f"the ranks disagree on the training data (dataset length, global batch, shuffle, "
                             f"drop_last): {every}; every rank must build the same DataLoader")
        data_seed = every[0][4]  # rank 0's seed: every rank must draw the same permutation
        if n == 0:
            raise ValueError("the training dataset is empty (len(dataset) == 0); CodedReduce needs at least "
                             f"{self.plan.min_global_batch_size} samples per step")
        low = self.plan.min_global_batch_size
        if option is not None and B < low:
            raise ValueError(f"global_batch_size={B} is too small for the CodedReduce plan of {self.world_size} ranks "
                             f"(branching={self.branching}, stragglers={self.stragglers}): it needs at least {low} "
                             f"samples per step so that every rank gets one; use global_batch_size>={low}")
        if option is not None and dl.drop_last and n < B:
            raise ValueError(f"the training dataset has {n} samples, fewer than the global batch of {B}, so "
                             f"drop_last=True leaves no step; use a smaller batch or drop_last=False")
        uniform = all(sh.weight == 1.0 for shards in self.plan.allocation(B) for sh in shards)
        if not self.lightning_module.automatic_optimization and not uniform:
            raise ValueError(
                f"manual optimization needs a CodedReduce code whose sample weights are all 1, but the plan for "
                f"{self.world_size} ranks (branching={self.branching}, stragglers={self.stragglers}, code={self.code!r}) "
                f"weights samples unequally and the strategy cannot reweight a loss you back-propagate yourself. "
                f"Use code='frc' or a branching divisible by stragglers+1 (e.g. branching={2 * (self.stragglers + 1)})")
        if option is None:
            batch_sampler = CodedReduceBatchSampler(n, self.plan, self.global_rank, seed=data_seed, shuffle=shuffle,
                                                    drop_last=bool(dl.drop_last), per_rank_batch=b,
                                                    num_replicas=self.world_size, sampler_drop_last=sampler_drop_last)
        else:
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
        self._position = (0, 0)
        if "global_batch" not in self._warned:
            self._warned.add("global_batch")
            reduced = (f", fewer at parent(s) {self.plan.reduced_tolerance} (too few children)"
                       if self.plan.reduced_tolerance else "")
            how = {None: f"DDP's: {self.world_size} ranks x batch_size={b}, the samples of DDP's DistributedSampler",
                   "plan": f"derived from the plan for batch_size={b} (global_batch_size='plan')"}.get(
                option, "fixed by global_batch_size")
            _rank_zero_info(self, f"CodedReduce: {self.world_size} ranks, branching {self.branching}, tolerating "
                                  f"{self.stragglers} straggler(s) per parent{reduced} (redundancy {self.plan.redundancy:.2f}); "
                                  f"global batch {B} samples per step ({how}), rank 0 computes "
                                  f"{len(batch_sampler.sample_weights)}; {len(batch_sampler)} steps per epoch"
                                  + (f"; ranks run their shares in pieces of at most {b}" if option is None else ""))
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
        super().on_train_batch_start(batch, batch_idx)

