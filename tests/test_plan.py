"""Property tests of CodedReducePlan: exact decoding for every tolerated straggler pattern, loads,
speed, identity and input validation."""
from __future__ import annotations

import itertools
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lightning_codedreduce.plan import CodedReducePlan

BRANCHINGS = [2, 3, 4, 5, 6, 12]
EXHAUSTIVE_MAX_PATTERNS = 2**12
configs = st.tuples(st.integers(1, 40), st.sampled_from(BRANCHINGS), st.integers(0, 2)).filter(lambda c: c[2] < c[1])


def local_sums(plan: CodedReducePlan, batch: int, v: np.ndarray) -> list[np.ndarray]:
    """Each rank's weighted local sum of the per-sample vectors ``v`` (float64)."""
    out = []
    for r in range(plan.world_size):
        acc = np.zeros(v.shape[1])
        for sh in plan.shards(r, batch):
            acc += sh.weight * v[sh.start:sh.stop].sum(axis=0)
        out.append(acc)
    return out


def simulate(plan: CodedReducePlan, local: list[np.ndarray], dead: set[int], rng: random.Random) -> np.ndarray | None:
    """Upward pass: children and the rank's own gradient arrive in random order, each parent decodes at
    the first decodable arrival set. A straggler's own gradient never comes: it still forwards when its
    code decodes without it (coded own slot); a rank that cannot decode never sends. ``None``: root is stuck."""
    msgs: dict[int, np.ndarray] = {}
    for r in reversed(range(plan.world_size)):  # children have larger ranks than parents
        sending = [c for c in plan.children(r) if c in msgs] + ([] if r in dead else [r])
        rng.shuffle(sending)
        coefs = None
        for i in range(len(sending) + 1):
            coefs = plan.decoder(r, sending[:i])
            if coefs is not None:
                assert set(coefs) <= set(sending[:i]), "decoder used a contribution that has not arrived"
                break
        if coefs is not None:
            own = {r: local[r]}
            msgs[r] = sum((c * own.get(k, msgs.get(k)) for k, c in coefs.items()), np.zeros_like(local[r]))
    return msgs.get(0)


def per_parent_patterns(plan: CodedReducePlan, rng: random.Random, count: int) -> list[set[int]]:
    """Random patterns where every parent loses at most ``tolerance(parent)`` children."""
    out = []
    for _ in range(count):
        dead: set[int] = set()
        for r in range(plan.world_size):
            kids = plan.children(r)
            if kids:
                dead.update(rng.sample(kids, rng.randint(0, plan.tolerance(r))))
        out.append(dead)
    return out


def check_pattern(plan, local, ref, dead, rng) -> bool:
    out = simulate(plan, local, dead, rng)
    tolerated = plan.tolerates(dead)
    assert tolerated == (out is not None), f"tolerates({sorted(dead)})={tolerated} but the simulation disagrees"
    assert tolerated or not plan.survives(dead), f"survives({sorted(dead)}) but the root cannot decode"
    if out is not None:
        np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max(), err_msg=f"dead={sorted(dead)}")
    return tolerated


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs, extra=st.integers(0, 50), seed=st.integers(0, 2**16))
@example(cfg=(13, 3, 1), extra=0, seed=1)  # regular tree, 4096 patterns
@example(cfg=(13, 12, 1), extra=3, seed=2)  # flat tree, FRC
@example(cfg=(4, 3, 1), extra=1, seed=3)  # integer (3,1) code, weights != 1
@example(cfg=(10, 4, 2), extra=2, seed=4)  # remainder blocks at s=2
@example(cfg=(4, 2, 1), extra=0, seed=5)  # a parent that cannot decode is a straggler of its own parent
@example(cfg=(40, 3, 1), extra=7, seed=6)
def test_every_tolerated_pattern_decodes_exactly(cfg, extra, seed):
    w, n, s = cfg
    plan = CodedReducePlan(w, n, s)
    batch = plan.min_global_batch_size + extra
    v = np.random.default_rng(seed).standard_normal((batch, 4))
    ref = v.sum(axis=0)
    local = local_sums(plan, batch, v)
    rng = random.Random(seed)
    others = range(1, w)
    if 2 ** (w - 1) <= EXHAUSTIVE_MAX_PATTERNS:
        patterns = [set(c) for k in range(w) for c in itertools.combinations(others, k)]
    else:
        patterns = [set(), *({r} for r in others)]
        patterns += [{r for r in others if rng.random() < p} for p in (0.05, 0.1, 0.2, 0.4) for _ in range(25)]
    for dead in patterns:
        check_pattern(plan, local, ref, dead, rng)
    for dead in per_parent_patterns(plan, rng, 30):
        assert check_pattern(plan, local, ref, dead, rng), f"dead={sorted(dead)} loses <= tolerance per parent"
    assert not plan.tolerates({0}) and not plan.tolerates(set(others) | {0})
    # the engine's rule: leaves lost within every parent's tolerance are survived; an orphaned live rank is not
    leaves = [r for r in others if not plan.children(r)]
    for dead in per_parent_patterns(plan, rng, 30):
        assert plan.survives(dead & set(leaves)), f"dead leaves {sorted(dead & set(leaves))}"
    for r in others:
        if plan.children(r):
            assert not plan.survives({r}), f"rank {r}'s children are orphaned"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs.filter(lambda c: c[2] > 0 and c[0] > 1), coded=st.sampled_from(["root", "all"]),
       extra=st.integers(0, 30), seed=st.integers(0, 2**16))
@example(cfg=(13, 3, 1), coded="root", extra=0, seed=1)
@example(cfg=(13, 3, 1), coded="all", extra=0, seed=2)
@example(cfg=(7, 3, 1), coded="root", extra=1, seed=3)  # remainder (3,1) code over two children and the own slot
@example(cfg=(4, 3, 1), coded="root", extra=0, seed=4)  # FRC pairs, the root paired with a leaf
@example(cfg=(10, 4, 2), coded="all", extra=2, seed=5)
def test_coded_own_slot_tolerates_a_slow_root_and_slow_parents(cfg, coded, extra, seed):
    """``coded_self``: a parent's own compute is one slot of its code. Any pattern of slow ranks that
    loses at most ``tolerance`` slots per coded parent decodes exactly, rank 0 included, and a slow
    parent still forwards its children's messages."""
    w, n, s = cfg
    plan = CodedReducePlan(w, n, s, coded_self=coded)
    assert plan.coded_self == coded and f"coded_self={coded!r}" in plan.describe() + repr(plan)
    assert plan.fingerprint() != CodedReducePlan(w, n, s).fingerprint()
    batch = plan.min_global_batch_size + extra
    v = np.random.default_rng(seed).standard_normal((batch, 3))
    ref, local, rng = v.sum(axis=0), local_sums(plan, batch, v), random.Random(seed)
    coded_ranks = [r for r in range(w) if plan.nodes[r].self_slot is not None]
    assert 0 in coded_ranks and (coded == "all" or coded_ranks == [0])
    assert plan.tolerates({0}), "a slow root is tolerated"
    for r in range(w):  # every single slow rank: the root and every parent included
        assert check_pattern(plan, local, ref, {r}, rng)
    for _ in range(30):  # at most `tolerance` slow slots under every parent, its own slot counted where coded
        slow: set[int] = set()
        for r in range(w):
            slots = plan.children(r) + ([r] if r in coded_ranks else [])
            if plan.children(r):
                slow.update(rng.sample(slots, rng.randint(0, plan.tolerance(r))))
        assert check_pattern(plan, local, ref, slow, rng), f"slow={sorted(slow)}"
    if 2 ** w <= EXHAUSTIVE_MAX_PATTERNS:  # every pattern: tolerates() agrees with the simulation
        for k in range(w + 1):
            for slow in itertools.combinations(range(w), k):
                check_pattern(plan, local, ref, set(slow), rng)
    # the own slot is used only when the code needs it; the decoder never names a contribution not in
    for r in coded_ranks:
        kids = plan.children(r)
        coefs = plan.decoder(r, kids)  # all children, no own gradient yet
        if len(kids) + 1 - plan.tolerance(r) <= len(kids):
            assert coefs is not None and r not in coefs
    assert not plan.survives({1}) or not plan.children(1)  # a dead (not slow) parent still orphans its children


def test_coded_self_argument_is_checked():
    with pytest.raises(ValueError, match="unknown coded_self 'yes'.*'none', 'root', 'all'"):
        CodedReducePlan(7, 3, 1, coded_self="yes")
    assert CodedReducePlan(7, 3, 0, coded_self="root").coded_self == "none"  # s=0: nothing to tolerate
    assert CodedReducePlan(7, 3, 1, coded_self="root", layout="balanced").nodes[0].self_slot is None
    assert "coded_self='root' tolerates it" in CodedReducePlan(7, 3, 1).describe()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs)
def test_any_k_minus_tolerance_children_decode(cfg):
    plan = CodedReducePlan(*cfg)
    for r in range(plan.world_size):
        kids = plan.children(r)
        k, t = len(kids), plan.tolerance(r)
        assert plan.decoder(r, []) is None and (kids or plan.decoder(r, [r]) == {r: 1.0})
        assert t == min(plan.stragglers, max(k - 1, 0))
        for size in range(k - t, k + 1):
            for arrived in itertools.combinations(kids, size):
                coefs = plan.decoder(r, [r, *arrived])
                assert coefs is not None, f"rank {r}: children {arrived} must decode (tolerance {t})"
                assert set(coefs) <= {r, *arrived} and coefs[r] == 1.0  # an uncoded own share: always, weight 1
        assert (r in plan.reduced_tolerance) == (bool(kids) and t < plan.stragglers)


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 40), n=st.sampled_from(BRANCHINGS), extra=st.integers(0, 100))
def test_uncoded_plan_has_no_redundancy(w, n, extra):
    plan = CodedReducePlan(w, n, 0)
    assert plan.redundancy == pytest.approx(1.0, abs=1e-12)
    batch = plan.min_global_batch_size + extra
    covered = sorted(p for r in range(w) for sh in plan.shards(r, batch) for p in range(sh.start, sh.stop))
    assert covered == list(range(batch))  # every position exactly once
    assert all(sh.weight == 1.0 for r in range(w) for sh in plan.shards(r, batch))
    assert plan.tolerates(set()) and all(not plan.tolerates({r}) for r in range(1, w))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs, extra=st.integers(0, 300))
def test_shards_match_loads(cfg, extra):
    plan = CodedReducePlan(*cfg)
    batch = plan.min_global_batch_size + extra
    assert plan.loads.shape == (plan.world_size,) and plan.loads.min() > 0
    assert plan.redundancy == pytest.approx(plan.loads.sum()) and plan.redundancy >= 1 - 1e-12
    for r in range(plan.world_size):
        shards = plan.shards(r, batch)
        assert shards == plan.shards(r, batch)  # constant across calls
        positions = [p for sh in shards for p in range(sh.start, sh.stop)]
        assert positions and len(set(positions)) == len(positions)
        assert 0 <= min(positions) and max(positions) < batch
        assert abs(len(positions) - plan.loads[r] * batch) <= plan.depth + 1
    assert plan.global_batch_for(8) >= plan.min_global_batch_size


@pytest.mark.parametrize("n", [3, 4])
def test_load_imbalance_small_worlds(n):
    worst = {w: CodedReducePlan(w, n, 1).load_imbalance for w in range(1, 41)}
    assert max(worst.values()) <= 1.15, {w: round(x, 3) for w, x in worst.items() if x > 1.15}


def test_regular_tree_redundancy_matches_paper():
    assert CodedReducePlan(13, 3, 1).redundancy == pytest.approx(2.74, abs=0.01)
    assert CodedReducePlan(13, 12, 1).redundancy == pytest.approx(1.86, abs=0.01)


# CPU seconds of a fresh process (no warm lru caches); CPU time, not wall clock, so that other jobs
# on a small shared machine do not make the test flaky.
_TIMER = """
import sys, time
from lightning_codedreduce.plan import CodedReducePlan
w, n, s = map(int, sys.argv[1:])
t = time.process_time()
plan = CodedReducePlan(w, n, s)
plan.shards(0, plan.min_global_batch_size)
print(time.process_time() - t)
"""


@pytest.mark.parametrize("w,n,s,limit", [(157, 12, 1, 2.0), (157, 12, 2, 2.0), (157, 12, 3, 2.0), (1000, 16, 1, 10.0)])
def test_build_time(w, n, s, limit):
    out = subprocess.run([sys.executable, "-c", _TIMER, str(w), str(n), str(s)], capture_output=True, text=True, check=True)
    assert float(out.stdout) < limit


def test_fingerprint_stable_and_distinct():
    fp = CodedReducePlan(13, 3, 1).fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and CodedReducePlan(13, 3, 1).fingerprint() == fp
    code = "from lightning_codedreduce.plan import CodedReducePlan; print(CodedReducePlan(13, 3, 1).fingerprint())"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert fresh == fp
    variants = [(14, 3, 1, "auto", 0), (13, 4, 1, "auto", 0), (13, 3, 0, "auto", 0), (13, 3, 2, "auto", 0),
                (13, 3, 1, "auto", 1), (12, 2, 1, "auto", 0), (12, 2, 1, "frc", 0)]
    fps = [CodedReducePlan(*v).fingerprint() for v in variants]
    assert fp not in fps and len(set(fps)) == len(fps)


def test_describe_mentions_every_rank():
    plan = CodedReducePlan(16, 3, 1)
    text = plan.describe()
    for r in range(16):
        assert re.search(rf"rank\s+{r}\b", text), r
    assert plan.fingerprint() in text
    assert plan.reduced_tolerance and str(plan.reduced_tolerance) in text


# ---------------------------------------------------------------- bad input: the message says how to fix
def test_world_size_below_one():
    with pytest.raises(ValueError, match="world_size must be >= 1.*use"):
        CodedReducePlan(0)


def test_branching_below_two():
    with pytest.raises(ValueError, match="branching must be >= 2.*e.g. branching=3"):
        CodedReducePlan(7, 1, 0)


def test_negative_stragglers():
    with pytest.raises(ValueError, match="stragglers must be >= 0.*use 0"):
        CodedReducePlan(7, 3, -1)


def test_stragglers_not_below_branching():
    with pytest.raises(ValueError, match="must be smaller than branching.*use e.g. branching=5"):
        CodedReducePlan(7, 3, 3)


def test_global_batch_too_small():
    plan = CodedReducePlan(13)
    with pytest.raises(ValueError, match=f"use at least {plan.min_global_batch_size}"):
        plan.shards(0, 1)
    with pytest.raises(ValueError, match="global_batch_size must be"):
        plan.shards(0, 0)


def test_unknown_code():
    with pytest.raises(ValueError, match="unknown code 'mds'.*choose one of"):
        CodedReducePlan(7, 3, 1, code="mds")


@pytest.mark.parametrize("w,n,s", [(5, 4, 1), (13, 4, 1), (40, 6, 2), (9, 3, 1), (21, 12, 1)])
def test_frc_plans_have_unit_weights(w, n, s):
    plan = CodedReducePlan(w, n, s, code="frc")  # fan-outs FRC cannot serve are skipped, not fatal
    batch = plan.min_global_batch_size + 5
    assert all(sh.weight == 1.0 for r in range(w) for sh in plan.shards(r, batch))
    assert all(set(plan.decoder(r, [r, *plan.children(r)]).values()) <= {1.0} for r in range(w))


@pytest.mark.parametrize("kwargs", [dict(world_size=2.5), dict(world_size="3"), dict(world_size=True),
                                    dict(branching=3.0), dict(stragglers="1"), dict(seed=False)])
def test_non_integer_arguments(kwargs):
    args = dict(world_size=7, branching=3, stragglers=1) | kwargs
    with pytest.raises(ValueError, match="must be an integer"):
        CodedReducePlan(**args)


# ---------------------------------------------------------------------------- the balanced layout
from lightning_codedreduce.plan.layout import BALANCED_MIN_BYTES, chunk_bounds, choose_layout, owner_of  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(world=st.integers(1, 40), s=st.integers(0, 3), batch=st.integers(1, 500))
def test_balanced_groups_cover_the_batch_once_per_group(world, s, batch):
    if world < s + 1:
        with pytest.raises(ValueError, match="stragglers"):
            CodedReducePlan(world, s + 2, s, layout="balanced")
        return
    plan = CodedReducePlan(world, s + 2, s, layout="balanced")
    groups = plan.balanced.groups
    assert sorted(r for g in groups for r in g) == list(range(world))  # a partition of the ranks
    assert all(len(g) >= s + 1 for g in groups)  # every group survives s slow members
    alloc = plan.allocation(batch)
    covered = []
    for members in groups:
        shards = {tuple((sh.start, sh.stop, sh.weight) for sh in alloc[r]) for r in members}
        assert len(shards) == 1  # replicas compute the same samples
        covered += [p for sh in alloc[members[0]] for p in range(sh.start, sh.stop)]
    assert sorted(covered) == list(range(batch))  # each sample once over the groups, weight 1
    assert all(sh.weight == 1.0 for a in alloc for sh in a)
    assert plan.irreproducible_reason() is None
    assert abs(plan.redundancy - world / len(groups)) < 1e-9


@settings(max_examples=100, deadline=None)
@given(world=st.integers(2, 20), s=st.integers(0, 2), slow=st.sets(st.integers(0, 19)))
def test_balanced_tolerates_slow_ranks_anywhere_the_root_included(world, s, slow):
    if world < s + 1:
        return
    plan = CodedReducePlan(world, s + 2, s, layout="balanced")
    slow = {r for r in slow if r < world}
    expected = all(any(r not in slow for r in g) for g in plan.balanced.groups)
    assert plan.tolerates(slow) == expected
    if len(slow) <= s:
        assert plan.tolerates(slow)  # any s slow ranks, rank 0 among them or not
    assert plan.survives(set()) and not plan.survives({world - 1})  # every rank owns chunks: no dead rank


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 10 ** 7), world=st.integers(1, 64), chunk=st.sampled_from([1024, 4096, 1 << 20]))
def test_chunks_tile_the_message_and_spread_over_owners(total, world, chunk):
    bounds = chunk_bounds(total, 4, world, chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1
    if total >= world:
        assert len(bounds) % world == 0  # every owner gets as many chunks
        owned = [sum(1 for c in range(len(bounds)) if owner_of(c, world) == r) for r in range(world)]
        assert len(set(owned)) == 1
    assert max(sizes) <= chunk // 4 + 1  # about chunk_bytes each, never more


def test_auto_layout_by_message_size_is_stated_in_describe():
    small = CodedReducePlan(7, layout="auto", gradient_bytes=20_000)
    big = CodedReducePlan(7, layout="auto", gradient_bytes=BALANCED_MIN_BYTES)
    unknown = CodedReducePlan(7, layout="auto")
    assert (small.layout, big.layout, unknown.layout) == ("tree", "balanced", "tree")
    assert "layout tree" in small.describe() and "latency-bound" in small.describe()
    assert "layout balanced" in big.describe() and "bandwidth-bound" in big.describe()
    assert choose_layout(2, 10 ** 9)[0] == "tree"  # two ranks: the tree is one hop already
    assert CodedReducePlan(7, layout="tree").fingerprint() != CodedReducePlan(7, layout="balanced").fingerprint()
    with pytest.raises(ValueError, match="unknown layout"):
        CodedReducePlan(7, layout="ring")


# ---------------------------------------------------------------------------- speed-proportional loads
speeds_for = st.lists(st.sampled_from([0.25, 0.5, 0.8, 1.0, 1.0, 1.0, 1.5, 3.0]), min_size=40, max_size=40)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs, speeds=speeds_for, extra=st.integers(0, 60), seed=st.integers(0, 2**16))
@example(cfg=(7, 3, 1), speeds=[0.5] + [1.0] * 39, extra=0, seed=1)  # a slow root
@example(cfg=(13, 3, 1), speeds=[1.0, 0.25] + [1.0] * 38, extra=3, seed=2)  # a slow internal node
def test_speed_proportional_loads_stay_exact_and_finish_together(cfg, speeds, extra, seed):
    w, n, s = cfg
    speeds = speeds[:w]
    plan = CodedReducePlan(w, n, s, speeds=speeds)
    equal = CodedReducePlan(w, n, s)
    assert [nd.children for nd in plan.nodes] == [nd.children for nd in equal.nodes]  # the same tree
    # the busiest rank (in time: load / speed) is not later than with equal shares (a few percent where a block
    # code's parts get a floor so that no child idles), and s=0 is exact
    time, equal_time = plan.loads / np.array(speeds), equal.loads / np.array(speeds)
    assert time.max() <= equal_time.max() * 1.03
    if s == 0:
        np.testing.assert_allclose(time, time.max(), rtol=1e-9)  # every rank finishes together
        assert plan.redundancy == pytest.approx(1.0, abs=1e-12)
    batch = plan.min_global_batch_size + extra
    v = np.random.default_rng(seed).standard_normal((batch, 3))
    ref, local, rng = v.sum(axis=0), local_sums(plan, batch, v), random.Random(seed)
    for dead in [set(), *per_parent_patterns(plan, rng, 25)]:
        assert check_pattern(plan, local, ref, dead, rng), f"dead={sorted(dead)} loses <= tolerance per parent"
    assert plan.fingerprint() != equal.fingerprint() or len(set(speeds)) == 1


@settings(max_examples=80, deadline=None)
@given(world=st.integers(1, 30), s=st.integers(0, 2), speeds=speeds_for, batch=st.integers(1, 400))
def test_balanced_speeds_size_groups_by_their_slowest_member(world, s, speeds, batch):
    if world < s + 1:
        return
    speeds = speeds[:world]
    plan = CodedReducePlan(world, s + 2, s, layout="balanced", speeds=speeds)
    slowest = np.array([min(speeds[r] for r in g) for g in plan.balanced.groups])
    np.testing.assert_allclose(plan.balanced.shares, slowest / slowest.sum(), rtol=1e-12)
    alloc = plan.allocation(batch)
    covered = [p for g in plan.balanced.groups for sh in alloc[g[0]] for p in range(sh.start, sh.stop)]
    assert sorted(covered) == list(range(batch))  # each sample once over the groups
    assert all(alloc[r] == alloc[g[0]] for g in plan.balanced.groups for r in g)  # replicas: the same samples
    assert plan.tolerates(set()) and "of the batch" in plan.describe()


@pytest.mark.parametrize("speeds,match", [([1, 1], "2 entries but there are 3 ranks"),
                                          ([1, 0, 1], "positive and finite, got 0.0 for rank 1"),
                                          ([1, float("nan"), 1], "positive and finite"),
                                          ("fast", "sequence of numbers"), (3, "sequence of numbers")])
def test_bad_speeds_say_how_to_fix(speeds, match):
    with pytest.raises(ValueError, match=match):
        CodedReducePlan(3, 2, 1, speeds=speeds)
