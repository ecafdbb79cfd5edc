"""Tree shape and fractional loads for any world size.

Shape: a subtree of ``m`` ranks gives its root up to ``n`` children whose subtree sizes are as
equal as possible (sizes differ by at most one, so FRC groups pair equal or near-equal subtrees).
Fan-outs whose code would be unsafe, and child subtrees of 2..s+1 ranks (whose own parent could
not keep the full tolerance), are avoided when another fan-out allows it. A regular tree
``W = 1 + n + ... + n^L`` comes out exactly regular.

Loads: with every rank computing one unit, a subtree's *capacity* is the most data it can cover:
``cap(v) = 1 + max 1^T p  s.t.  S_v p <= cap(children), p >= 0`` (``S_v`` the 0/1 support of the
code). The optimal parts ``p*`` fix, at every node, the proportions in which its data is split
into (local share, part 1, ..., part k); a subtree that receives less than its capacity scales all
of its loads down uniformly.

Coded own share (``coded_self``): a parent's own compute becomes one more slot of its code, the last
one (slot ``k`` after its ``k`` children), with capacity 1. It computes that slot's row like a child
would, so its parent-side decode can go on without it: a parent whose compute is slow, the root
included, still forwards on time. Then ``cap(v) = max 1^T p  s.t.  S_v p <= (cap(children), 1)`` and
the uncoded local share is 0. The shape search also tries giving a parent ``s`` leaf children, so
that its own slot shares a fractional-repetition group with leaves of equal capacity.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import linprog

from .codes import MAX_DECODE_NORM, Code, make_code


@dataclass(frozen=True)
class Node:
    """One rank in the tree: its parent, children (slot order), code and split proportions."""

    rank: int
    parent: int | None
    children: tuple[int, ...]
    code: Code | None  # None for leaves
    capacity: float  # data this subtree covers when every rank computes its speed (default one unit)
    split: tuple[float, ...]  # (local, part_1, ..., part_k) / capacity: sums to 1 (k = code.k)
    coded_self: bool = False  # own compute is the code's last slot (the uncoded local share is then 0)

    @property
    def self_slot(self) -> int | None:
        """The code slot this rank's own compute fills, or None (its local share is uncoded)."""
        return len(self.children) if self.coded_self and self.children else None


@lru_cache(maxsize=None)
def code_for(k: int, s: int, code: str, seed: int) -> Code | None:
    """The code for a fan-out of ``k`` at tolerance ``min(s, k-1)``, or ``None`` if unsafe or unavailable."""
    try:
        c = make_code(k, min(s, k - 1), code, seed)
    except ValueError:  # e.g. code="frc" with s+1 not dividing k: the shape search skips this fan-out
        return None
    return c if c.worst_norm() <= MAX_DECODE_NORM else None


def _even_split(total: int, parts: int) -> list[int]:
    q, r = divmod(total, parts)
    return [q + 1] * r + [q] * (parts - r)


@dataclass(frozen=True)
class Shape:
    """Best shape found for a subtree of ``m`` ranks and what it achieves when filled to capacity."""

    sizes: tuple[int, ...]  # child subtree sizes, largest first
    capacity: float
    work: float  # total load of its ranks (= m when perfectly balanced)
    reduced: int  # parents inside with fewer than s+1 children (reduced tolerance)


def _evaluate(sizes: list[int], n: int, s: int, code: str, seed: int, coded_self: bool,
              root_only: bool = False) -> Shape | None:
    slots = len(sizes) + coded_self
    c = code_for(slots, s, code, seed)
    if c is None:
        return None
    kids = [shape(x, n, s, code, seed, coded_self and not root_only) for x in sizes]
    caps = tuple(k.capacity for k in kids) + ((1.0,) if coded_self else ())
    parts = parts_lp(c, caps)
    data = [sum(parts[j] for j, _ in c.support(i)) for i in range(slots)]
    own = data[-1] if coded_self else 1.0
    work = own + sum(k.work * d / k.capacity for k, d in zip(kids, data))
    reduced = int(slots < s + 1) + sum(k.reduced for k in kids)
    return Shape(tuple(sizes), (0.0 if coded_self else 1.0) + sum(parts), work, reduced)


@lru_cache(maxsize=None)
def shape(m: int, n: int, s: int, code: str, seed: int, coded_self: bool = False, root_only: bool = False) -> Shape:
    """Shape of a subtree of ``m`` ranks: children as equal as possible, balanced, fully tolerant.

    Candidates per fan-out ``k``: the even split, and a repaired one where each crippled child
    (2..s+1 ranks, too few to keep the tolerance) hands its ranks to the largest healthy sibling;
    with ``coded_self``, also splits with 1..s leaf children for the parent's own slot to pair with.
    Among candidates with the fewest reduced-tolerance parents, the widest fan-out within 3% of
    the best balance wins.
    """
    rest = m - 1
    if rest == 0:
        return Shape((), 1.0, 1.0, 0)
    options = []
    widest = min(n, rest)
    fan_outs = [widest] if rest > n * n else range(widest, 0 if rest == 1 else 1, -1)  # big subtrees: fan out fully
    for k in fan_outs:
        even = _even_split(rest, k)
        crippled = [1 < x <= s + 1 for x in even]
        candidates = [even]
        if any(crippled) and not all(crippled):
            keep = max((j for j in range(k) if not crippled[j]), key=lambda j: even[j])
            repaired = [1 if bad else x for x, bad in zip(even, crippled)]
            repaired[keep] += rest - sum(repaired)
            candidates.append(sorted(repaired, reverse=True))
        if coded_self:  # leaves (capacity 1, as the own slot) last, in the own slot's group
            candidates += [_even_split(rest - leaves, k - leaves) + [1] * leaves
                           for leaves in range(1, min(s, k - 1) + 1) if rest - leaves >= k - leaves]
        for sizes in candidates:
            result = _evaluate(sizes, n, s, code, seed, coded_self, root_only)
            if result is not None:
                options.append(result)
    if not options:
        raise ValueError(f"no safe code for any fan-out <= {n} at stragglers={s}")
    fewest = min(o.reduced for o in options)
    options = [o for o in options if o.reduced == fewest]
    best_eff = max(o.work / m for o in options)
    good = [o for o in options if o.work / m >= best_eff - 0.03]
    return max(good, key=lambda o: (len(o.sizes), o.work))


@lru_cache(maxsize=None)
def parts_lp(code: Code, caps: tuple[float, ...]) -> tuple[float, ...]:
    """Largest total part size ``p`` with ``S p <= caps`` for one parent (FRC blocks in closed form)."""
    p = np.zeros(code.k)
    for block in code.blocks:
        idx = list(block.slots)
        if block.kind == "frc":  # every member covers every part of its block
            p[idx[0]] = min(caps[i] for i in idx)
            continue
        mask = (block.matrix != 0).astype(float)
        block_caps = [caps[i] for i in idx]
        res = linprog(-np.ones(len(idx)), A_ub=mask, b_ub=block_caps, bounds=(0, None), method="highs")
        if res.success and (mask @ res.x).min() <= 1e-9 * max(block_caps):
            # an optimum that starves a child (possible with unequal capacities, e.g. speed-proportional loads)
            # would idle its whole subtree: give every part a floor that keeps every child busy
            floor = min(block_caps) / (4 * mask.sum(axis=1).max())
            res = linprog(-np.ones(len(idx)), A_ub=mask, b_ub=block_caps, bounds=(floor, None), method="highs")
        if not res.success:  # pragma: no cover - the LP is always feasible (p = 0, or p = floor)
            raise RuntimeError(res.message)
        p[idx] = res.x
    return tuple(float(x) for x in p)


def build_tree(world_size: int, n: int, s: int, code: str, seed: int,
               speeds: tuple[float, ...] | None = None, coded_self: str = "none") -> list[Node]:
    """Breadth-first ranks (0 is the root), each with its code and split proportions.

    ``speeds``: each rank's relative compute speed (default all 1). A rank's own share is proportional
    to its speed and a subtree's capacity is its root's speed plus the parts its children can cover,
    so with every subtree filled to capacity all ranks finish together (the shape stays the one for
    equal speeds). ``coded_self``: whose own compute is its code's last slot (module docstring): ``"none"``,
    ``"root"`` or ``"all"`` parents."""
    def coded(v: int) -> bool:
        return coded_self == "all" or (coded_self == "root" and v == 0)

    def shape_of(v: int, m: int) -> Shape:
        return shape(m, n, s, code, seed, coded(v), coded_self == "root")

    # 1. shape, ranks assigned level by level (sizes solved smallest first: no deep recursion)
    for m in range(1, world_size + 1):
        shape(m, n, s, code, seed, coded_self == "all")
    parent: list[int | None] = [None]
    sizes = [world_size]
    kids: list[list[int]] = [[]]
    frontier = [0]
    while frontier:
        nxt = []
        for v in frontier:
            for size in shape_of(v, sizes[v]).sizes:
                r = len(parent)
                parent.append(v)
                sizes.append(size)
                kids.append([])
                kids[v].append(r)
                nxt.append(r)
        frontier = nxt
    # 2. capacities bottom-up (children have larger ranks than parents)
    own = tuple(speeds) if speeds is not None else (1.0,) * world_size
    caps = list(own)
    parts: list[tuple[float, ...]] = [()] * world_size
    codes: list[Code | None] = [None] * world_size
    local = list(own)  # uncoded local share (in units of data)
    for v in reversed(range(world_size)):
        if kids[v]:
            codes[v] = code_for(len(kids[v]) + coded(v), s, code, seed)
            child_caps = tuple(caps[c] for c in kids[v])
            parts[v] = parts_lp(codes[v], child_caps + ((own[v],) if coded(v) else ()))
            local[v] = 0.0 if coded(v) else own[v]
            caps[v] = local[v] + sum(parts[v])  # own speed (uncoded) + what the slots cover
    return [
        Node(v, parent[v], tuple(kids[v]), codes[v], caps[v], tuple(x / caps[v] for x in (local[v], *parts[v])),
             coded(v) and bool(kids[v]))
        for v in range(world_size)
    ]
