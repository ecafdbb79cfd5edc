"""Every Lightning internal the strategy patches or reads, in one place, checked at set-up.

Lightning has no public hook for what a straggler-tolerant strategy needs: the per-step SIGTERM
broadcast must go (it is a global barrier per step), a piece's ``self.log`` calls must weigh what the
piece is worth, a skipped step must hand the loop an empty closure result. A Lightning release that
renames one of these would silently bring back the per-step barrier or mis-weigh the logs, so
:meth:`LightningInternals.check` verifies each of them when ``fit`` starts and stops with
:class:`LightningInternalsError`, naming the internal and the installed Lightning version.

Call order: ``check(trainer)`` then ``apply_patches(trainer, ...)`` in the strategy's ``setup``;
``remove_patches()`` in its ``teardown``; the accessors in between. The strategy holds one instance and
hands its accessors to the collaborators that need them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

SUPPORTED = ">=2.5,<2.7"  # as declared in pyproject.toml


class LightningInternalsError(RuntimeError):
    """The installed Lightning lacks (or changed) an internal the strategy depends on."""


@dataclass(frozen=True)
class Internal:
    """``attribute`` of ``owner`` (a class in ``module``, or ``trainer.<path>`` for a Trainer attribute)."""

    module: str  # relative to the Lightning namespace; "" for an attribute of the Trainer instance
    owner: str
    attribute: str
    use: str  # "patched" or "read", and why

    @property
    def name(self) -> str:
        where = f"{self.module}.{self.owner}" if self.module else self.owner
        return f"{where}.{self.attribute}"


INTERNALS: tuple[Internal, ...] = (
    Internal("loops.training_epoch_loop", "_TrainingEpochLoop", "_broadcast_sigterm_tensor",
             "patched: broadcasts before every batch, a global barrier per step; replaced by a local check"),
    Internal("trainer.connectors.signal_connector", "_SignalConnector", "_sigterm_notifier_fn",
             "patched: its matching broadcast would block rank 0 forever"),
    Internal("", "trainer", "_signal_connector", "read: the instance to patch"),
    Internal("", "trainer.fit_loop", "epoch_loop", "read: the instance to patch"),
    Internal("", "trainer", "_results", "read: the logging results of the running loop (a piece's log weight)"),
    Internal("trainer.connectors.logger_connector.result", "_ResultCollection", "_extract_batch_size",
             "read: honours a preset batch_size, which weighs a piece's epoch-level logs"),
    Internal("loops.optimization.automatic", "ClosureResult", "from_training_step_output",
             "read: the empty closure result of a step skipped by catch-up"),
    Internal("loops.optimization.automatic", "Closure", "_result", "read: where the closure result lives"),
    Internal("loops.fit_loop", "_FitLoop", "_skip_backward",
             "read: a piece is not back-propagated when Lightning skips backward (StochasticWeightAveraging)"),
    Internal("core.module", "LightningModule", "_current_fx_name",
             "read: which hook logs with sync_dist (a per-step collective)"),
    Internal("core.module", "LightningModule", "_trainer", "read: the trainer of the module being trained"),
    Internal("strategies.ddp", "DDPStrategy", "_setup_model", "overridden: the model is never wrapped in DDP"),
    Internal("strategies.ddp", "DDPStrategy", "_configure_launcher", "overridden: checks the launched world size"),
    Internal("strategies.ddp", "DDPStrategy", "_layer_sync", "read: sync_batchnorm undoes straggler tolerance"),
    Internal("plugins.precision.amp", "MixedPrecision", "scaler", "read: a piece's backward is scaled like Lightning's"),
    Internal("overrides.distributed", "_DatasetSamplerWrapper", "_sampler",
             "read: names the user's sampler inside Lightning's DistributedSamplerWrapper in an error message"),
    Internal("callbacks.model_checkpoint", "ModelCheckpoint", "_train_time_interval",
             "read: a time-based checkpoint broadcasts every step (warned)"),
)

# attributes set in __init__ rather than on the class: checked on an instance, or by the source of __init__
_INSTANCE_ATTRIBUTES = {("Closure", "_result"), ("LightningModule", "_current_fx_name"),
                        ("LightningModule", "_trainer"), ("DDPStrategy", "_layer_sync"), ("MixedPrecision", "scaler"),
                        ("ModelCheckpoint", "_train_time_interval"), ("_DatasetSamplerWrapper", "_sampler")}


def lightning_version(namespace: str) -> str:
    top = importlib.import_module(namespace.split(".")[0])
    return f"{top.__name__} {getattr(top, '__version__', '?')}"


class LightningInternals:
    """The one object that touches Lightning internals (see the module docstring). Owns the patches it applied."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._patched: list[tuple[object, str, bool, Any]] = []  # (object, attribute, had own value, old value)

    # ------------------------------------------------------------------ checks
    def _fail(self, internal: Internal, detail: str) -> None:
        raise LightningInternalsError(
            f"CodedReduceStrategy depends on the Lightning internal {self.namespace}.{internal.name} "
            f"({internal.use}), but the installed {lightning_version(self.namespace)} {detail}. Supported "
            f"Lightning versions: {SUPPORTED}; install one of them (e.g. pip install 'pytorch-lightning{SUPPORTED}')")

    def check(self, trainer: Optional[object] = None) -> None:
        """Every internal of ``INTERNALS`` is where the strategy expects it (instance ones on ``trainer``)."""
        for internal in INTERNALS:
            if not internal.module:
                if trainer is None:
                    continue
                owner: Any = trainer
                for part in internal.owner.split(".")[1:]:
                    owner = getattr(owner, part, None)
                if owner is None or not hasattr(owner, internal.attribute):
                    self._fail(internal, f"has no attribute {internal.attribute} on {internal.owner}")
                continue
            try:
                module = importlib.import_module(f"{self.namespace}.{internal.module}")
            except ImportError:
                self._fail(internal, f"has no module {internal.module}")
            cls = getattr(module, internal.owner, None)
            if cls is None:
                self._fail(internal, f"has no {internal.owner} in {internal.module}")
            if (internal.owner, internal.attribute) in _INSTANCE_ATTRIBUTES:
                if not _sets_attribute(cls, internal.attribute):
                    self._fail(internal, f"no longer sets {internal.owner}.{internal.attribute}")
            elif not hasattr(cls, internal.attribute):
                self._fail(internal, f"has no {internal.owner}.{internal.attribute}")

    # ------------------------------------------------------------------ patches
    def apply_patches(self, trainer, on_first_sigterm: Callable[[int], None]) -> None:
        """Replace the per-step SIGTERM broadcast by a local check (this rank stops with Lightning's
        ``SIGTERMException`` once it received SIGTERM), and the SIGTERM handler (whose matching broadcast is
        gone) by one that calls ``on_first_sigterm(signum)`` once and records the signal."""
        epoch_loop = trainer.fit_loop.epoch_loop
        if any(obj is epoch_loop for obj, *_ in self._patched):
            return
        connector = trainer._signal_connector
        exceptions = importlib.import_module(f"{self.namespace}.utilities.exceptions")

        def check_sigterm_locally() -> None:
            if getattr(trainer, "received_sigterm", False):
                raise exceptions.SIGTERMException()

        def sigterm_notifier(signum, frame) -> None:
            if not connector.received_sigterm:
                on_first_sigterm(signum)
            connector.received_sigterm = True

        self._patch(epoch_loop, "_broadcast_sigterm_tensor", check_sigterm_locally)
        self._patch(connector, "_sigterm_notifier_fn", sigterm_notifier)

    def _patch(self, obj: object, name: str, value: Any) -> None:
        had = name in vars(obj)
        self._patched.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def remove_patches(self) -> None:
        while self._patched:
            obj, name, had, old = self._patched.pop()
            if had:
                setattr(obj, name, old)
            else:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass

    @property
    def patched(self) -> bool:
        return bool(self._patched)

    # ------------------------------------------------------------------ reads
    @staticmethod
    def trainer_of(module) -> Optional[object]:
        return None if module is None else module._trainer

    @staticmethod
    def current_hook(module) -> Optional[str]:
        return getattr(module, "_current_fx_name", None)

    @staticmethod
    def user_sampler_name(sampler) -> str:
        """The user's sampler inside Lightning's ``DistributedSamplerWrapper`` (for error messages only)."""
        inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
        return type(inner if inner is not None else sampler).__name__

    @staticmethod
    def skips_backward(trainer) -> bool:
        return bool(trainer.fit_loop._skip_backward)

    @staticmethod
    def grad_scaler(precision_plugin) -> Optional[object]:
        return getattr(precision_plugin, "scaler", None)

    @staticmethod
    def layer_sync(strategy) -> Optional[object]:
        return strategy._layer_sync

    @staticmethod
    def checkpoints_on_time(callback) -> bool:
        return getattr(callback, "_train_time_interval", None) is not None

    @staticmethod
    def weigh_next_logs(trainer, batch: Any, weight: Optional[int]) -> None:
        """``self.log`` calls until the next piece weigh ``weight`` in epoch-level means (Lightning's ``batch_size``)."""
        results = trainer._results
        if results is not None:
            results.batch = batch
            results.batch_size = weight

    def mark_closure_skipped(self, closure: Any) -> None:
        """Lightning's automatic loop reads the closure's result after the step (``consume_result``) and
        raises "The closure hasn't been executed" when there is none: give it an empty one (loss None:
        the batch's output is ``{}``, as for a skipped step)."""
        if not hasattr(closure, "_result"):
            return  # manual optimization: the closure is the user's
        automatic = importlib.import_module(f"{self.namespace}.loops.optimization.automatic")
        closure._result = automatic.ClosureResult(None)


def _sets_attribute(cls: type, attribute: str) -> bool:
    """Whether ``cls`` (or a base) has ``attribute`` or assigns ``self.<attribute>`` in its source."""
    import inspect

    if hasattr(cls, attribute):
        return True
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if f"self.{attribute} =" in source or f"self.{attribute}:" in source:
            return True
    return False
