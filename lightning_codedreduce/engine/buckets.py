"""Where each parameter's gradient lies in a flat message, and the buckets it is handed in by.

One layout serves the Lightning strategy (``strategy/gradients.py``) and the Horovod API
(``horovod/gradients.py``): parameters in the optimizer's order, buckets formed from the last parameter
(which backward reaches first), the first bucket small (1 MiB, as DDP's) so communication starts early.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FIRST_BUCKET_BYTES = 1 << 20  # DDP's first bucket: small, so that communication starts early in backward


@dataclass(frozen=True)
class BucketLayout:
    """``slots[i] = (start, stop, bucket)`` of parameter ``i``; ``buckets[j] = (start, stop, members)``."""

    slots: tuple[tuple[int, int, int], ...]
    buckets: tuple[tuple[int, int, int], ...]
    total: int  # elements of all parameters

    @classmethod
    def of(cls, params: list[torch.Tensor], bucket_bytes: int, element_bytes: int = 4) -> "BucketLayout":
        starts, offset = [], 0
        for p in params:
            starts.append(offset)
            offset += p.numel()
        slots: list[tuple[int, int, int] | None] = [None] * len(params)
        buckets: list[tuple[int, int, int]] = []
        size, members = 0, []
        for i in reversed(range(len(params))):  # backward reaches the last parameters first
            members.append(i)
            size += element_bytes * params[i].numel()
            cap = min(bucket_bytes, FIRST_BUCKET_BYTES) if not buckets else bucket_bytes
            if size >= cap or i == 0:
                lo, hi = starts[members[-1]], starts[members[0]] + params[members[0]].numel()
                for j in members:
                    slots[j] = (starts[j], starts[j] + params[j].numel(), len(buckets))
                buckets.append((lo, hi, len(members)))
                size, members = 0, []
        return cls(tuple(slots), tuple(buckets), offset)  # type: ignore[arg-type]
