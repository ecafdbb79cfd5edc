"""Wire format: a fixed int64 header, then (for data frames) one payload tensor.

Data frames are never pickled; control frames (``CTRL_*``) carry pickled small values, see ``collectives.py``.

Header: ``[MAGIC, fingerprint, kind, step, numel, dtype, src, extra, total]``. Every frame is checked
against the receiver's plan fingerprint and link before its payload is used. Chunk frames (the balanced
layout, ``balanced.py``) carry the chunk's index in ``extra`` and the whole message's length in ``total``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

MAGIC = 0x43524544  # "CRED"
HEADER_LEN = 9


class Kind(enum.IntEnum):
    UP = 1  # child -> parent: coded partial sum for a step
    DOWN = 2  # parent -> child: the reduced result for a step
    HEARTBEAT = 3  # liveness while a rank is busy computing
    ABORT = 4  # a rank the plan cannot do without died; ``extra`` names it
    BYE = 5  # orderly shutdown of a link
    CTRL_UP = 6  # child -> parent: values of a control collective (pickled, see collectives.py)
    CTRL_DOWN = 7  # parent -> child: a control collective's result
    CHUNK_UP = 8  # any rank -> a chunk's owner: that chunk of the rank's coded gradient (balanced layout)
    CHUNK_DOWN = 9  # owner -> every rank: the chunk's reduced sum (balanced layout)
    NOTE = 10  # child -> parent, on to rank 0: a value that waits for nobody (pickled, see notices.py)
    ANNOUNCE = 11  # parent -> child: rank 0's value, effective at ``step``, ahead of that result (notices.py)


WITH_PAYLOAD = (Kind.UP, Kind.DOWN, Kind.CTRL_UP, Kind.CTRL_DOWN, Kind.CHUNK_UP, Kind.CHUNK_DOWN, Kind.NOTE,
                Kind.ANNOUNCE)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8]


class FrameError(RuntimeError):
    """A frame that must not be used: corrupt, from another plan, or out of protocol."""


@dataclass(frozen=True)
class Header:
    kind: Kind
    step: int
    numel: int
    dtype: torch.dtype | None
    src: int
    extra: int = -1
    total: int = 0

    def encode(self, fingerprint: int) -> torch.Tensor:
        code = -1 if self.dtype is None else DTYPES.index(self.dtype)
        return torch.tensor([MAGIC, fingerprint, int(self.kind), self.step, self.numel, code, self.src, self.extra,
                             self.total], dtype=torch.int64)


def fingerprint_int(fingerprint: str) -> int:
    """The plan fingerprint (hex) as a non-negative int64."""
    return int(fingerprint[:15], 16)


def decode_header(raw: torch.Tensor, fingerprint: int, expected_src: int) -> Header:
    """Parse and validate a received header; raise ``FrameError`` naming what is wrong."""
    magic, fp, kind, step, numel, dtype, src, extra, total = (int(x) for x in raw.tolist())
    if magic != MAGIC:
        raise FrameError(f"malformed frame from rank {expected_src}: bad magic {magic:#x}")
    if fp != fingerprint:
        raise FrameError(
            f"rank {expected_src} uses a different CodedReduce plan (fingerprint {fp:x} != {fingerprint:x}); "
            "every rank must build the plan with the same world_size, branching, stragglers, code and seed")
    if src != expected_src:
        raise FrameError(f"frame on the link from rank {expected_src} claims to come from rank {src}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise FrameError(f"malformed frame from rank {src}: unknown kind {kind}") from None
    if numel < 0 or (kind in WITH_PAYLOAD) != (numel > 0) or not -1 <= dtype < len(DTYPES):
        raise FrameError(f"malformed {kind.name} frame from rank {src}: length {numel}, dtype code {dtype}")
    if step < 0 or total < 0:
        raise FrameError(f"malformed {kind.name} frame from rank {src}: negative step {step} or length {total}")
    return Header(kind, step, numel, None if dtype < 0 else DTYPES[dtype], src, extra, total)
