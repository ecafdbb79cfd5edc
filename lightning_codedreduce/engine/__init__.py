"""The engine: CodedReduce's transport and protocol on torch.distributed (no Lightning)."""
from .board import CodedReduceError
from .frames import FrameError
from .protocol import StepStats
from .reducer import CodedReducer

__all__ = ["CodedReduceError", "CodedReducer", "FrameError", "StepStats"]
