"""lightning_codedreduce: straggler-tolerant data-parallel training (CodedReduce) for PyTorch Lightning.

Importing the package registers ``Trainer(strategy="codedreduce")`` (and ``"codedreduce_fork"``, whose
processes are forked, for notebooks) in PyTorch Lightning's strategy registry -- and in
``lightning.pytorch``'s when that package is used. The plan and engine do not import Lightning.
"""
from ._registration import register_strategies
from .plan import CodedReducePlan, Shard

register_strategies()

__all__ = ["CodedReducePlan", "CodedReduceStrategy", "Shard", "is_counted", "register_strategies"]


def is_counted(trainer) -> bool:
    """Whether the samples ``training_step`` sees now are this rank's to count in per-sample metrics.

    Under CodedReduce several ranks compute each sample (that is the redundancy); exactly one of them
    counts it. Update a metric only when this is true and an epoch's count is the dataset's (with
    DDP's padding), as under DDP::

        if lightning_codedreduce.is_counted(self.trainer):
            self.train_acc.update(preds, target)

    True under every other strategy, so the same module runs under ``"ddp"``.
    """
    return bool(getattr(trainer.strategy, "counts_samples", True))
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "CodedReduceStrategy":  # imports pytorch_lightning: only when asked for
        from .strategy import CodedReduceStrategy

        return CodedReduceStrategy
    if name == "HorovodRunEnvironment":  # imports lightning_fabric: only when asked for
        from .environments import horovod_environment_class

        return horovod_environment_class("pytorch_lightning")
    if name in _CALLBACKS:  # imports pytorch_lightning too: only when asked for
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CALLBACKS = ("StragglerInjector", "StragglerMonitor", "plot_stragglers")
__all__ += list(_CALLBACKS) + ["HorovodRunEnvironment"]
