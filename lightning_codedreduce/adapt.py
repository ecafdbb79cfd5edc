"""Choosing the plan from measurements: ``stragglers="auto"`` (DESIGN §8).

Redundancy pays only when stragglers cost more than the extra compute, and persistent slowness is
better answered by smaller shares than by redundancy (``benchmarks/crossover.py`` maps where each
wins). :class:`PlanAdvisor` picks, from what the ranks measured, the plan with the smallest predicted
step time for the *same global batch* -- so a switch changes how fast training goes, never what it
computes.

1. Every rank records, for every step it computed, its compute seconds and its number of samples
   (``per_sample[t, r]`` = seconds per sample; a step it skipped while catching up is missing).
2. Every ``every`` steps (and once at ``every // 2``, a first look) each rank sends its records to rank 0
   without waiting (``CodedReducer.post_note``); rank 0 keeps the last ``STALL_ROUNDS`` rounds' records,
   decides (``decide``) and announces the decision with a result (``CodedReducer.announce``): it takes
   effect at a step every rank learns before it begins it, so neither costs a wait for a straggler. Over
   gloo's ring (the balanced layout at s=0, where every step waits for every rank anyway) a collective
   exchanges the records and carries the decision instead (``PlanSchedule.round``).
3. The candidates: ``stragglers`` 0 (with and without speed-proportional loads), 1 and 2 where the
   branching allows them, in each allowed layout (the tree and the balanced chunk owners, unless the
   user fixed one); in the tree, s >= 1 also with the root's own compute coded (``coded_self="root"``).
   Speeds are the per-rank medians of the last ``2 * every`` steps' seconds per sample (persistent
   slowness), rounded to 0.05 and 1 within 10 % of the fastest; none from fewer than ``MIN_SPEED_STEPS``.
4. Each candidate is scored by replaying the window through the simulator. Rank ``r``'s compute in
   step t of the candidate is its typical seconds per sample (its median over the last ``2 * every``
   steps) times its samples in the candidate, plus its measured deviation from typical, of one of two
   kinds:

   * *noise* (shorter than ``STALL_FACTOR`` typical steps at an even share): noisy compute, in
     proportion to the share. Replayed with the steps back to back (``sim.replay``), since a rank
     delayed and not waited for is still late for the next step: scored one step at a time, coding
     looked like it paid where every rank is noisy in every step (shifted-exponential noise; measured
     at W=13, benchmarks/README.md), and it does not.
   * *stalls* (longer): on the wall clock (a noisy neighbour, a pause), in seconds whatever the share,
     and scored one step at a time: replayed back to back at a faster candidate's pace, a window's
     stall episodes come more often than the wall clock would bring them. Scaling them by the share
     made a stall measured under a coded plan look small to an uncoded one, and ``auto`` flapped under
     heavy stalls (measured).

   The prediction is the back-to-back replay of the last ``2 * every`` steps with noise only, plus what
   the stalls of all ``STALL_ROUNDS * every`` steps add to the steps one at a time (``sim.step_time``, on
   ``network``). Stalls get the longer look because rare ones are rare: at 1 % per rank and step (the
   PyTorch blog's protocol) a 10-step window at W=13 holds none about a quarter of the time and two or
   more a third of the time, and ``auto`` switched to coding and back within 15 steps (measured).
5. Hysteresis: the best candidate replaces the current plan only when it is predicted at least
   ``margin`` faster in ``patience`` decisions in a row, so noise does not make the plan flap. Rounds
   agree when their best candidates differ only by speed noise (``Candidate.agrees``: every rank's
   speed within ``SPEED_AGREE``); the latest one is taken. A candidate predicted ``decisive`` times
   faster or more (default ``DECISIVE`` = 1.5) is taken at once: no noise predicts that much, and every
   round waited is run at the slow plan's pace (under heavy stalls at W=13 the second round was 10 of a
   60-step run's steps at 2.4x the settled step; measured).
6. Calibration: the simulator knows the compute it is given and a network model, not the machine's other
   costs (CPU contention, the protocol's own work). Each round, the current plan's median wall-clock step
   on rank 0 (a validation loop or a checkpoint between two steps is not the plan's) over its mean
   prediction for the same steps becomes that kind of plan's correction
   (``Candidate.kind``: the plan up to its speed estimates), applied to its later predictions. Left out:
   the first two steps of a plan (the switch) and steps with a stall (what a stall costs depends on when
   it falls). A kind that never ran gets the geometric mean of those that did, the machine's overhead
   seen so far. Measured at W=13 on two cores: without calibration, balanced s=1 was predicted 165 ms
   and took 290, so ``auto`` kept it through a calm phase; with the simulator's word for kinds not yet
   run, each of them looked 1.6-1.9x faster than it was, and ``auto`` tried them one after another.

The caller switches at a step every rank agrees on (the strategy: far enough ahead that no loader has
prefetched it); plain PyTorch loops do the same with :class:`~lightning_codedreduce.engine.CodedReducer`
(close the old reducer after the last step of the old plan, open one for ``decision.plan`` at the next).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from . import sim
from .plan import CodedReducePlan

SPEED_STEP = 0.05  # speeds are rounded to this (a plan is not rebuilt for noise)
SPEED_NOISE = 0.9  # ranks within 10 % of the fastest count as full speed
SPEED_AGREE = 0.15  # two rounds' speed estimates this close (per rank) propose the same plan
STALL_FACTOR = 3.0  # a delay longer than this many typical steps (at an even share) is a stall, not noise
STALL_ROUNDS = 6  # stalls are counted over this many rounds' notes: rare ones (1 % per rank and step) need more
# steps to estimate than speeds and noise do (2 rounds), while dense ones are seen at once
DECISIVE = 1.5  # a candidate predicted this many times faster is taken without waiting for ``patience`` rounds
MIN_SPEED_STEPS = 4  # speed-proportional loads need this many steps: in a 2-step window a stall that spans both
# looks like slowness (measured: the first look under heavy stalls at W=13 gave a stalled rank a fifth of a share)
CALIBRATE_STEPS = 5  # a plan's calm measured steps calibrate its kind's predictions once there are this many


@dataclass(frozen=True)
class Candidate:
    """One plan the advisor may choose: a layout, a tolerance and, optionally, speed-proportional loads."""

    stragglers: int
    speeds: Optional[tuple[float, ...]] = None
    layout: str = "tree"
    coded_self: str = "none"  # the tree: whose own compute is a slot of its code (CodedReducePlan(coded_self=))

    def agrees(self, other: Optional["Candidate"]) -> bool:
        """The same plan up to speed noise: layout, tolerance and coded slots equal, and every rank's speed within
        ``SPEED_AGREE`` (so a streak of decisions is not broken by a speed estimate moving by a rounding step or
        two, or a rank crossing the full-speed threshold)."""
        if other is None or (self.stragglers, self.layout, self.coded_self) != (other.stragglers, other.layout,
                                                                               other.coded_self):
            return False
        if self.speeds is None or other.speeds is None:
            return self.speeds is None and other.speeds is None
        mine, theirs = np.asarray(self.speeds), np.asarray(other.speeds)
        return bool(np.abs(mine - theirs).max() <= SPEED_AGREE + 1e-9)

    @property
    def kind(self) -> str:
        """What a measured step calibrates (``PlanAdvisor.calibration``): the plan up to its speed estimates."""
        plain = Candidate(self.stragglers, None, self.layout, self.coded_self).label
        return plain if self.speeds is None else f"{plain}, speeds"

    @property
    def label(self) -> str:
        own = "" if self.coded_self == "none" else f", coded {self.coded_self}"
        if self.speeds is None:
            return f"{self.layout} s={self.stragglers}{own}"
        slow = ", ".join(f"rank {r} x{v:g}" for r, v in enumerate(self.speeds) if v < 1)
        return f"{self.layout} s={self.stragglers}{own}, speeds ({slow})"


@dataclass(frozen=True)
class Decision:
    """A plan switch and why: ``predicted_s`` maps every candidate's label to its predicted mean step."""

    step: int  # decided after this step's result
    candidate: Candidate
    plan: CodedReducePlan
    current_s: float  # the current plan's predicted mean step
    best_s: float
    predicted_s: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)  # measured / predicted step of each kind that ran

    @property
    def gain(self) -> float:
        """Predicted speed-up over the current plan (current step / new step)."""
        return self.current_s / self.best_s if self.best_s > 0 else float("inf")

    @property
    def reason(self) -> str:
        return (f"{self.candidate.label} predicted {self.best_s * 1e3:.0f} ms per step against "
                f"{self.current_s * 1e3:.0f} ms "
                f"({self.gain:.2f}x faster) over the last steps' measurements")


def estimate_speeds(per_sample: np.ndarray) -> Optional[tuple[float, ...]]:
    """Relative speeds from a window of seconds per sample (steps x ranks, NaN = missing), or None when
    every rank is within ``SPEED_NOISE`` of the fastest."""
    medians = np.array([np.nanmedian(col) if np.isfinite(col).any() else np.nan for col in per_sample.T])
    if not np.isfinite(medians).all() or (medians <= 0).any():
        return None
    speeds = medians.min() / medians
    speeds = np.where(speeds >= SPEED_NOISE, 1.0, np.maximum(SPEED_STEP, np.round(speeds / SPEED_STEP) * SPEED_STEP))
    return None if (speeds == 1.0).all() else tuple(float(x) for x in speeds)


class PlanAdvisor:
    """Predicts every candidate plan's step time from measured compute and picks the best (module docstring).

    Args:
        world_size, branching, chunk_bytes, seed, code: what every candidate plan shares.
        layouts: the layouts candidates may take (the user's choice, or both).
        message_bytes: the gradient's size (the simulator's transfer times).
        global_batch: samples per step (every candidate splits the same global batch).
        margin: how much faster (fraction) the best candidate must be predicted to be.
        patience: in how many decisions in a row.
        decisive: a candidate predicted this many times faster is taken in the first decision (inf: never).
        network: the simulator's network (default 1 Gbit/s, 200 us per message).
        max_stragglers: the largest tolerance considered.
    """

    def __init__(self, world_size: int, *, branching: int = 3, layouts: Sequence[str] = ("tree",),
                 chunk_bytes: int = 4 << 20, seed: int = 0, code: str = "auto", message_bytes: int = 1 << 20,
                 global_batch: int = 1024, margin: float = 0.1, patience: int = 2, decisive: float = DECISIVE,
                 network: Optional[sim.NetworkModel] = None, max_stragglers: int = 2):
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin!r}: the fraction by which a plan must be faster")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience!r}")
        if not decisive > 1:
            raise ValueError(f"decisive must be > 1 (how many times faster a plan must be predicted to be taken "
                             f"at once; inf: never), got {decisive!r}")
        self.world_size, self.branching, self.layouts = world_size, branching, tuple(layouts)
        self.chunk_bytes, self.seed, self.code = chunk_bytes, seed, code
        self.message_bytes, self.global_batch = message_bytes, global_batch
        self.margin, self.patience, self.decisive = margin, patience, decisive
        self.network = network or sim.NetworkModel()
        self.max_stragglers = max_stragglers
        self._plans: dict[Candidate, Optional[CodedReducePlan]] = {}
        self._streak: tuple[Optional[Candidate], int] = (None, 0)
        # measured / predicted mean step of each kind of plan that ran (``Candidate.kind``): what the simulator does
        # not know of this machine (CPU contention, protocol overheads), learnt where each plan actually ran
        self.calibration: dict[str, float] = {}

    def plan(self, candidate: Candidate) -> Optional[CodedReducePlan]:
        """The candidate's plan, or None when it cannot be built (e.g. too few ranks for the tolerance)."""
        if candidate not in self._plans:
            try:
                plan = CodedReducePlan(self.world_size, self.branching, candidate.stragglers, self.code, self.seed,
                                       layout=candidate.layout, chunk_bytes=self.chunk_bytes, speeds=candidate.speeds,
                                       coded_self=candidate.coded_self)
                ok = self.global_batch >= plan.min_global_batch_size  # every rank gets a share of the global batch
            except ValueError:
                plan, ok = None, False
            self._plans[candidate] = plan if ok else None
        return self._plans[candidate]

    def candidates(self, per_sample: np.ndarray) -> list[Candidate]:
        speeds = estimate_speeds(per_sample) if len(per_sample) >= MIN_SPEED_STEPS else None
        out = []
        for layout in self.layouts:
            out += [Candidate(0, None, layout)] + ([Candidate(0, speeds, layout)] if speeds else [])
            tolerances = range(1, min(self.max_stragglers, self.branching - 1) + 1)
            out += [Candidate(s, None, layout) for s in tolerances]
            if layout == "tree":  # a slow root tolerated too (the balanced layout always tolerates it)
                out += [Candidate(s, None, layout, "root") for s in tolerances]
        return [c for c in out if self.plan(c) is not None]

    def samples(self, candidate: Candidate) -> np.ndarray:
        """Samples per rank and step under ``candidate``'s plan (the same global batch for every candidate)."""
        plan = self.plan(candidate)
        return np.array([sum(map(len, shards)) for shards in plan.allocation(self.global_batch)], dtype=float)

    def predict(self, candidate: Candidate, per_sample: np.ndarray, measured: Optional[np.ndarray] = None,
                recent: Optional[int] = None) -> float:
        """Mean predicted step time (s) of ``candidate`` over the window ``per_sample`` (steps x ranks); ``measured``:
        how many samples each measurement covered (steps x ranks, or one per rank; None: the candidate's own);
        ``recent``: the last rows that give speeds and noise (None: all), stalls are counted over all rows."""
        if not len(per_sample):
            return 0.0
        topo = sim.Topology(self.plan(candidate))
        samples = self.samples(candidate)
        latest = per_sample[-recent:] if recent else per_sample
        measured = samples if measured is None else np.where(np.isfinite(measured), measured, samples)
        medians, deviation, long = self._deviations(per_sample, measured, recent)
        stalls = np.where(long, deviation, 0.0)  # on the wall clock: as long whatever the share
        noise = np.where(long, 0.0, deviation) * samples / measured  # noisy compute: in proportion to the share
        typical = medians * samples
        recent_noise = noise[-len(latest):]
        ends, _ = sim.replay(topo, lambda r, t, start: start + typical[r] + recent_noise[t, r], len(recent_noise),
                             self.message_bytes, self.network)
        added = [sim.step_time(topo, list(typical + noise[t] + stalls[t]), self.message_bytes, self.network)
                 - sim.step_time(topo, list(typical + noise[t]), self.message_bytes, self.network)
                 for t in np.flatnonzero(long.any(axis=1))]  # what each step's stalls add, one step at a time
        return float(ends[-1] / len(ends)) + float(np.sum(added)) / len(per_sample)

    def _deviations(self, per_sample: np.ndarray, measured: np.ndarray,
                    recent: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every rank's typical seconds per sample (median of the last ``recent`` rows), every measurement's
        deviation from it in seconds (steps x ranks), and which deviations are stalls (step 4)."""
        latest = per_sample[-recent:] if recent else per_sample
        medians = np.array([np.nanmedian(c) if np.isfinite(c).any() else 0.0 for c in latest.T])
        deviation = np.where(np.isfinite(per_sample), per_sample - medians, 0.0) * measured  # seconds, steps x ranks
        return medians, deviation, deviation > STALL_FACTOR * medians * self.global_batch / self.world_size

    def decide(self, step: int, current: Candidate, per_sample: Sequence[Sequence[float]],
               samples: Optional[Sequence[Sequence[float]]] = None, recent: Optional[int] = None,
               step_seconds: Optional[Sequence[float]] = None) -> Optional[Decision]:
        """A :class:`Decision` to switch after ``step``, or None to keep ``current``.

        ``per_sample``: the window's seconds per sample, one row per step, one column per rank (NaN where
        a rank did not compute the step); ``samples``: how many samples each of those measurements covered
        (None: ``current``'s shares); ``recent``: how many of the last rows give speeds and noise (None: all;
        the stalls of every row count, see ``predict``); ``step_seconds``: each row's wall-clock step under
        ``current`` (NaN where it is not known or another plan ran), which calibrates ``current``'s kind."""
        window = np.asarray(per_sample, dtype=float).reshape(-1, self.world_size)
        latest = window[-recent:] if recent else window
        if not np.isfinite(latest).any():
            return None
        if samples is not None:
            measured = np.asarray(samples, dtype=float).reshape(-1, self.world_size)
        else:
            measured = self.samples(current) if self.plan(current) is not None else None
        if step_seconds is not None and self.plan(current) is not None:
            self._calibrate(current, window, measured, np.asarray(step_seconds, dtype=float))
        scores = {c: self.predict(c, window, measured, recent) for c in self.candidates(latest)}
        if current not in scores and self.plan(current) is not None:
            scores[current] = self.predict(current, window, measured, recent)
        typical = float(np.exp(np.mean(np.log(list(self.calibration.values()))))) if self.calibration else 1.0
        scores = {c: v * self.calibration.get(c.kind, typical) for c, v in scores.items()}
        best = min(scores, key=lambda c: (scores[c], c.stragglers))
        now = scores.get(current, float("inf"))
        if best == current or scores[best] > now * (1 - self.margin):
            self._streak = (None, 0)
            return None
        self._streak = (best, self._streak[1] + 1 if best.agrees(self._streak[0]) else 1)
        if self._streak[1] < self.patience and now < scores[best] * self.decisive:
            return None
        self._streak = (None, 0)
        return Decision(step, best, self.plan(best), now, scores[best], {c.label: s for c, s in scores.items()},
                        {kind: round(v, 3) for kind, v in self.calibration.items()})

    def _calibrate(self, current: Candidate, window: np.ndarray, measured: Optional[np.ndarray],
                   step_seconds: np.ndarray) -> None:
        """``current``'s median measured step over its calm rows of the window (no stall: a stall's cost depends on
        when it falls, and a few of them would decide the ratio), against its prediction for the same rows (step
        6 of the module docstring); at least ``CALIBRATE_STEPS`` of them."""
        rows = np.flatnonzero(np.isfinite(step_seconds))
        counts = np.broadcast_to(self.samples(current) if measured is None else measured, window.shape)[rows]
        _, _, long = self._deviations(window[rows], counts)
        calm = ~long.any(axis=1)
        if calm.sum() < CALIBRATE_STEPS:
            return
        predicted = self.predict(current, window[rows][calm], counts[calm])
        if predicted > 0:
            self.calibration[current.kind] = float(np.median(step_seconds[rows][calm])) / predicted


def notes_window(every_rank: dict[int, dict[int, tuple[float, int]]], world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``{step: (seconds per sample, samples)}`` as two windows (steps x ranks, NaN where a rank did
    not compute): ``PlanAdvisor.decide``'s ``per_sample`` and ``samples``."""
    steps = sorted({s for notes in every_rank.values() for s in notes})
    index = {s: i for i, s in enumerate(steps)}
    per_sample, samples = np.full((2, len(steps), world_size), np.nan)
    for rank, notes in every_rank.items():
        for s, (value, count) in notes.items():
            per_sample[index[s], rank], samples[index[s], rank] = value, count
    return per_sample, samples


class PlanSchedule:
    """What ``stragglers="auto"`` keeps between steps on one rank: the notes since the last round, the current
    candidate, the switch decided but not yet in effect, and every decision (JSON-friendly, for logs).

    Used the same way by the Lightning strategy and by :class:`~lightning_codedreduce.engine.AdaptiveReducer`:
    ``after`` after every step (``note``; when a round is due, ``exchange``: announced decisions, or over gloo's
    ring ``round``: a collective; then ``poll`` for announced decisions), ``due`` before every step. Rank 0 keeps
    the notes of the last ``STALL_ROUNDS`` rounds, whichever way they arrived.
    """

    def __init__(self, advisor: PlanAdvisor, current: Candidate, every: int,
                 clock: Callable[[], float] = time.monotonic):
        if every < 1:
            raise ValueError(f"every must be >= 1 step between decisions, got {every!r}")
        self.advisor, self.current, self.every = advisor, current, every
        self._clock = clock
        self._ends: dict[int, float] = {}  # step -> when this rank was done with it (rank 0: the measured steps)
        self._since: Optional[int] = None  # the step the current plan took effect at (its first step: a switch)
        self._notes: dict[int, tuple[float, int]] = {}  # step -> (seconds per sample, samples), since the last round
        self._pending: Optional[tuple[int, Candidate]] = None  # (step it takes effect, candidate)
        self.decisions: list[dict[str, Any]] = []
        # rank 0: rank -> {step: note} over the last STALL_ROUNDS rounds (rare stalls need the longer look)
        self._history: dict[int, dict[int, tuple[float, int]]] = {}
        self._seen = 0  # announcements of the current reducer already taken in (``poll``)
        self._first: Optional[int] = None  # the first step noted: the early round comes halfway to ``every``

    def note(self, step: int, compute_s: Optional[float], samples: int) -> bool:
        """This rank's measurement of ``step`` (None: it did not compute it); whether a round is due after it: every
        ``every`` steps, and once halfway through the first ``every`` steps of the run (``every`` >= 4), so that a
        decisive gain (step 5 of the module docstring) costs half as many steps at the old plan's pace."""
        if self._first is None:
            self._first = self._since = step  # the same on every rank: the run's (or the resumed run's) first step
        self._ends[step] = self._clock()
        self._ends.pop(step - STALL_ROUNDS * self.every - 1, None)
        if compute_s is not None and samples > 0:
            self._notes[step] = (compute_s / samples, samples)
        early = self.every >= 4 and step + 1 - self._first == self.every // 2
        return ((step + 1) % self.every == 0 or early) and self._pending is None

    def round(self, step: int, gather: Callable[[Any], dict[int, Any]], rank: int,
              when: Callable[[Decision], dict[str, Any]]) -> Optional[dict[str, Any]]:
        """Steps 2 and 5 of the module docstring over a collective, on every rank: the notes go to every rank
        (``gather``: ``{rank: obj}`` of the live ranks), rank 0 decides, and its decision reaches every rank through
        a second gather; it is kept, pending, and returned (the same on every rank: None, or the proposal with what
        ``when``, called on rank 0, says of where it takes effect). A rank that died stops decisions (the plans
        that would follow need every rank)."""
        notes, self._notes = self._notes, {}
        every_rank = gather(notes)
        proposal = None
        if rank == 0 and len(every_rank) == self.advisor.world_size:
            found = self._decide(step, every_rank.items())
            proposal = None if found is None else {**self._proposal(found), **when(found)}
        decision = gather(proposal).get(0)
        if decision is not None:
            self._adopt(decision)
        return decision

    def after(self, step: int, compute_s: Optional[float], samples: int, reducer: Any,
              gather: Callable[[Any], dict[int, Any]], *, lead: int = 1,
              when: Callable[[Decision], dict[str, Any]] = lambda found: {},
              where: Callable[[int], dict[str, Any]] = lambda effective: {}) -> list[dict[str, Any]]:
        """After ``step``, on every rank: note it and, when a round is due, hold it (``reducer``: the open
        :class:`~lightning_codedreduce.engine.CodedReducer`; ``gather`` over it for gloo's ring, where ``when``
        places the switch; ``lead`` and ``where`` for announced ones). Returns the decisions this rank took in
        now (to tell its sampler), the same on every rank."""
        new = []
        if self.note(step, compute_s, samples):
            if reducer.announces_in_order:
                self.exchange(step, reducer, lead)
            else:
                decision = self.round(step, gather, reducer.rank, when)
                new += [decision] if decision is not None else []
        return new + self.poll(reducer.announced(), where)

    def exchange(self, step: int, reducer: Any, lead: int = 1) -> None:
        """A round that waits for nobody (the module docstring's step 2): this rank's notes go to rank 0, which
        decides from what arrived and announces a switch ``lead`` steps past its result frontier (enough for
        every rank's loader prefetch). ``reducer``: a :class:`~lightning_codedreduce.engine.CodedReducer`."""
        notes, self._notes = self._notes, {}
        if reducer.rank != 0:
            if notes:
                reducer.post_note(notes)
            return
        found = self._decide(step, [(0, notes), *reducer.take_notes()])
        if found is not None:
            reducer.announce(self._proposal(found), lead)

    def _decide(self, step: int, arrived: Iterable[tuple[int, dict[int, tuple[float, int]]]]) -> Optional[Decision]:
        """Rank 0: keep the notes that ``arrived`` (``(rank, notes)`` pairs) with the last ``STALL_ROUNDS`` rounds'
        and ask the advisor, speeds and noise from the last ``2 * every`` steps (None while a switch is pending)."""
        for rank, values in arrived:
            self._history.setdefault(rank, {}).update(values)
        horizon = step - STALL_ROUNDS * self.every
        self._history = {r: {t: v for t, v in values.items() if t > horizon} for r, values in self._history.items()}
        if self._pending is not None:
            return None
        steps = sorted({t for values in self._history.values() for t in values})  # notes_window's rows
        since = self._since if self._since is not None else step  # (set by the first note)
        step_seconds = [self._ends[t] - self._ends[t - 1] if t > since + 1 and t - 1 in self._ends and t in self._ends
                        else float("nan") for t in steps]  # the current plan's steps but its first two (the switch)
        return self.advisor.decide(step, self.current, *notes_window(self._history, self.advisor.world_size),
                                   recent=2 * self.every, step_seconds=step_seconds)

    @staticmethod
    def _proposal(found: Decision) -> dict[str, Any]:
        return {"candidate": found.candidate, "step": found.step, "reason": found.reason, "gain": found.gain,
                "predicted_ms": {k: round(v * 1e3, 2) for k, v in found.predicted_s.items()},
                "calibration": found.calibration}

    def poll(self, announced: list[tuple[int, dict[str, Any]]],
             where: Callable[[int], dict[str, Any]] = lambda effective: {}) -> list[dict[str, Any]]:
        """Take in the decisions announced since the last call (``CodedReducer.announced()``); returns them, each
        with its ``effective_step`` and what ``where(effective_step)`` adds (e.g. the loader position), the same
        on every rank."""
        new = []
        for effective, decision in announced[self._seen:]:
            decision = {**decision, "effective_step": effective, **where(effective)}
            self._adopt(decision)
            new.append(decision)
        self._seen = len(announced)
        return new

    def reset_announcements(self) -> None:
        """A new reducer (a switch): its announcements start afresh."""
        self._seen = 0

    def _adopt(self, decision: dict[str, Any]) -> None:
        candidate = decision["candidate"]
        self._pending = (decision["effective_step"], candidate)
        self.decisions.append({**{k: v for k, v in decision.items() if k != "candidate"}, "plan": candidate.label,
                               "stragglers": candidate.stragglers,
                               "speeds": list(candidate.speeds) if candidate.speeds else None,
                               "redundancy": self.advisor.plan(candidate).redundancy, "applied": False})

    def due(self, step: int) -> Optional[CodedReducePlan]:
        """The plan that takes effect at ``step``, if one does (it becomes the current one)."""
        if self._pending is None or self._pending[0] != step:
            return None
        _, self.current = self._pending
        self._pending, self._since = None, step
        self.decisions[-1]["applied"] = True
        return self.advisor.plan(self.current)
