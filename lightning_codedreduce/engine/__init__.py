"""The engine: CodedReduce's transport and protocol on torch.distributed (no Lightning)."""
from .frames import FrameError
from .reducer import CodedReduceError, CodedReducer, StepStats

__all__ = ["CodedReduceError", "CodedReducer", "FrameError", "StepStats"]
