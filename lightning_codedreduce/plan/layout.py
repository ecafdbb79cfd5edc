"""How a step's gradient travels: the paper's tree, or the bandwidth-balanced layout (DESIGN §7).

``tree``: every parent takes in up to ``n`` children's full messages and every level adds a full
transfer -- the fewest messages, right for latency-bound (small) gradients.

``balanced``: the ranks form fractional-repetition groups over *all* ranks (``G = W // (s+1)``
groups; rank ``r`` is in group ``r mod G``; every member of a group computes the same samples). The
gradient is cut into chunks, and chunk ``c`` is owned by rank ``c mod W``:

1. every rank sends chunk ``c`` of its gradient to the chunk's owner (its own chunks stay local);
2. an owner keeps the first arrival of each group (its own gradient included), and once every group
   is in, sums them in group order (reproducible bits) and sends the reduced chunk to every rank;
3. a rank's result is complete when every owner's chunks have arrived.

With ``stragglers=0`` no straggler can be skipped, so the engine sums with gloo's ring all-reduce (DDP's
own) instead; the allocation (one group per rank, shares by speed) is the same.

Each rank's link carries about ``2 (W-1)/W`` gradients in and out per step, as ring all-reduce does,
and chunks are decoded and forwarded one by one, so memory for peers' messages is a few chunks. A
rank whose compute is slow is not waited for (its group has another member) and still serves its
chunks on time: its protocol thread does that while its compute runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LAYOUTS = ("auto", "tree", "balanced")
# ``layout="auto"``: gradients at least this large take the balanced layout. Below, the tree's fewer,
# larger messages win (latency-bound); the crossover is from the simulator (``sim.layout_crossover``)
# at 1-10 Gbit/s and 50-200 us per message, where it lies between 0.2 and 2 MB for 7-100 ranks.
BALANCED_MIN_BYTES = 2 << 20
# chunk size of the balanced layout: every chunk costs gloo a fixed message latency (about 0.5 ms on
# loopback), so fewer, larger chunks are faster (26 MB at W=4: 119 ms per reduce with 1 MiB chunks, 75 ms
# with 4 MiB, gloo's all_reduce 69 ms); memory for peers' chunks stays bounded by a few chunks per peer
DEFAULT_CHUNK_BYTES = 4 << 20


def choose_layout(world_size: int, gradient_bytes: int | None) -> tuple[str, str]:
    """``(layout, reason)`` for ``layout="auto"``: by message size and world size."""
    if gradient_bytes is None:
        return "tree", "gradient size unknown"
    size = f"{gradient_bytes / 2 ** 20:.1f} MiB"
    if world_size < 3:
        return "tree", f"{world_size} ranks: the tree is already one hop"
    if gradient_bytes >= BALANCED_MIN_BYTES:
        return "balanced", f"a {size} gradient is bandwidth-bound (>= {BALANCED_MIN_BYTES / 2 ** 20:g} MiB)"
    return "tree", f"a {size} gradient is latency-bound (< {BALANCED_MIN_BYTES / 2 ** 20:g} MiB)"


@dataclass(frozen=True)
class BalancedGroups:
    """The fractional-repetition groups of the balanced layout and their data."""

    world_size: int
    stragglers: int
    speeds: tuple[float, ...] | None = None  # relative compute speed per rank (None: all equal)

    @property
    def count(self) -> int:
        return max(1, self.world_size // (self.stragglers + 1))

    def group_of(self, rank: int) -> int:
        return rank % self.count

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Members of each group; replicas are ``count`` ranks apart (on different hosts when ranks fill hosts in order)."""
        return tuple(tuple(range(g, self.world_size, self.count)) for g in range(self.count))

    @property
    def shares(self) -> tuple[float, ...]:
        """Fraction of the global batch each group computes: proportional to its slowest member's speed,
        so that the groups finish together (every member computes all of its group's samples)."""
        if self.speeds is None:
            return (1.0 / self.count,) * self.count
        slowest = [min(self.speeds[r] for r in members) for members in self.groups]
        return tuple(x / sum(slowest) for x in slowest)

    def tolerates(self, stragglers) -> bool:
        """Whether every group still has a member outside ``stragglers``."""
        slow = set(stragglers)
        return all(any(r not in slow for r in members) for members in self.groups)


def chunk_bounds(total: int, element_size: int, world_size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Element ranges of the chunks of a ``total``-element message: about ``chunk_bytes`` each, a multiple
    of ``world_size`` of them (every owner gets as many), never empty; the same on every rank."""
    if total <= 0:
        raise ValueError(f"cannot chunk an empty message (total={total})")
    count = max(1, math.ceil(total * element_size / chunk_bytes))
    count = min(total, world_size * math.ceil(count / world_size))
    base, extra = divmod(total, count)
    bounds, start = [], 0
    for c in range(count):
        stop = start + base + (1 if c < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def owner_of(chunk: int, world_size: int) -> int:
    return chunk % world_size
