"""``CodedReducePlan``: who talks to whom, who computes which samples, and how parents decode.

The global batch of one step is the data of the root's subtree (positions ``0 .. B-1``). A node
with data ``D_v`` keeps a local share and splits the rest into parts ``P_1..P_k``; child ``i``
receives the parts in the support of row ``i`` of the node's code ``B_v`` and returns
``sum_j B_v[i, j] g(P_j)``, recursively. A sample processed at rank ``r`` therefore carries the
product of the code coefficients on the path from the root to ``r``. Every rank builds the same
plan from ``(world_size, branching, stragglers, code, seed)``; ``fingerprint()`` lets them check.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from .layout import DEFAULT_CHUNK_BYTES, LAYOUTS, BalancedGroups, choose_layout
from .tree import Node, build_tree

CODES = ("auto", "frc")
CODED_SELF = ("none", "root", "all")


@dataclass(frozen=True)
class Shard:
    """Positions ``[start, stop)`` of one step's global batch, each sample weighted by ``weight``."""

    start: int
    stop: int
    weight: float

    def __len__(self) -> int:
        return self.stop - self.start


Segments = list[Shard]


def check_int(name: str, value: object, low: int, hint: str) -> int:
    """``value`` as an int >= ``low``, or a ``ValueError`` that says how to fix it (``hint``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); {hint}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}; {hint}")
    return int(value)


def check_speeds(speeds, world_size: int) -> tuple[float, ...] | None:
    """``speeds`` as a tuple of ``world_size`` positive finite floats (or None), or a ``ValueError`` saying how to fix it."""
    if speeds is None:
        return None
    try:
        values = tuple(float(x) for x in speeds)
    except (TypeError, ValueError):
        raise ValueError(f"speeds must be a sequence of numbers, one per rank, got {speeds!r}; "
                         "e.g. speeds=[1, 1, 0.5, 1] when rank 2 is twice as slow") from None
    if len(values) != world_size:
        raise ValueError(f"speeds has {len(values)} entries but there are {world_size} ranks; give one relative "
                         "speed per rank (1 for a normal rank, 0.5 for one that takes twice as long)")
    bad = [r for r, x in enumerate(values) if not (np.isfinite(x) and x > 0)]
    if bad:
        raise ValueError(f"speeds must be positive and finite, got {values[bad[0]]} for rank {bad[0]}; "
                         "give every rank a relative speed > 0 (a rank that cannot compute must leave the job)")
    return values


def _take(segments: Segments, count: int) -> tuple[Segments, Segments]:
    """Split a segment list after ``count`` samples."""
    head: Segments = []
    rest = list(segments)
    while count > 0:
        seg = rest.pop(0)
        if len(seg) <= count:
            head.append(seg)
            count -= len(seg)
        else:
            head.append(Shard(seg.start, seg.start + count, seg.weight))
            rest.insert(0, Shard(seg.start + count, seg.stop, seg.weight))
            count = 0
    return head, rest


def _round_split(total: int, fractions: tuple[float, ...]) -> list[int]:
    """Integers proportional to ``fractions`` summing to ``total`` (largest remainder, ties by index)."""
    raw = np.asarray(fractions) * total
    out = np.floor(raw + 1e-9).astype(int)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - int(out.sum())]:
        out[i] += 1
    return [int(x) for x in out]


class CodedReducePlan:
    """The CodedReduce tree, codes and data allocation for ``world_size`` ranks.

    Args:
        world_size: number of ranks (rank 0 is the root; it computes too).
        branching: most children per parent (``n``).
        stragglers: stragglers tolerated among the children of every parent (``s``); 0 is a plain
            uncoded tree reduce with redundancy exactly 1.
        code: ``"auto"`` (fractional repetition where ``s+1`` divides the fan-out, block codes
            otherwise) or ``"frc"`` (fractional repetition only).
        seed: seeds the search for remainder-block codes; every rank must use the same.
        layout: ``"tree"`` (the paper's), ``"balanced"`` (chunks owned by every rank, fractional
            repetition over all ranks; see ``layout.py``) or ``"auto"`` (by ``gradient_bytes``).
        gradient_bytes: size of the message reduced every step (``layout="auto"`` decides by it).
        chunk_bytes: chunk size of the balanced layout.
        speeds: relative compute speed of every rank (e.g. ``[1, 1, 0.5, 1]``: rank 2 takes twice as long
            per sample), for hardware that is persistently slower. Every rank's share is sized so that
            all finish together: in the tree a rank computes in proportion to its speed and a subtree
            receives what its ranks can cover; in the balanced layout a group's share is proportional to
            its slowest member's speed. Exactness and tolerance are unaffected; ``None``: all equal.
        coded_self: tree layout, whose own compute is one more slot of its code (``tree.py``), so that it
            still forwards on time when its compute is slow: ``"root"`` (rank 0, whose uncoded share would
            otherwise delay every step; a slow internal parent already counts as one straggling child of
            its own parent), ``"all"`` (every parent: a slow parent no longer uses up its parent's
            tolerance, at a higher R, see ``describe()``), or ``"none"`` (the paper's tree).
    """

    # defaults for subclasses that build their own tree (sim.MasterWorkerPlan): the tree layout
    layout = "tree"
    layout_reason = "layout='tree'"
    balanced: BalancedGroups | None = None
    chunk_bytes = DEFAULT_CHUNK_BYTES
    speeds: tuple[float, ...] | None = None
    coded_self = "none"

    def __init__(self, world_size: int, branching: int = 3, stragglers: int = 1, code: str = "auto", seed: int = 0,
                 layout: str = "tree", gradient_bytes: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 speeds=None, coded_self: str = "none"):
        self.world_size = check_int("world_size", world_size, 1, "use the number of training processes")
        self.branching = check_int("branching", branching, 2, "each parent needs at least 2 children, e.g. branching=3")
        self.stragglers = check_int("stragglers", stragglers, 0, "use 0 for an uncoded tree, 1 to tolerate one straggler per parent")
        self.seed = check_int("seed", seed, 0, "use any non-negative integer, the same on every rank")
        if self.stragglers >= self.branching:
            raise ValueError(
                f"stragglers={stragglers} must be smaller than branching={branching} (a parent cannot wait "
                f"for fewer than one child); use e.g. branching={stragglers + 2}, stragglers={stragglers}"
            )
        if code not in CODES:
            raise ValueError(f"unknown code {code!r}; choose one of {', '.join(map(repr, CODES))}")
        self.code = code
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(map(repr, LAYOUTS))} ('auto' picks "
                             "'balanced' for bandwidth-bound gradients, 'tree' for small ones)")
        if gradient_bytes is not None:
            gradient_bytes = check_int("gradient_bytes", gradient_bytes, 0, "pass the gradient's size in bytes")
        self.chunk_bytes = check_int("chunk_bytes", chunk_bytes, 1024, "use e.g. 1 MiB (1 << 20)")
        self.speeds = check_speeds(speeds, self.world_size)
        if coded_self not in CODED_SELF:
            raise ValueError(f"unknown coded_self {coded_self!r}; choose one of {', '.join(map(repr, CODED_SELF))} "
                             "(whose own compute is coded with its children's parts)")
        self.layout, self.layout_reason = (choose_layout(self.world_size, gradient_bytes) if layout == "auto"
                                           else (layout, f"layout={layout!r}"))
        self.balanced = None  # the balanced layout's groups (None for the tree)
        if self.layout == "balanced":
            if self.world_size < self.stragglers + 1:
                raise ValueError(f"the balanced layout needs at least stragglers+1 = {self.stragglers + 1} ranks to "
                                 f"tolerate {self.stragglers} straggler(s), got world_size={self.world_size}")
            self.balanced = BalancedGroups(self.world_size, self.stragglers, self.speeds)
            # the control collectives' tree: every rank under rank 0 (data travels on the chunk owners' links)
            self.nodes = [Node(0, None, tuple(range(1, self.world_size)), None, 1.0, (1.0,))]
            self.nodes += [Node(r, 0, (), None, 1.0, (1.0,)) for r in range(1, self.world_size)]
            return
        # at s=0 there is nothing to tolerate: an own slot would only be an uncoded part by another name
        self.coded_self = coded_self if self.stragglers > 0 else "none"
        try:
            self.nodes: list[Node] = build_tree(self.world_size, self.branching, self.stragglers, code, self.seed,
                                                self.speeds, self.coded_self)
        except ValueError as err:
            raise ValueError(f"{err}; {self._suggestion()}") from None

    def _suggestion(self) -> str:
        for n, s in ((self.branching, self.stragglers - 1), (self.stragglers + 1, self.stragglers), (3, 1)):
            if 0 <= s < n:
                try:
                    CodedReducePlan(self.world_size, n, s, "auto", self.seed)
                    return f"a configuration that works: branching={n}, stragglers={s}, code='auto'"
                except ValueError:
                    continue
        return "try stragglers=0"  # pragma: no cover - s=0 always works

    # ---------------------------------------------------------------- tree
    def parent(self, rank: int) -> int | None:
        return self.nodes[rank].parent

    def children(self, rank: int) -> list[int]:
        return list(self.nodes[rank].children)

    def links(self) -> list[tuple[int, int]]:
        """The point-to-point links every rank creates, in the same order: ``(parent, child)`` of every tree
        edge; in the balanced layout every pair of ranks (every rank owns chunks)."""
        if self.balanced is not None:
            return [(a, b) for a in range(self.world_size) for b in range(a + 1, self.world_size)]
        return [(self.parent(c), c) for c in range(1, self.world_size)]

    def tolerance(self, rank: int) -> int:
        """Stragglers tolerated among ``rank``'s children (0 for a leaf); the balanced layout: per chunk owner."""
        if self.balanced is not None:
            return self.stragglers
        code = self.nodes[rank].code
        return code.s if code else 0

    @cached_property
    def depth(self) -> int:
        if self.balanced is not None:
            return 1  # to the chunk's owner, back from it
        depth = [0] * self.world_size
        for node in self.nodes[1:]:
            depth[node.rank] = depth[node.parent] + 1
        return max(depth)

    @cached_property
    def reduced_tolerance(self) -> list[int]:
        """Parents that tolerate fewer than ``stragglers`` (they have too few children)."""
        if self.balanced is not None:
            return []
        return [n.rank for n in self.nodes if n.children and self.tolerance(n.rank) < self.stragglers]

    # ---------------------------------------------------------------- loads
    @cached_property
    def loads(self) -> np.ndarray:
        """Each rank's compute load as a fraction of the global batch."""
        if self.balanced is not None:
            shares = self.balanced.shares
            return np.array([shares[self.balanced.group_of(r)] for r in range(self.world_size)])
        data = np.zeros(self.world_size)
        data[0] = 1.0
        load = np.zeros(self.world_size)
        for node in self.nodes:  # breadth-first: parents before children
            own = [] if node.self_slot is None else node.code.support(node.self_slot)
            load[node.rank] = data[node.rank] * (node.split[0] + sum(node.split[1 + j] for j, _ in own))
            for slot, child in enumerate(node.children):
                data[child] = sum(data[node.rank] * node.split[1 + j] for j, _ in node.code.support(slot))
        return load

    @property
    def redundancy(self) -> float:
        """Total work per step divided by the global batch (1 for an uncoded tree)."""
        return float(self.loads.sum())

    @property
    def load_imbalance(self) -> float:
        """Largest per-rank load divided by the mean."""
        return float(self.loads.max() / self.loads.mean())

    def global_batch_for(self, per_rank_batch: int) -> int:
        """Global batch that gives the busiest rank about ``per_rank_batch`` samples per step."""
        per_rank_batch = check_int("per_rank_batch", per_rank_batch, 1, "use the DataLoader's batch_size")
        return max(self.min_global_batch_size, int(per_rank_batch / self.loads.max() + 1e-9))

    @cached_property
    def min_global_batch_size(self) -> int:
        """Smallest global batch that gives every rank at least one sample."""
        size = max(self.world_size, int(np.ceil(1.0 / self.loads.min() - 1e-9)))
        while not all(self._allocate(size)):  # rounding can still leave a rank empty: grow until none is
            size += 1
        return size

    # ---------------------------------------------------------------- allocation
    def shards(self, rank: int, global_batch_size: int) -> list[Shard]:
        """Positions of one step's global batch that ``rank`` processes, with their weights."""
        global_batch_size = check_int("global_batch_size", global_batch_size, 1, "pass the number of samples per step")
        local = self._allocate(global_batch_size)[rank]
        if sum(map(len, local)) == 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} is too small to give every one of the "
                f"{self.world_size} ranks a share; use at least {self.min_global_batch_size}"
            )
        return list(local)

    def allocation(self, global_batch_size: int) -> tuple[tuple[Shard, ...], ...]:
        """Every rank's shards of one step's global batch (a rank may get none when the batch is smaller
        than ``min_global_batch_size``, e.g. a short last batch of an epoch)."""
        global_batch_size = check_int("global_batch_size", global_batch_size, 1, "pass the number of samples per step")
        return self._allocate(global_batch_size)

    @lru_cache(maxsize=8)
    def _allocate(self, global_batch_size: int) -> tuple[tuple[Shard, ...], ...]:
        if self.balanced is not None:  # group g: the g-th contiguous part; every member computes all of it
            sizes = _round_split(global_batch_size, self.balanced.shares)
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
            return tuple(((Shard(int(starts[g]), int(starts[g + 1]), 1.0),) if sizes[g] else ())
                         for g in map(self.balanced.group_of, range(self.world_size)))
        data: list[Segments] = [[] for _ in range(self.world_size)]
        data[0] = [Shard(0, global_batch_size, 1.0)]
        local: list[tuple[Shard, ...]] = [()] * self.world_size
        for node in self.nodes:
            segs = data[node.rank]
            sizes = _round_split(sum(map(len, segs)), node.split)
            mine, rest = _take(segs, sizes[0])
            local[node.rank] = tuple(_merge(mine))
            parts = []
            for size in sizes[1:]:
                part, rest = _take(rest, size)
                parts.append(part)
            for slot, child in enumerate(node.children):
                data[child] = _row(node, slot, parts)
            if node.self_slot is not None:  # the own slot computes its row like a child (the uncoded share is 0)
                local[node.rank] = tuple(_merge(mine + _row(node, node.self_slot, parts)))
        return tuple(local)

    # ---------------------------------------------------------------- decoding
    def decoder(self, rank: int, arrived) -> dict[int, float] | None:
        """Coefficient per used contribution so that ``sum(coef * message)`` is ``rank``'s output.

        ``arrived``: the children whose messages are in, and ``rank`` itself once its own gradient is
        ready. The result names ``rank`` when its own gradient is used: always, with coefficient 1, for
        an uncoded local share (nothing decodes without it); under ``coded_self`` only when the code needs
        it, with the code's coefficient. ``None`` when the arrivals do not yet determine the output (keep
        waiting). Tree layout only.
        """
        if self.balanced is not None:
            raise ValueError("the balanced layout has no tree to decode: owners take one member per group")
        node = self.nodes[rank]
        arrived = set(arrived)
        if node.self_slot is None:
            if rank not in arrived:
                return None
            if not node.children:
                return {rank: 1.0}
        slot_of = {c: i for i, c in enumerate(node.children)}
        if node.self_slot is not None:
            slot_of[rank] = node.self_slot
        slots = frozenset(slot_of[c] for c in arrived if c in slot_of)
        coefs = node.code.decode(slots)
        if coefs is None:
            return None
        peer_of = {slot: peer for peer, slot in slot_of.items()}
        out = {peer_of[slot]: coef for slot, coef in coefs.items()}
        if node.self_slot is None:
            out[rank] = 1.0
        return out

    def tolerates(self, stragglers) -> bool:
        """Whether the root can decode when the ranks in ``stragglers`` never finish computing.

        A straggler's protocol thread still runs: a leaf straggler never sends; a parent straggler still
        forwards when its code decodes without its own slot (``coded_self``), and never sends otherwise."""
        slow = set(stragglers)
        if self.balanced is not None:  # slow compute anywhere, rank 0 included: owners still serve their chunks
            return self.balanced.tolerates(slow)
        return self._decodes(0, slow)

    def survives(self, dead) -> bool:
        """Whether the reduce goes on when the ranks in ``dead`` are gone, by the engine's rule: every live
        rank's parent is alive and every live parent decodes from its live children. Stricter than
        ``tolerates`` (the root could decode without a whole subtree, but its orphans cannot go on).
        The balanced layout needs every process (every rank owns chunks): it tolerates slow ranks, not dead ones."""
        dead = set(dead)
        if self.balanced is not None:
            return not dead
        if 0 in dead:  # the root's process decodes and sends every result
            return False
        for rank in range(self.world_size):
            if rank in dead:
                continue
            parent = self.parent(rank)
            if parent is not None and parent in dead:
                return False
            if self.decoder(rank, [rank, *(c for c in self.children(rank) if c not in dead)]) is None:
                return False
        return True

    def _decodes(self, rank: int, slow: set[int]) -> bool:
        # a child that cannot decode never sends: it counts as a straggler of its parent
        sending = [c for c in self.children(rank) if self._decodes(c, slow)]
        return self.decoder(rank, sending if rank in slow else [rank, *sending]) is not None

    # ---------------------------------------------------------------- reproducibility
    def irreproducible_reason(self) -> str | None:
        """Why two runs can give different bits (the result depends on which children arrive first), or None.

        With 0/1 codes a parent decodes from the first member of each group to arrive; the result is the
        same bits whichever it is only when every member computes its message the same way: the same
        samples (fractional repetition guarantees that) through identically shaped subtrees.
        """
        def shape(rank: int) -> tuple:
            node = self.nodes[rank]
            code = None if node.code is None else np.round(node.code.matrix, 12).tolist()
            return (tuple(round(x, 12) for x in node.split), str(code), tuple(shape(c) for c in node.children))

        leaf = ((1.0,), "None", ())  # an own slot computes its row as a leaf computes its data
        for node in self.nodes:
            if node.code is None:
                continue
            members = [*node.children, *([node.rank] if node.self_slot is not None else [])]  # slot order
            rows = [tuple(node.code.support(slot)) for slot in range(node.code.k)]
            if any(coef != 1.0 for row in rows for _, coef in row):
                return (f"rank {node.rank}'s code has coefficients other than 0 and 1, so its decoded sum depends on "
                        f"which children arrive first; use code='frc'")
            slot_shape = [leaf if m == node.rank else shape(m) for m in members]
            for slot, row in enumerate(rows):
                for other in range(slot):
                    if rows[other] == row and slot_shape[other] != slot_shape[slot]:
                        a, b = members[other], members[slot]
                        return (f"ranks {a} and {b} compute the same samples (one code group under rank {node.rank}) "
                                f"through differently shaped subtrees, so their messages differ in rounding and the "
                                f"result depends on which arrives first")
        return None

    # ---------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """Stable hash of everything that must agree across ranks (16 hex digits)."""
        spec = {
            "W": self.world_size, "n": self.branching, "s": self.stragglers, "code": self.code, "seed": self.seed,
            "parents": [n.parent for n in self.nodes],
            "codes": [None if n.code is None else np.round(n.code.matrix, 9).tolist() for n in self.nodes],
            "split": [[round(x, 9) for x in n.split] for n in self.nodes],
        }
        if self.balanced is not None:
            spec.update(layout="balanced", chunk_bytes=self.chunk_bytes)
        if self.speeds is not None:
            spec.update(speeds=[round(x, 9) for x in self.speeds])
        if self.coded_self != "none":
            spec.update(coded_self=self.coded_self)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """Readable summary: the tree, each parent's code and tolerance, per-rank loads."""
        lines = [
            f"CodedReducePlan(world_size={self.world_size}, branching={self.branching}, "
            f"stragglers={self.stragglers}, code={self.code!r})  fingerprint {self.fingerprint()}",
            f"  depth {self.depth}, redundancy {self.redundancy:.3f}, load imbalance {self.load_imbalance:.3f}, "
            f"min global batch {self.min_global_batch_size}",
        ]
        if self.speeds is not None:
            lines.append("  speed-proportional loads: relative speeds " + ", ".join(f"{x:g}" for x in self.speeds))
        if self.balanced is not None:
            lines.append(f"  layout balanced ({self.layout_reason}): chunks of {self.chunk_bytes / 2 ** 20:g} MiB, chunk c "
                         f"owned by rank c mod {self.world_size}; every rank sends each chunk to its owner, the owner "
                         "sums the first arrival of each group and sends the chunk to every rank")
            lines.append(f"  {self.balanced.count} fractional-repetition groups (any slow rank tolerated if its group "
                         "has another member; no dead rank):")
            lines += [f"    group {g}: ranks {list(m)}, {share:.1%} of the batch"
                      for g, (m, share) in enumerate(zip(self.balanced.groups, self.balanced.shares))]
            return "\n".join(lines)
        lines.append(f"  layout tree ({self.layout_reason}){self._own_share_note()}")
        if self.reduced_tolerance:
            lines.append(f"  reduced tolerance at parents {self.reduced_tolerance} (too few children)")
        mean = self.loads.mean()

        def walk(rank: int, indent: str) -> None:
            node = self.nodes[rank]
            info = f"rank {rank:>3}  load {self.loads[rank] / mean:5.2f}x mean"
            if node.code is not None:
                own = " + own slot" if node.self_slot is not None else ""
                info += (f"  children {list(node.children)}{own}  code {node.code.name} (k={node.code.k}, "
                         f"tolerates {node.code.s}, worst |a| {node.code.worst_norm():.2f})")
            lines.append(indent + info)
            for c in node.children:
                walk(c, indent + "  ")

        walk(0, "  ")
        return "\n".join(lines)

    def _own_share_note(self) -> str:
        """What ``describe`` says of the parents' own compute (nothing at s=0: there is nothing to tolerate)."""
        if self.coded_self != "none":
            whose = "rank 0" if self.coded_self == "root" else "every parent"
            return (f"; coded_self={self.coded_self!r}: the own compute of {whose} is a slot of its code, so a slow "
                    "one is tolerated like a slow child")
        if self.stragglers:
            return "; parents' own shares are uncoded: a slow root delays every step (coded_self='root' tolerates it)"
        return ""

    def __repr__(self) -> str:
        layout = "" if self.balanced is None else ", layout='balanced'"
        speeds = "" if self.speeds is None else f", speeds={list(self.speeds)}"
        own = "" if self.coded_self == "none" else f", coded_self={self.coded_self!r}"
        return (f"CodedReducePlan(world_size={self.world_size}, branching={self.branching}, "
                f"stragglers={self.stragglers}, code={self.code!r}, seed={self.seed}{layout}{speeds}{own})")


def _row(node: Node, slot: int, parts: list[Segments]) -> Segments:
    """The data of code slot ``slot``: its row's parts, each sample's weight times the row's coefficient."""
    return [Shard(p.start, p.stop, p.weight * coef) for j, coef in node.code.support(slot) for p in parts[j]]


def _merge(segments: Segments) -> Segments:
    out: Segments = []
    for seg in segments:
        if len(seg) == 0:
            continue
        if out and out[-1].stop == seg.start and out[-1].weight == seg.weight:
            out[-1] = Shard(out[-1].start, seg.stop, seg.weight)
        else:
            out.append(seg)
    return out

