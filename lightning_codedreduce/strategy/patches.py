"""Instance-level patches of Lightning internals that would add a global barrier per step (undone in teardown)."""
from __future__ import annotations

from typing import Any

from ._common import log


class LightningPatchesMixin:
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

