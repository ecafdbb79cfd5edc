"""``CodedReduceStrategy``: ``Trainer(strategy="codedreduce")``, PyTorch Lightning glue for the engine.

``core`` holds the life cycle; ``data``, ``aggregation``, ``collectives`` and ``patches`` the parts.
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
