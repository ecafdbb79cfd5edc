"""lightning_codedreduce: straggler-tolerant data-parallel training (CodedReduce) for PyTorch Lightning."""
from .plan import CodedReducePlan, Shard

__all__ = ["CodedReducePlan", "Shard"]
__version__ = "0.1.0"
