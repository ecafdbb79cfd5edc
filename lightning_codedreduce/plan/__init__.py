"""The CodedReduce plan: pure math (tree, codes, allocation, decoding), no I/O, no torch.distributed."""
from .codes import MAX_DECODE_NORM, Code, make_code
from .plan import CODES, CodedReducePlan, Shard

__all__ = ["CODES", "MAX_DECODE_NORM", "Code", "CodedReducePlan", "Shard", "make_code"]
