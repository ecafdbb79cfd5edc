"""``CodedReduceStrategy``: ``Trainer(strategy="codedreduce")``, PyTorch Lightning glue for the engine.

One strategy class (``core``: the life cycle) whose hooks delegate to collaborators, each owning its
state: ``data.TrainLoader`` (the training loader and the position it resumes at),
``aggregation.GradientAggregator`` (the reducing closure, pieces, catch-up), ``collectives.LightningCollectives``
(Lightning's collectives over the reduce tree, dead ranks) and ``internals.LightningInternals`` (every
Lightning internal, patched or read); ``checks`` holds what is validated before training.
The classes are created on first use, one per Lightning namespace (``strategy_class``), so importing
this package imports no Lightning.
"""
from .core import FORK_STRATEGY_NAME, STRATEGY_NAME, strategy_class
from .core import _CLASS_NAMES

__all__ = ["FORK_STRATEGY_NAME", "STRATEGY_NAME", "CodedReduceStrategy", "strategy_class"]


def __getattr__(name: str):
    for namespace, attr in _CLASS_NAMES.items():
        if name == attr:
            return strategy_class(namespace)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
