"""Discrete-event model of CodedReduce and its baselines, for scales one machine cannot host.

Pure Python/NumPy (no torch.distributed). One step of each scheme, chained over many steps with the
runtime's semantics (no global barrier; a lagging rank applies results it missed without computing):

* ``cr``   CodedReduce on the tree of ``CodedReducePlan(W, n, s)`` (``s=0``: the uncoded tree).
  Upward, a node decodes at the first arrival set its code can decode (``plan.decoder``), after its
  own gradient is ready (with ``coded_self``, its own gradient is one more arrival the code may do
  without), and sends one message; downward, every parent sends the result to all of its children.
* ``gc``   master-worker gradient coding (Tandon et al.): a flat plan, W-1 workers under a master
  that does not compute (``MasterWorkerPlan``); the master decodes from the first decodable set.
* ``cr`` with ``layout="balanced"``: every rank sends chunk ``c`` of its gradient to the chunk's owner
  ``c mod W`` (all owners at once: its egress carries ``(W-1)/W`` of the gradient); an owner reduces a
  chunk once the first member of every fractional-repetition group is in, and sends it to every rank
  (again ``(W-1)/W`` of the gradient through each host's links). See ``plan/layout.py``.
* ``rar``  ring all-reduce (Horovod, gloo/DDP): waits for every worker, then 2(W-1) ring steps of
  M/W bytes each.

Network: every host has a full-duplex link of ``bandwidth_bps``; messages into one host share its
ingress (processor sharing, like TCP flows through one rate limiter), messages out of one host
share its egress; each message also pays ``latency_s`` (wire plus software, one way). Ring steps pay
``ring_latency_s`` each. Summing a received message costs ``bytes / decode_bytes_per_s``.

Compute: each rank's straggler-free compute time per step (proportional to its load), plus the
straggler model's delays (``Stragglers``, shared with the benchmark harness so simulated and
emulated runs use the same delays, ranks and stall episodes).

    python -m lightning_codedreduce.sim            # paper-scale table and a sweep to 10,000 workers
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np

from .plan import CodedReducePlan, Shard
from .plan.codes import make_code
from .plan.layout import chunk_bounds
from .plan.tree import Node, parts_lp

__all__ = ["MasterWorkerPlan", "NetworkModel", "SimResult", "StragglerSpec", "Stragglers", "simulate",
           "paper_table", "sweep", "replay", "ring_time", "step_time", "Topology"]


# ---------------------------------------------------------------------------- GC as a plan
class MasterWorkerPlan(CodedReducePlan):
    """Tandon et al.'s gradient coding as a plan: rank 0 is a master that holds no data.

    A flat tree of ``W-1`` workers under rank 0 with the project's code for fan-out ``W-1``
    (fractional repetition when ``s+1`` divides ``W-1``: redundancy ``s+1``); the root's local
    share is zero, so ``CodedReducer`` runs it unchanged: workers send coded partial sums, the
    master decodes from the first decodable set and sends the sum back.
    """

    def __init__(self, world_size: int, stragglers: int = 1, code: str = "auto", seed: int = 0):
        if world_size < 3:
            raise ValueError(f"gradient coding needs a master and at least 2 workers, got world_size={world_size}")
        k = world_size - 1
        if not 0 <= stragglers < k:
            raise ValueError(f"stragglers must be in 0..{k - 1} for {k} workers, got {stragglers}")
        self.world_size, self.branching, self.stragglers, self.code, self.seed = world_size, k, stragglers, code, seed
        # no decode-norm limit here: with FRC (s+1 divides W-1) the decode is a plain sum of one
        # message per group, whatever the number of groups
        c = make_code(k, stragglers, code, seed)
        parts = parts_lp(c, (1.0,) * k)
        total = sum(parts)
        self.nodes = [Node(0, None, tuple(range(1, world_size)), c, total, (0.0, *(x / total for x in parts)))]
        self.nodes += [Node(i, 0, (), None, 1.0, (1.0,)) for i in range(1, world_size)]

    @cached_property
    def min_global_batch_size(self) -> int:
        size = max(self.world_size, int(np.ceil(1.0 / self.loads[1:].min() - 1e-9)))
        while not all(self._allocate(size)[1:]):
            size += 1
        return size

    @property
    def load_imbalance(self) -> float:
        return float(self.loads[1:].max() / self.loads[1:].mean())

    def shards(self, rank: int, global_batch_size: int) -> list[Shard]:
        if rank == 0:
            return []
        return super().shards(rank, global_batch_size)

    def __repr__(self) -> str:
        return f"MasterWorkerPlan(world_size={self.world_size}, stragglers={self.stragglers}, code={self.code!r})"


# ---------------------------------------------------------------------------- straggler models
STRAGGLER_MODELS = ("none", "paper", "slow", "slowroot", "heavy", "blog", "shiftexp", "phases")
PHASES = ("none", "heavy", "slow", "none")  # the phase-changing run: calm, heavy stalls, one slow rank, calm
PERSISTENT_MODELS = ("paper", "slow", "slowroot")  # fixed ranks, slow at every step


@dataclass(frozen=True)
class StragglerSpec:
    """How workers straggle. Every rank that computes may straggle, rank 0 included; only a rank that
    computes nothing (gradient coding's master) never does.

    * ``none``
    * ``paper``: ``count`` fixed ranks (seeded choice) sleep ``factor`` x their compute time every
      step (the paper: 3x).
    * ``slow``: ``count`` fixed ranks (seeded choice) are persistently slower: ``1 + factor`` x their
      compute time every step (default 2x: older or throttled hardware).
    * ``slowroot``: rank 0 is persistently ``1 + factor`` x slower (default 3x).
    * ``blog``: the PyTorch hierarchical-SGD blog's protocol: every rank, every step, sleeps ``factor`` x
      its compute time with probability ``prob`` (default 1 %, 18x).
    * ``phases``: a phase-changing run, ``count`` steps per phase (default 50): calm, heavy stalls, one
      rank persistently 2x slower, calm (each phase as its model's default).
    * ``heavy``: stall episodes of ``factor`` x the stalled worker's compute time (>= 10), one random
      worker at a time, back to back on the shared wall clock; a stalled worker's compute makes no
      progress. For a synchronous scheme that is one random worker stalling ~``factor`` x in every
      step; for CodedReduce, which does not wait, it is the same physical process (a per-step-index
      draw would put ~``factor`` workers in simultaneous stalls, beyond any tolerance).
    * ``shiftexp``: every worker's compute time is ``T + Exp(mean = scale x T)``, drawn per step.
    """

    name: str
    factor: float = 0.0
    count: int = 1
    scale: float = 0.0
    prob: float = 0.0

    def __post_init__(self):
        if self.name not in STRAGGLER_MODELS:
            raise ValueError(f"unknown straggler model {self.name!r}; use one of {STRAGGLER_MODELS}")

    @staticmethod
    def default(name: str) -> "StragglerSpec":
        return {"none": StragglerSpec("none"), "paper": StragglerSpec("paper", factor=3.0, count=1),
                "slow": StragglerSpec("slow", factor=1.0, count=1), "slowroot": StragglerSpec("slowroot", factor=2.0),
                "heavy": StragglerSpec("heavy", factor=10.0), "blog": StragglerSpec("blog", factor=18.0, prob=0.01),
                "shiftexp": StragglerSpec("shiftexp", scale=1.0), "phases": StragglerSpec("phases", count=50)}[name]

    def describe(self) -> str:
        return {"none": "no stragglers",
                "paper": f"{self.count} fixed rank(s) sleep {self.factor:g}x compute every step",
                "slow": f"{self.count} fixed rank(s) persistently {1 + self.factor:g}x slower",
                "slowroot": f"rank 0 persistently {1 + self.factor:g}x slower",
                "blog": f"every rank, every step: sleeps {self.factor:g}x compute with probability {self.prob:g}",
                "heavy": f"one worker at a time stalls {self.factor:g}x its compute (back-to-back episodes)",
                "shiftexp": f"compute = T + Exp(mean {self.scale:g} T), every worker, every step",
                "phases": f"{self.count} steps each of: " + ", ".join(PHASES)}[self.name]


def persistent_ranks(spec: StragglerSpec, eligible: list[int], seed: int) -> set[int]:
    """The ranks a persistent model slows down at every step: a seeded choice among ``eligible`` (rank 0
    for ``slowroot``); empty for the other models."""
    if spec.name == "slowroot":
        return {0} & set(eligible)
    if spec.name not in PERSISTENT_MODELS or not eligible:
        return set()
    rng = np.random.default_rng([seed, 7])
    count = min(spec.count, len(eligible))
    return set(int(r) for r in rng.choice(eligible, size=count, replace=False))


def persistent_speeds(spec: StragglerSpec, world: int, seed: int) -> list[float]:
    """Relative speeds that a persistent model gives ``world`` computing ranks (``CodedReducePlan(speeds=)``):
    what a user who measured the slow hardware would pass."""
    slow = persistent_ranks(spec, list(range(world)), seed)
    return [1.0 / (1.0 + spec.factor) if r in slow else 1.0 for r in range(world)]


class Stragglers:
    """Deterministic straggler delays shared by all ranks: a function of (seed, rank, step, clock)."""

    def __init__(self, spec: StragglerSpec, world: int, compute_s: dict[int, float], seed: int = 0,
                 t0: float = 0.0):
        self.spec, self.world, self.seed, self.t0 = spec, world, seed, t0
        self.compute_s = compute_s  # rank -> straggler-free compute seconds per step
        self.eligible = sorted(r for r, t in compute_s.items() if t > 0)  # rank 0 included
        self.fixed = persistent_ranks(spec, self.eligible, seed)
        self._ep_start: list[float] = []  # heavy: episode k covers [start_k, start_k + dur_k) on rank_k
        self._ep_rank: list[int] = []
        self._ep_dur: list[float] = []
        self._by_rank: dict[int, list[tuple[float, float]]] = {}
        self._ep_rng = np.random.default_rng([seed, 11])
        # the phase-changing run: one model per phase, on the same clock and seed
        self._phases = ([Stragglers(StragglerSpec.default(p), world, compute_s, seed, t0) for p in PHASES]
                        if spec.name == "phases" else [])

    def _episodes_until(self, t: float) -> None:
        while not self._ep_start or self._ep_start[-1] + self._ep_dur[-1] <= t:
            start = self.t0 if not self._ep_start else self._ep_start[-1] + self._ep_dur[-1]
            prev = self._ep_rank[-1] if self._ep_rank else None
            if len(self.eligible) > 1 and prev is not None:
                j = int(self._ep_rng.integers(len(self.eligible) - 1))
                rank = self.eligible[j] if self.eligible[j] != prev else self.eligible[-1]
            else:
                rank = self.eligible[int(self._ep_rng.integers(len(self.eligible)))]
            dur = self.spec.factor * self.compute_s[rank]
            self._ep_start.append(start)
            self._ep_rank.append(rank)
            self._ep_dur.append(dur)
            self._by_rank.setdefault(rank, []).append((start, start + dur))

    def scales_with_compute(self, step: int) -> bool:
        """Whether ``step``'s delays are multiples of the compute (a smaller share, a shorter delay), not stall
        episodes on the wall clock (``heavy``)."""
        if self._phases:
            return self._phase(step).scales_with_compute(step)
        return self.spec.name != "heavy"

    def _phase(self, step: int) -> "Stragglers":
        return self._phases[min(step // max(1, self.spec.count), len(PHASES) - 1)]

    def episodes(self, until: float) -> list[tuple[int, float, float]]:
        """Heavy model: ``(rank, start, duration)`` of every stall episode that begins before ``until``."""
        if self._phases:
            return self._phases[PHASES.index("heavy")].episodes(until)
        if self.spec.name != "heavy" or not self.eligible:
            return []
        self._episodes_until(until)
        return [e for e in zip(self._ep_rank, self._ep_start, self._ep_dur) if e[1] < until]

    def finish(self, rank: int, step: int, start: float) -> tuple[float, float]:
        """``(end, delay)``: when the compute of ``step`` that ``rank`` starts at ``start`` ends, and
        how many of those seconds were straggling."""
        base = self.compute_s.get(rank, 0.0)
        if self._phases:
            return self._phase(step).finish(rank, step, start)
        if base <= 0 or self.spec.name == "none":
            return start + base, 0.0
        if self.spec.name in PERSISTENT_MODELS:
            extra = self.spec.factor * base if rank in self.fixed else 0.0
            return start + base + extra, extra
        if self.spec.name == "blog":
            rng = np.random.default_rng([self.seed, 17, rank, step])
            extra = self.spec.factor * base if rng.random() < self.spec.prob else 0.0
            return start + base + extra, extra
        if self.spec.name == "shiftexp":
            rng = np.random.default_rng([self.seed, 13, rank, step])
            extra = float(rng.exponential(self.spec.scale * base)) if self.spec.scale > 0 else 0.0
            return start + base + extra, extra
        if not self.eligible or self.spec.factor <= 0:  # heavy: progress pauses during own episodes
            return start + base, 0.0
        t, left = start, base
        eps = self._by_rank.setdefault(rank, [])
        i = 0
        while True:
            self._episodes_until(t + left)  # every episode that starts before the compute could end
            while i < len(eps) and eps[i][1] <= t:
                i += 1
            if i == len(eps) or eps[i][0] >= t + left:
                return t + left, t + left - start - base
            a, b = eps[i]
            left -= max(0.0, a - t)  # progress made before the episode began
            t, i = b, i + 1


# ---------------------------------------------------------------------------- network
@dataclass
class NetworkModel:
    bandwidth_bps: float = 1e9  # per host, each direction
    latency_s: float = 200e-6  # per tree/GC message, one way: wire + software
    ring_latency_s: float | None = None  # per ring step (default: latency_s)
    decode_bytes_per_s: float = 4e9  # summing one received message
    ring_fixed_s: float = 0.0  # per all-reduce, on top of the ring steps (e.g. Horovod's negotiation)
    msg_cpu_s: float = 0.0  # CPU per message a host receives or sends, serialized on that host

    @property
    def ring_latency(self) -> float:
        return self.latency_s if self.ring_latency_s is None else self.ring_latency_s


def _ps_finish(releases: list[tuple[float, int]], work: float) -> dict[int, float]:
    """Processor sharing of one link: jobs of ``work`` seconds (at full rate) released at the given
    times; returns each job's completion time."""
    jobs = sorted(releases)
    done: dict[int, float] = {}
    active: dict[int, float] = {}  # job -> remaining work
    t = jobs[0][0] if jobs else 0.0
    i = 0
    while i < len(jobs) or active:
        if not active:
            t = max(t, jobs[i][0])
        while i < len(jobs) and jobs[i][0] <= t:
            active[jobs[i][1]] = work
            i += 1
        k = len(active)
        nxt_release = jobs[i][0] if i < len(jobs) else math.inf
        first = min(active.values())
        t_finish = t + first * k
        if t_finish <= nxt_release:
            for j in list(active):
                active[j] -= first
                if active[j] <= 1e-15:
                    done[j] = t_finish
                    del active[j]
            t = t_finish
        else:
            dt = nxt_release - t
            for j in active:
                active[j] -= dt / k
            t = nxt_release
    return done


def ring_time(world: int, msg_bytes: float, net: NetworkModel) -> float:
    """Ring all-reduce: reduce-scatter and all-gather, 2(W-1) steps of M/W bytes."""
    if world <= 1:
        return 0.0
    return net.ring_fixed_s + 2 * (world - 1) * (net.ring_latency + msg_bytes / world * 8 / net.bandwidth_bps)


# ---------------------------------------------------------------------------- one step on a tree
class Topology:
    """What the simulator needs of a plan, precomputed so that 10,000-rank trees stay fast: children,
    code blocks (decoding tables) and per-rank loads."""

    def __init__(self, plan):
        self.plan = plan
        self.world = plan.world_size
        self.children = [tuple(n.children) for n in plan.nodes]
        self.where: dict[int, tuple[int, int]] = {}  # child rank -> (block index, bit) at its parent
        self.own_where: dict[int, tuple[int, int]] = {}  # rank with a coded own slot -> (block index, bit) there
        self.coded_self = [n.self_slot is not None for n in plan.nodes]
        self.blocks: list[list[dict]] = []
        for node in plan.nodes:
            tables = []
            if node.code is not None:
                members = [*node.children, node.rank]  # slot order (the own slot, if any, is last)
                for bi, block in enumerate(node.code.blocks):
                    for bit, slot in enumerate(block.slots):
                        (self.own_where if members[slot] == node.rank else self.where)[members[slot]] = (bi, bit)
                    tables.append(block.table)
            self.blocks.append(tables)
        self.loads = plan.loads
        self.redundancy = float(self.loads.sum())

    def first_decodable(self, v: int, order: list[int]) -> tuple[int, int]:
        """Index into ``order`` (children by arrival, and ``v`` itself for a coded own slot) after which
        ``v`` can decode, and how many messages the decode combines; ``(-1, 0)`` if it never can."""
        tables = self.blocks[v]
        masks = [0] * len(tables)
        ok = [False] * len(tables)
        satisfied = 0
        for idx, c in enumerate(order):
            bi, bit = self.own_where[c] if c == v else self.where[c]
            masks[bi] |= 1 << bit
            if not ok[bi] and masks[bi] in tables[bi]:
                ok[bi] = True
                satisfied += 1
                if satisfied == len(tables):
                    used = sum(int(np.count_nonzero(tables[j][masks[j]])) for j in range(len(tables)))
                    return idx, used
        return -1, 0


def _tree_step(topo: Topology, local: list[float], msg_bytes: float, net: NetworkModel):
    """Upward decode and downward broadcast of one step.

    ``local[r]``: when rank r's gradient is handed in (``inf``: it does not take part).
    Returns (result time per rank, (messages decoded at the root, last used arrival at the root))."""
    W = topo.world
    xfer = msg_bytes * 8 / net.bandwidth_bps
    decode_one = msg_bytes / net.decode_bytes_per_s
    sent = [math.inf] * W
    root_info = (0, math.inf)
    for v in range(W - 1, -1, -1):  # children have larger ranks than their parent
        kids = topo.children[v]
        if not kids:
            sent[v] = local[v]
            continue
        coded = topo.coded_self[v]
        if local[v] == math.inf and not coded:
            continue  # skipped (its result was already there): sends nothing for this step
        rel = [(sent[c] + net.latency_s, c) for c in kids if sent[c] < math.inf]
        fin = _ps_finish(rel, xfer) if rel else {}
        if net.msg_cpu_s > 0:  # the host handles one message at a time
            t = -math.inf
            for c in sorted(fin, key=fin.get):
                t = max(t, fin[c]) + net.msg_cpu_s
                fin[c] = t
        if coded and local[v] < math.inf:  # the own slot arrives when the own gradient is ready
            fin[v] = local[v]
        order = sorted(fin, key=fin.get)
        idx, used = topo.first_decodable(v, order)
        if idx < 0:
            continue  # cannot decode this step: never sends (its parent treats it as a straggler)
        t_dec = fin[order[idx]]
        sent[v] = (t_dec if coded else max(local[v], t_dec)) + used * decode_one
        if v == 0:
            root_info = (used, t_dec)
    result = [math.inf] * W
    result[0] = sent[0]
    for v in range(W):  # parents before children
        kids = topo.children[v]
        if kids and result[v] < math.inf:
            t = result[v] + net.latency_s + len(kids) * xfer  # k equal messages share the egress
            for j, c in enumerate(kids):
                result[c] = max(t, result[v] + net.latency_s + (j + 1) * net.msg_cpu_s + xfer)
    return result, root_info


def _balanced_step(topo: Topology, local: list[float], msg_bytes: float, net: NetworkModel):
    """Chunk owners (``layout="balanced"``): same contract as ``_tree_step``.

    Fluid model: a rank's parts for the ``W-1`` other owners leave together, sharing its egress, so each
    arrives ``(W-1) M/W`` of transfer after its gradient (plus latency); an owner decodes at the latest of
    its groups' first arrivals; its reduced chunks then share its egress to ``W-1`` ranks, and a rank has
    the result when the last owner's chunks are in. ``msg_cpu_s`` is paid per chunk message handled."""
    W = topo.world
    plan = topo.plan
    if W == 1:
        return [local[0]], (0, local[0])
    if plan.stragglers == 0:  # no straggler to skip: the engine sums with gloo's ring all-reduce
        done = max(local) + ring_time(W, msg_bytes, net)
        return [done] * W, (W, max(local))
    chunks = len(_chunk_count(plan, msg_bytes))
    per_owner = math.ceil(chunks / W)
    spread = (W - 1) * msg_bytes / W * 8 / net.bandwidth_bps  # a host's (W-1)/W of the gradient at full rate
    cpu = (W - 1) * per_owner * net.msg_cpu_s
    decode_one = msg_bytes / W / net.decode_bytes_per_s
    groups = plan.balanced.groups
    reduced = []
    for o in range(W):
        def arrival(r: int) -> float:
            if local[r] == math.inf:
                return math.inf
            return local[r] if r == o else local[r] + net.latency_s + spread
        firsts = [min(arrival(r) for r in members) for members in groups]
        reduced.append(max(firsts) + cpu + len(groups) * decode_one)
    done = max(reduced)
    result = [done + net.latency_s + spread + cpu] * W if done < math.inf else [math.inf] * W
    return result, (len(groups), done)


def step_time(topo: Topology, local: list[float], msg_bytes: float, net: NetworkModel) -> float:
    """Seconds until every rank has one step's result, given when each rank's gradient is ready (``local``):
    the plan's layout, one step on its own (no catch-up across steps). ``inf`` when it cannot decode."""
    step = _balanced_step if topo.plan.balanced is not None else _tree_step
    result, _ = step(topo, local, msg_bytes, net)
    return max(result)


def _chunk_count(plan, msg_bytes: float) -> list[tuple[int, int]]:
    return chunk_bounds(max(1, int(msg_bytes // 4)), 4, plan.world_size, plan.chunk_bytes)


# ---------------------------------------------------------------------------- multi-step simulation
@dataclass
class SimResult:
    scheme: str
    world: int
    branching: int
    stragglers: int
    redundancy: float
    step_end: np.ndarray  # root's result time per step
    compute: float  # mean straggler-free compute per computing rank
    breakdown: dict = field(default_factory=dict)
    warmup: int = 2

    @property
    def step_times(self) -> np.ndarray:
        return np.diff(self.step_end)

    @property
    def mean_step(self) -> float:
        w = min(self.warmup, len(self.step_end) - 2)
        return float((self.step_end[-1] - self.step_end[w]) / (len(self.step_end) - 1 - w))


def make_plan(scheme: str, world: int, branching: int = 3, stragglers: int = 1, layout: str = "tree"):
    if scheme == "cr":
        return CodedReducePlan(world, branching, stragglers, layout=layout)
    if scheme == "gc":
        return MasterWorkerPlan(world, stragglers)
    return None


def simulate(scheme: str, world: int, *, msg_bytes: float, compute_s: float, branching: int = 3, s: int = 1,
             stragglers: StragglerSpec | None = None, net: NetworkModel | None = None, steps: int = 30,
             warmup: int = 2, seed: int = 0, global_batch_samples: int | None = None,
             sample_s: float | None = None, plan=None, layout: str = "tree") -> SimResult:
    """Simulate ``steps`` steps of ``scheme`` (``cr``, ``gc`` or ``rar``).

    Compute per step: ``compute_s`` for every computing rank (fixed per-rank batch, as in the
    harness; the global batch is then smaller by the redundancy); or, with
    ``global_batch_samples`` and ``sample_s``, ``sample_s x`` the rank's samples of a fixed global
    batch (the paper's setting: redundancy raises per-rank compute instead).
    """
    stragglers = stragglers or StragglerSpec("none")
    net = net or NetworkModel()
    if scheme not in ("cr", "gc", "rar"):
        raise ValueError(f"unknown scheme {scheme!r}; use 'cr', 'gc' or 'rar'")
    plan = plan if plan is not None else make_plan(scheme, world, branching, s, layout)
    topo = None
    if plan is None:
        loads = np.full(world, 1.0 / world)
        redundancy = 1.0
    else:
        topo = plan if isinstance(plan, Topology) else Topology(plan)
        plan = topo.plan
        loads = topo.loads
        redundancy = topo.redundancy
    if global_batch_samples is not None and sample_s is not None:
        comp = {r: float(sample_s * loads[r] * global_batch_samples) for r in range(world)}
    else:
        comp = {r: float(compute_s * loads[r] / loads.max()) for r in range(world)}
    strag = Stragglers(stragglers, world, comp, seed=seed, t0=0.0)
    g = np.zeros(world)  # time each rank gets to the current step
    ends = []
    bd = {"compute": [], "root_wait": [], "down": []}
    if plan is None:
        t_ar = ring_time(world, msg_bytes, net)
        for t in range(steps):
            e = np.array([strag.finish(r, t, g[r])[0] for r in range(world)])
            R = e.max() + t_ar
            bd["compute"].append(float(np.median(e - g)))
            bd["root_wait"].append(float(e.max() - np.median(e)))
            g[:] = R
            ends.append(R)
        return SimResult(scheme, world, 0, 0, redundancy, np.array(ends), float(np.mean(list(comp.values()))),
                         {k: float(np.mean(v)) for k, v in bd.items() if v} | {"transfer": t_ar}, warmup)
    ends, bd = replay(topo, lambda r, t, start: strag.finish(r, t, start)[0], steps, msg_bytes, net,
                      computes_root=comp[0] > 0)
    return SimResult(scheme, world, getattr(plan, "branching", world - 1), plan.stragglers, redundancy, ends,
                     float(np.mean([c for c in comp.values() if c > 0])), bd, warmup)


def replay(topo: Topology, finish: Callable[[int, int, float], float], steps: int, msg_bytes: float,
           net: NetworkModel, *, computes_root: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """``steps`` steps of a coded plan back to back, with the runtime's catch-up; returns rank 0's result time
    per step (from 0) and the mean breakdown (``compute``, ``root_wait``, ``down``).

    ``finish(r, t, start)``: when rank r's gradient of step t is ready if it starts computing at ``start``.
    A rank begins step t+1 when it has both its gradient of t and t's result, so a straggler's lag carries
    over into the next steps; a rank that would begin a step whose result is already out skips it (that is
    what makes redundancy pay less under frequent delays than one step on its own suggests)."""
    world = topo.world
    step_fn = _balanced_step if topo.plan.balanced is not None else _tree_step
    first_skipper = 0 if topo.plan.balanced is not None else 1  # the tree's root always computes
    g = np.zeros(world)  # time each rank gets to the current step
    ends = []
    bd: dict[str, list[float]] = {"compute": [], "root_wait": [], "down": []}
    for t in range(steps):
        ready = [finish(r, t, float(g[r])) for r in range(world)]
        skip: set[int] = set()
        for _ in range(6):
            local = [math.inf if r in skip else ready[r] for r in range(world)]
            result, (used, last) = step_fn(topo, local, msg_bytes, net)
            new = {r for r in range(first_skipper, world) if result[r] <= g[r]}
            if new == skip:
                break
            skip = new
        e = np.array(local)
        nxt = np.array([g[r] if r in skip else max(e[r], result[r]) for r in range(world)])
        bd["compute"].append(float(local[0] - g[0]) if computes_root else float(np.median(e[1:] - g[1:])))
        bd["root_wait"].append(max(0.0, float(last - local[0])) if last < math.inf else 0.0)
        bd["down"].append(float(max(result) - result[0]) if max(result) < math.inf else 0.0)
        ends.append(result[0])
        g = nxt
    return np.array(ends), {k: float(np.mean(v)) for k, v in bd.items() if v}


# ---------------------------------------------------------------------------- paper scale and sweeps
PAPER = {"gc": 27.2, "rar": 7.0}  # speed-ups of CodedReduce reported by the paper (EC2, N=156, n=12, L=2)


def paper_table(net: NetworkModel | None = None, msg_bytes: float = 5000 * 4, sample_s: float = 20e-6,
                samples: int = 6552, steps: int = 25, models=("none", "paper", "heavy"), seed: int = 0,
                gc_s: int = 1) -> list[dict]:
    """The paper's setting: N=156 workers + a computing root (W=157), n=12, L=2, s=1; logistic
    regression with 5000 features on a fixed global batch of 6552 samples (full gradient descent:
    redundancy raises each worker's compute); stragglers sleep 3x their compute time."""
    net = net or NetworkModel()
    W = 157
    rows = []
    for model in models:
        spec = StragglerSpec.default(model)
        kw = dict(msg_bytes=msg_bytes, compute_s=0.0, stragglers=spec, net=net, steps=steps, seed=seed,
                  global_batch_samples=samples, sample_s=sample_s)
        cr = simulate("cr", W, branching=12, s=1, **kw)
        tree = simulate("cr", W, branching=12, s=0, **kw)
        gc = simulate("gc", W, s=gc_s, **kw)
        rar = simulate("rar", W, **kw)
        rows.append({"stragglers": model, "W": W, "R_cr": cr.redundancy, "R_gc": gc.redundancy,
                     "cr_s": cr.mean_step, "tree_s0_s": tree.mean_step, "gc_s": gc.mean_step, "rar_s": rar.mean_step,
                     "cr_vs_gc": gc.mean_step / cr.mean_step, "cr_vs_rar": rar.mean_step / cr.mean_step,
                     "cr_vs_tree_s0": tree.mean_step / cr.mean_step,
                     "paper_vs_gc": PAPER["gc"], "paper_vs_rar": PAPER["rar"]})
    return rows


def sweep(worlds=(13, 40, 157, 400, 1000, 1885, 4000, 10000), *, msg_bytes: float = 5000 * 4, compute_s: float = 0.05,
          net: NetworkModel | None = None, model: str = "heavy", branching: int = 12, steps: int = 12,
          seed: int = 0) -> list[dict]:
    """Step time of every scheme against the number of workers (fixed per-rank batch)."""
    net = net or NetworkModel()
    spec = StragglerSpec.default(model)
    rows = []
    for W in worlds:
        kw = dict(msg_bytes=msg_bytes, compute_s=compute_s, stragglers=spec, net=net, steps=steps, seed=seed)
        row = {"W": W, "stragglers": model, "msg_bytes": msg_bytes}
        for name, scheme, extra in (("cr_s1", "cr", dict(branching=branching, s=1)),
                                    ("tree_s0", "cr", dict(branching=branching, s=0)),
                                    ("gc_s1", "gc", dict(s=1)), ("rar", "rar", {})):
            r = simulate(scheme, W, **kw, **extra)
            row[name] = r.mean_step
            row[f"R_{name}"] = r.redundancy
        rows.append(row)
    return rows


def _fmt_table(rows: list[dict]) -> str:
    out = ["| stragglers | R (CR) | CR n=12 s=1 | tree s=0 | GC s=1 | RAR | CR vs GC (paper 27.2x) | CR vs RAR (paper 7.0x) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['stragglers']} | {r['R_cr']:.2f} | {r['cr_s'] * 1e3:.1f} ms | {r['tree_s0_s'] * 1e3:.1f} ms | "
                   f"{r['gc_s'] * 1e3:.1f} ms | {r['rar_s'] * 1e3:.1f} ms | {r['cr_vs_gc']:.1f}x | {r['cr_vs_rar']:.1f}x |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="CodedReduce discrete-event simulator: paper-scale table and sweep")
    p.add_argument("--bandwidth", type=float, default=1e9, help="bits/s per host and direction")
    p.add_argument("--latency", type=float, default=200e-6, help="seconds per message (wire + software)")
    p.add_argument("--sample-s", type=float, default=20e-6, help="compute seconds per sample (paper table)")
    a = p.parse_args(argv)
    net = NetworkModel(a.bandwidth, a.latency)
    print("Paper scale: W=157 (156 workers + computing root), n=12, L=2, s=1, 5000 float32 features, "
          f"{a.bandwidth / 1e9:g} Gbit/s, {a.latency * 1e6:.0f} us/message, {a.sample_s * 1e6:g} us/sample")
    print(_fmt_table(paper_table(net, sample_s=a.sample_s)))
    print("\nSweep (heavy stalls, fixed per-rank batch, 50 ms compute):")
    for r in sweep(net=net):
        print(f"  W={r['W']:>6}  CR {r['cr_s1'] * 1e3:8.1f} ms  tree s=0 {r['tree_s0'] * 1e3:8.1f} ms  "
              f"GC {r['gc_s1'] * 1e3:9.1f} ms  RAR {r['rar'] * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
