"""Small things the strategy and its collaborators share: ``override``, the logger, ``WarnOnce``, ``FitContext``."""
from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

log = logging.getLogger("lightning_codedreduce.strategy")

_F = TypeVar("_F", bound=Callable[..., Any])

try:
    from typing_extensions import override
except ImportError:  # pragma: no cover - typing_extensions ships with torch and Lightning
    def override(method: _F) -> _F:
        """Marks a method that overrides one of ``DDPStrategy`` (as ``typing_extensions.override`` does)."""
        method.__override__ = True  # type: ignore[attr-defined]
        return method


class WarnOnce:
    """Rank 0's warnings and notices, each key at most once per strategy.

    A message that every rank, or every step, repeated would drown the log. One instance is shared by
    the strategy's collaborators, so a key means the same thing everywhere. The rank is Lightning's
    (``rank_zero_only.rank``, which ``DDPStrategy.set_world_ranks`` sets on every rank).
    """

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._said: set[str] = set()

    def _rank_zero(self) -> Any:
        return importlib.import_module(f"{self._namespace}.utilities.rank_zero")

    def _on_rank_zero(self) -> bool:
        return getattr(self._rank_zero().rank_zero_only, "rank", 0) == 0

    def first(self, key: str) -> bool:
        """True the first time ``key`` is seen (and remembers it)."""
        if key in self._said:
            return False
        self._said.add(key)
        return True

    def __call__(self, key: str, message: str) -> None:
        """A ``UserWarning`` on rank 0, the first time ``key`` is seen."""
        if self.first(key):
            self.warn(message)

    def warn(self, message: str) -> None:
        """A ``UserWarning`` on rank 0, every time (for messages that say something new each time)."""
        if self._on_rank_zero():
            warnings.warn(message, UserWarning, stacklevel=3)

    def info(self, key: str, message: str) -> None:
        """Through Lightning's own info logger (shown by default, like Lightning's set-up messages), once."""
        if self.first(key) and self._on_rank_zero():
            try:
                self._rank_zero().rank_zero_info(message)
            except (ImportError, AttributeError):
                log.info(message)


@dataclass(frozen=True)
class FitContext:
    """What the collaborators need while one ``fit`` trains, handed to them when the reducer opens
    (``on_train_start``) and dropped when it closes: then nothing reaches back into the strategy."""

    trainer: Any
    module: Any  # the LightningModule
    reducer: Any  # the open CodedReducer
    rank: int
    world_size: int
    device: torch.device
    precision_plugin: Any
