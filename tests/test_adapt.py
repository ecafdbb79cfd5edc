"""``stragglers="auto"``'s advisor (pure: measurements in, a plan out) and the sampler's plan switch.

The multi-process run (a switch mid-epoch that keeps DDP's run) is in ``test_ddp_equivalence.py``."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from lightning_codedreduce import sim
from lightning_codedreduce.adapt import Candidate, PlanAdvisor, estimate_speeds
from lightning_codedreduce.plan import CodedReducePlan
from lightning_codedreduce.sampler import CodedReduceBatchSampler

W, SAMPLE_S = 7, 0.06 / 32  # 60 ms per 32 samples


def window(kind: str, steps: int = 30, seed: int = 0) -> np.ndarray:
    """Seconds per sample, steps x ranks, with 5 % noise and the regime's stragglers (rank 0 eligible)."""
    rng = np.random.default_rng(seed)
    w = SAMPLE_S * (1 + 0.05 * rng.random((steps, W)))
    if kind == "slow":
        w[:, 3] *= 2
    elif kind == "slowroot":
        w[:, 0] *= 3
    elif kind == "heavy":
        w[np.arange(steps), rng.integers(W, size=steps)] *= 10
    return w


@pytest.mark.parametrize("layout", ["tree", "balanced"])
@pytest.mark.parametrize("kind,s,expected", [
    ("calm", 0, None),  # nothing to gain: keep the uncoded plan
    ("calm", 1, 0),  # redundancy that does not pay goes
    ("slow", 0, "speeds"),  # persistent slowness: a smaller share, not redundancy
    ("slowroot", 1, "speeds"),
    ("heavy", 0, "coded"),  # transient heavy stalls: coding
])
def test_advisor_picks_by_regime(layout, kind, s, expected):
    advisor = PlanAdvisor(W, layouts=(layout,), message_bytes=1 << 20, global_batch=W * 32, patience=1)
    current = Candidate(s, None, layout)
    decision = advisor.decide(29, current, window(kind))
    if expected is None:
        assert decision is None
        return
    assert decision is not None and decision.step == 29 and decision.gain >= 1.1
    assert decision.plan.layout == layout and decision.plan.world_size == W
    if expected == "speeds":
        assert decision.candidate.stragglers == 0 and decision.candidate.speeds is not None
        slow = 3 if kind == "slow" else 0
        assert decision.candidate.speeds[slow] < 0.7 and sorted(decision.candidate.speeds)[1:] == [1.0] * (W - 1)
    elif expected == "coded":
        assert decision.candidate.stragglers >= 1
    else:
        assert decision.candidate == Candidate(expected, None, layout)
    assert f"{decision.gain:.2f}x faster" in decision.reason and decision.candidate.label in decision.predicted_s


def test_both_layouts_when_the_user_fixed_neither():
    """At 1 MiB and 7 ranks the chunk owners beat the tree's store-and-forward (uncoded, calm): the advisor moves
    there when it may choose the layout; with the tree fixed it stays."""
    both = PlanAdvisor(W, layouts=("tree", "balanced"), message_bytes=1 << 20, global_batch=W * 32, patience=1)
    decision = both.decide(29, Candidate(0), window("calm"))
    assert decision is not None and decision.candidate == Candidate(0, None, "balanced")
    assert {"tree s=0", "balanced s=0", "tree s=1", "balanced s=1"} <= set(decision.predicted_s)
    assert PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32, patience=1).decide(29, Candidate(0),
                                                                                         window("calm")) is None


def test_hysteresis_needs_patience_and_margin():
    advisor = PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32, patience=2)
    slow = window("slow")
    assert advisor.decide(9, Candidate(0), slow) is None  # first time: noted, not decided
    assert advisor.decide(19, Candidate(0), window("calm")) is None  # the streak breaks
    assert advisor.decide(29, Candidate(0), slow) is None
    assert advisor.decide(39, Candidate(0), slow) is not None  # two in a row
    strict = PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32, patience=1, margin=0.9)
    assert strict.decide(9, Candidate(0), slow) is None  # 1.25x predicted is not 10x
    for _ in range(5):  # noise alone never makes the plan flap
        assert advisor.decide(49, Candidate(0), window("calm", seed=_)) is None


def test_a_decisive_gain_is_taken_at_once():
    """A candidate predicted ``decisive`` times faster (heavy stalls: coding) is taken in the first round; a smaller
    gain (one rank 2x slower at W=7: 1.25x) still waits for ``patience`` rounds, and so does any with decisive=inf."""
    heavy, slow = window("heavy"), window("slow")
    advisor = PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32, patience=2)
    decision = advisor.decide(9, Candidate(0), heavy)
    assert decision is not None and decision.gain >= advisor.decisive and decision.candidate.stragglers >= 1
    assert advisor.decide(9, Candidate(0), slow) is None and advisor.decide(19, Candidate(0), slow) is not None
    patient = PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32, patience=2, decisive=float("inf"))
    assert patient.decide(9, Candidate(0), heavy) is None and patient.decide(19, Candidate(0), heavy) is not None
    with pytest.raises(ValueError, match="decisive must be > 1"):
        PlanAdvisor(W, decisive=1.0)


def test_measured_steps_calibrate_their_kind_of_plan():
    """The uncoded plan ran as the simulator predicts; s=1 then ran 3x slower (CPU contention it does not model):
    each kind's predictions are scaled by what its own steps measured, so s=0, predicted less than the 2x the
    margin asks for, becomes worth it; a kind that never ran gets the geometric mean of those that did. Steps of
    another plan (NaN) and too few steps calibrate nothing; steps with a stall do not count, nor does one calm
    step that took 100x (the median)."""
    calm, uncoded, current = window("calm"), Candidate(0, None, "balanced"), Candidate(1, None, "balanced")
    advisor = PlanAdvisor(W, layouts=("balanced",), message_bytes=1 << 20, global_batch=W * 32, patience=1, margin=0.5)
    ran = np.full(30, np.nan)
    ran[:15] = advisor.predict(uncoded, calm[:15])  # the first 15 steps ran s=0 as predicted
    assert advisor.decide(14, uncoded, calm[:15], step_seconds=ran[:15]) is None
    assert advisor.calibration == {uncoded.kind: pytest.approx(1.0, rel=0.05)}
    predicted = advisor.predict(current, calm[15:])
    assert advisor.decide(29, current, calm) is None  # s=1 as predicted: s=0 is not 2x faster
    few = np.full(30, np.nan)
    few[-2:] = 3 * predicted
    assert advisor.decide(29, current, calm, step_seconds=few) is None and current.kind not in advisor.calibration
    measured = np.full(30, np.nan)
    measured[15:] = 3 * predicted  # the last 15 steps ran s=1, 3x slower than predicted
    decision = advisor.decide(29, current, calm, step_seconds=measured)
    assert advisor.calibration[current.kind] == pytest.approx(3.0, rel=0.05)
    assert decision is not None and decision.candidate == uncoded and decision.gain >= 2
    assert decision.current_s == pytest.approx(3 * advisor.predict(current, calm), rel=0.05)
    assert decision.calibration["balanced s=1"] == pytest.approx(3.0, rel=0.05)  # (logged with the decision)
    never = advisor.predict(Candidate(2, None, "balanced"), calm, advisor.samples(current))
    assert decision.predicted_s["balanced s=2"] == pytest.approx(never * 3 ** 0.5, rel=0.05)
    stalled, seconds = calm.copy(), measured.copy()
    stalled[[20, 25], 4] *= 40  # two stalls: their steps took 50x, which depends on when they fall
    seconds[[20, 25]] = 50 * predicted
    seconds[17] = 100 * predicted  # and a calm step with a validation loop before it: not the plan's either
    advisor.decide(29, current, stalled, step_seconds=seconds)
    assert advisor.calibration[current.kind] == pytest.approx(3.0, rel=0.05)  # the calm steps' median


def test_no_speed_proportional_loads_from_a_window_too_short_to_tell_a_stall_from_slowness():
    """Two steps in which one rank stalled both times look like a rank 10x slower: no speeds candidate from fewer
    than MIN_SPEED_STEPS steps (heavy stalls still make coding worth it); from four, persistent slowness is seen."""
    from lightning_codedreduce.adapt import MIN_SPEED_STEPS

    stalled = window("calm", steps=MIN_SPEED_STEPS)
    stalled[:, 3] *= 10
    advisor = PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32, patience=1)
    assert all(c.speeds is None for c in advisor.candidates(stalled[:2]))
    assert any(c.speeds is not None and c.speeds[3] < 0.2 for c in advisor.candidates(stalled))
    decision = advisor.decide(1, Candidate(0), stalled[:2])
    assert decision is not None and decision.candidate.stragglers >= 1


def test_rounds_agree_up_to_speed_noise():
    """Two rounds whose speed estimates differ by noise (rank 3 at 0.5 then 0.45; rank 5 crossing the full-speed
    threshold) agree, so the switch comes after ``patience`` rounds; a different slow rank starts a new streak."""
    advisor = PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32, patience=2)
    first, second, other = window("slow", seed=1), window("slow", seed=2), window("slow", seed=3)
    second[:, 3] *= 1.1
    second[:, 5] *= 1.15
    other[:, 3], other[:, 1] = other[:, 1], other[:, 3] * 1.0  # rank 1 is the slow one now
    a, b = estimate_speeds(first), estimate_speeds(second)
    assert a != b and Candidate(0, a).agrees(Candidate(0, b)) and not Candidate(0, a).agrees(Candidate(0, b, "balanced"))
    assert not Candidate(0, a).agrees(Candidate(0, estimate_speeds(other))) and not Candidate(0, a).agrees(Candidate(0))
    assert advisor.decide(9, Candidate(0), first) is None
    decision = advisor.decide(19, Candidate(0), second)
    assert decision is not None and decision.candidate.speeds == b  # the latest estimate
    assert advisor.decide(29, Candidate(0), first) is None and advisor.decide(39, Candidate(0), other) is None


def lockstep(model: str, world: int, steps: int, seed: int) -> np.ndarray:
    """Seconds per sample that the ranks of an uncoded plan (32 samples each) measure under the simulator's
    straggler ``model``, the benchmarks' delays with every rank eligible; every step waits for the slowest."""
    strag = sim.Stragglers(sim.StragglerSpec.default(model), world, {r: 32 * SAMPLE_S for r in range(world)}, seed)
    start, rows = 0.0, []
    for t in range(steps):
        ends = [strag.finish(r, t, start)[0] for r in range(world)]
        rows.append([(e - start) / 32 for e in ends])
        start = max(ends)
    return np.array(rows)


@pytest.mark.parametrize("seed", range(4))
def test_noise_in_every_step_is_not_worth_coding_but_stall_episodes_are(seed):
    """Shifted-exponential noise (every rank, every step, in proportion to its compute): a rank delayed and
    not waited for is still late for the next step, so at W=13 coding costs more than it saves and the
    advisor keeps s=0 (scored one step at a time, it predicted s=1 faster: measured 0.84x DDP's speed
    against s=0's 0.99x). Heavy stall episodes, measured the same way, still call for coding."""
    world = 13
    advisor = PlanAdvisor(world, layouts=("balanced",), message_bytes=1_060_000, global_batch=world * 32, patience=1)
    uncoded, coded = Candidate(0, None, "balanced"), Candidate(1, None, "balanced")
    noisy = lockstep("shiftexp", world, steps=10, seed=seed)
    assert advisor.predict(coded, noisy, 32) > advisor.predict(uncoded, noisy, 32)
    decision = advisor.decide(9, uncoded, noisy)
    assert decision is None or decision.candidate.stragglers == 0
    heavy = advisor.decide(9, uncoded, lockstep("heavy", world, steps=10, seed=seed))
    assert heavy is not None and heavy.candidate.stragglers >= 1


def test_a_stall_measured_under_a_coded_plan_keeps_its_seconds():
    """W=13 under balanced s=1 (R 2.17), 240 ms of compute per 32 samples, and heavy stalls: some rank is
    always stalled for 2.4 s (10x its compute), which shows in one note every 4 steps, the others not waited
    for. Scored for s=0 (shares of 32), each stall still lasts 2.4 s: s=0 waits for it, so ``auto``
    stays coded. Scaling the stall by the share (2.4 s x 32/69) made s=0 look almost calm, and ``auto``
    went back to s=0 in the middle of the stalls (measured: it flapped four times in 60 steps)."""
    world, per_sample = 13, 0.24 / 32
    advisor = PlanAdvisor(world, layouts=("balanced",), message_bytes=1_060_000, global_batch=world * 32,
                          patience=1)
    coded = Candidate(1, None, "balanced")
    shares = advisor.samples(coded)
    rng = np.random.default_rng(0)
    window = per_sample * (1 + 0.05 * rng.random((10, world)))
    for t in (2, 6):  # stall episodes begin in these steps (the one of step 10 has not been noted yet)
        r = int(rng.integers(world))
        window[t, r] += 2.4 / shares[r]
        window[t + 1:t + 4, r] = np.nan  # it skipped the steps reduced while it was stalled
    assert advisor.decide(9, coded, window, np.tile(shares, (10, 1))) is None
    uncoded = Candidate(0, None, "balanced")
    assert advisor.predict(uncoded, window, shares) > 1.2 * advisor.predict(coded, window, shares)
    # the same notes with their stalls scaled by the share: s=0 looked at least 10 % faster, so auto left
    assert advisor.predict(uncoded, window) < 0.9 * advisor.predict(coded, window)


def test_rare_stalls_are_counted_over_the_longer_look():
    """The blog's protocol at W=13 (each rank, each step, 1 %: 18x its compute): four stalls in 30 steps, none in
    the last 10. Under balanced s=1 the last 10 steps alone look calm and call s=0 back (measured: ``auto``
    switched to s=1 and back within 15 steps); counted over the 30 steps, the stalls keep s=1, and from s=0 they
    call for it. Speeds still come from the last 10 steps only: a rank slow before them is not slowed now."""
    world, per_sample = 13, 0.06 / 32
    advisor = PlanAdvisor(world, layouts=("balanced",), message_bytes=1_060_000, global_batch=world * 32,
                          patience=1)
    coded, uncoded = Candidate(1, None, "balanced"), Candidate(0, None, "balanced")
    rng = np.random.default_rng(0)
    for current in (coded, uncoded):
        shares = advisor.samples(current)
        window = per_sample * (1 + 0.05 * rng.random((30, world)))
        for t, r in ((2, 0), (8, 5), (13, 9), (18, 12)):  # rank 0 stalls too
            window[t, r] += 18 * 32 * per_sample / shares[r]
        window[:15, 4] *= 2  # rank 4 was slow, and is not any more
        measured = np.tile(shares, (30, 1))
        short = advisor.decide(29, current, window[-10:], measured[-10:])
        full = advisor.decide(29, current, window, measured, recent=10)
        if current == coded:
            assert short is not None and short.candidate.stragglers == 0 and full is None
        else:
            assert short is None and full is not None and full.candidate.stragglers >= 1
            assert not any("speeds" in label for label in full.predicted_s)  # no speed-proportional candidate


def test_missing_measurements_and_speed_estimates():
    w = window("slow")
    w[5:9, 3] = np.nan  # rank 3 skipped those steps while catching up
    assert estimate_speeds(w)[3] == pytest.approx(0.5, abs=0.05)
    assert estimate_speeds(window("calm")) is None  # within 10 % of the fastest: full speed
    assert PlanAdvisor(W, message_bytes=1 << 20).decide(3, Candidate(0), np.full((4, W), np.nan)) is None
    with pytest.raises(ValueError, match="margin"):
        PlanAdvisor(W, margin=1.5)
    advisor = PlanAdvisor(3, branching=2, global_batch=6)
    assert advisor.plan(Candidate(2)) is None and Candidate(2) not in advisor.candidates(window("calm")[:, :3])


class Channel:
    """What ``PlanSchedule.exchange`` uses of a CodedReducer, for W ranks in one process: notes go to rank 0's
    inbox, announcements to every rank's list, effective ``lead`` steps past a given result frontier."""

    def __init__(self, frontier: int):
        self.inbox, self.announced_list, self.frontier = [], [], frontier

    def port(self, rank: int):
        channel = self

        class Port:
            def post_note(self, obj):
                channel.inbox.append((rank, obj))

            def take_notes(self):
                notes, channel.inbox = channel.inbox, []
                return notes

            def announce(self, obj, lead):
                channel.announced_list.append((channel.frontier + lead, obj))
                return channel.frontier + lead

            def announced(self):
                return list(channel.announced_list)

        port = Port()
        port.rank = rank
        return port


def test_schedule_exchange_decides_from_posted_notes_and_every_rank_adopts_the_announcement():
    from lightning_codedreduce.adapt import PlanSchedule

    advisor = PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32, patience=1)
    schedules = [PlanSchedule(advisor, Candidate(0), every=10, clock=itertools.count(0, 0.2).__next__)
                 for _ in range(W)]  # (steps of 0.2 s, the slow rank's pace)
    channel = Channel(frontier=11)
    slow = window("slow", steps=10)
    for r in reversed(range(W)):  # rank 0 last: the others' notes are in its inbox when it decides
        for t in range(10):
            due = schedules[r].note(t, slow[t, r] * 32, 32)
        assert due
        schedules[r].exchange(9, channel.port(r), lead=3)
    assert len(channel.announced_list) == 1 and channel.announced_list[0][0] == 14  # frontier 11 + lead 3
    decisions = [s.poll(channel.port(r).announced()) for r, s in enumerate(schedules)]
    assert all(d == decisions[0] for d in decisions) and decisions[0][0]["effective_step"] == 14
    assert decisions[0][0]["candidate"].speeds[3] < 0.7  # the slow rank's posted notes decided it
    assert all(s.due(13) is None and s.due(14) is not None for s in schedules)
    assert all(s.current == decisions[0][0]["candidate"] for s in schedules)
    assert schedules[0].poll(channel.port(0).announced()) == []  # each announcement is taken in once
    # rank 0's own steps (0.2 s each, the first two left out) calibrated the uncoded tree's predictions
    assert advisor.calibration[Candidate(0).kind] == pytest.approx(0.2 / advisor.predict(Candidate(0), slow[2:]), rel=0.1)


def test_rounds_come_every_every_steps_after_a_first_look_halfway():
    """Rounds after every ``every`` steps, and once halfway through the run's first ``every`` steps (counted from
    the run's first step, e.g. a resumed one's); a pending switch holds them; ``every`` < 4 has no early look."""
    from lightning_codedreduce.adapt import PlanSchedule

    advisor = PlanAdvisor(W, message_bytes=1 << 20, global_batch=W * 32)
    for start in (0, 103):
        schedule = PlanSchedule(advisor, Candidate(0), every=10)
        due = [t for t in range(start, start + 30) if schedule.note(t, 0.06, 32)]
        first = [t for t in due if (t + 1) % 10]
        assert first == [start + 4] and [t for t in due if t not in first] == [t for t in range(start, start + 30)
                                                                              if (t + 1) % 10 == 0]
    short = PlanSchedule(advisor, Candidate(0), every=3)
    assert [t for t in range(9) if short.note(t, 0.06, 32)] == [2, 5, 8]


def test_sampler_switches_plan_mid_epoch_without_losing_a_sample():
    """From (epoch, step) on every rank allocates by the new plan: the global batches do not change, and every
    sample of the epoch is computed (and counted) as before."""
    n, world, b = 200, 4, 8
    first, second = CodedReducePlan(world, 3, 0), CodedReducePlan(world, 3, 1, speeds=[1, 0.5, 1, 1])
    samplers = [CodedReduceBatchSampler(n, first, r, per_rank_batch=b, num_replicas=world, seed=3)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(1)
        s.switch_plan(1, 3, second)
    batches = [list(s) for s in samplers]
    counted = Counter()
    for step in range(len(samplers[0])):
        plan = second if step >= 3 else first
        assert all(s.plan_at(step) is plan for s in samplers)
        global_batch = samplers[0].global_batch(step)
        computed = Counter(i for r in range(world) for i in batches[r][step])
        assert set(computed) == set(global_batch)  # the same global batch, whoever computes it
        if plan is second:
            assert sum(computed.values()) > len(global_batch)  # coded: samples computed more than once
        for r in range(world):  # each sample counted by exactly one rank
            for piece in samplers[r].pieces(step):
                if piece.counted:
                    counted.update(batches[r][step][piece.start:piece.stop])
    assert counted == Counter(i for t in range(len(samplers[0])) for i in samplers[0].global_batch(t))
    with pytest.raises(ValueError, match="already yielded"):
        samplers[0].switch_plan(1, 2, first)
