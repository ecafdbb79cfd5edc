"""Registers ``"codedreduce"`` / ``"codedreduce_fork"`` in Lightning's ``StrategyRegistry``.

Lightning has no entry point for third-party strategies, so the names are registered when this
package is imported. Importing PyTorch Lightning takes seconds, and the plan and engine do not
need it, so the package does not import it: if ``pytorch_lightning`` (or ``lightning.pytorch``) is
already imported the names are registered at once, otherwise right after it is imported (a
post-import hook on ``sys.meta_path``). Either order of imports works.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
_lock = threading.RLock()
_done: set[str] = set()


def _register(namespace: str) -> None:
    with _lock:
        if namespace in _done:
            return
        _done.add(namespace)
    from .strategy import strategy_class

    registry = importlib.import_module(f"{namespace}.strategies").StrategyRegistry
    strategy_class(namespace).register_strategies(registry)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of a Lightning namespace so the strategy names are registered once it is loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in NAMESPACES or fullname in _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                _register(fullname)
            except Exception as err:  # never break the user's import of Lightning
                warnings.warn(f"lightning_codedreduce could not register its strategies in {fullname}: {err!r}; "
                              f"pass Trainer(strategy=CodedReduceStrategy(...)) instead", RuntimeWarning)

        loader.exec_module = exec_then_register
        return spec


_finder = _RegisterAfterImport()


def register_strategies() -> None:
    """Register now in every Lightning namespace already imported; register in the others when they are.

    Safe to call any number of times (names already present are left alone).
    """
    for namespace in NAMESPACES:
        if namespace in sys.modules:
            _register(namespace)
    if _finder not in sys.meta_path and not all(ns in _done for ns in NAMESPACES):
        sys.meta_path.insert(0, _finder)
