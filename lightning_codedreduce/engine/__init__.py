"""The engine: CodedReduce's transport and protocol on torch.distributed (no Lightning)."""
from .board import CodedReduceError
from .frames import FrameError
from .protocol import StepStats
from .reducer import CodedReducer
from .adaptive import AdaptiveReducer  # noqa: E402 - after CodedReducer, which it wraps

__all__ = ["AdaptiveReducer", "CodedReduceError", "CodedReducer", "FrameError", "StepStats"]
