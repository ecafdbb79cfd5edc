"""CodedReduceBatchSampler: coverage with exact weights, identical shapes on all ranks, epochs,
DataLoader workers, resumable state and input validation."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_codedreduce.plan import CodedReducePlan
from lightning_codedreduce.sampler import CodedReduceBatchSampler

PLANS = {  # (world_size, branching, stragglers)
    "W1": (1, 3, 1), "W2": (2, 3, 1), "W7": (7, 3, 1), "W13-n3": (13, 3, 1), "W13-n12": (13, 12, 1),
    "W7-n2": (7, 2, 1), "uncoded": (9, 3, 0), "integer-code": (4, 3, 1),
    "W7-coded-root": (7, 3, 1, "auto", 0, "tree", None, 1 << 22, None, "root"),
    "W13-coded-all": (13, 3, 1, "auto", 0, "tree", None, 1 << 22, None, "all"),
}


def samplers(plan, dataset_len, batch, **kw):
    return [CodedReduceBatchSampler(dataset_len, plan, r, batch, **kw) for r in range(plan.world_size)]


def multipliers(plan: CodedReducePlan, dead: set[int]) -> list[float]:
    """How much each rank's local weighted sum counts in the root's result (0 if unused)."""
    sends = [False] * plan.world_size
    coefs: list[dict[int, float]] = [{}] * plan.world_size
    for r in reversed(range(plan.world_size)):  # a straggler's own gradient never comes (it may still forward)
        c = plan.decoder(r, [k for k in plan.children(r) if sends[k]] + ([] if r in dead else [r]))
        sends[r], coefs[r] = c is not None, c or {}
    assert sends[0], f"pattern {dead} is not tolerated"
    message = [0.0] * plan.world_size  # how much each rank's message counts
    message[0] = 1.0
    mult = [0.0] * plan.world_size
    for r in range(plan.world_size):  # parents before children
        for k, c in coefs[r].items():
            (mult if k == r else message)[k] = message[r] * c
    return mult


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("name", PLANS)
def test_every_position_has_total_weight_one(name, shuffle, drop_last):
    plan = CodedReducePlan(*PLANS[name])
    batch = plan.min_global_batch_size + 3
    n = 2 * batch + batch // 2 + 1  # not a multiple of the global batch: padding / dropping matters
    ranks = samplers(plan, n, batch, shuffle=shuffle, drop_last=drop_last, seed=7)
    patterns = [set()] + [{r} for r in range(plan.world_size) if plan.tolerates({r})]
    exact = all(s.uniform_weights for s in ranks)  # FRC / uncoded: 0/1 coefficients, sums of 1.0 are exact
    for epoch in range(3):
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert {len(b) for b in per_rank} == {len(ranks[0])} == {n // batch if drop_last else math.ceil(n / batch)}
        for step in range(len(ranks[0])):
            gb = ranks[0].global_batch(step)
            assert len(gb) == batch and all(s.global_batch(step) == gb for s in ranks)
            for r, s in enumerate(ranks):  # yielded indices are the global batch at the shard positions
                assert per_rank[r][step] == [gb[p] for sh in s.shards for p in range(sh.start, sh.stop)]
            for dead in patterns:
                mult = multipliers(plan, dead)
                total: Counter = Counter()
                for r, s in enumerate(ranks):
                    for idx, w in zip(per_rank[r][step], s.sample_weights.tolist()):
                        total[idx] += mult[r] * w
                want = Counter(gb)  # an index appears twice only where padding wrapped around
                assert total.keys() == want.keys()
                for idx, m in want.items():
                    assert total[idx] == m if exact else total[idx] == pytest.approx(m, abs=1e-12)
    if plan.stragglers == 0:  # uncoded: every position is processed once, with weight 1
        counts = Counter(p for s in ranks for sh in s.shards for p in range(sh.start, sh.stop))
        assert counts == Counter(range(batch)) and all(s.uniform_weights for s in ranks)


def test_weights_and_chunks():
    for name, cfg in PLANS.items():
        plan = CodedReducePlan(*cfg)
        for s in samplers(plan, 100, plan.min_global_batch_size + 1):
            assert s.sample_weights.dtype == torch.float64
            assert len(s.sample_weights) == sum(map(len, s.shards)) == len(next(iter(s)))
            expanded = [w for length, w in s.chunks for _ in range(length)]
            assert expanded == s.sample_weights.tolist()
            assert all(a[1] != b[1] for a, b in zip(s.chunks, s.chunks[1:]))  # maximal runs
            assert s.uniform_weights == all(w == 1.0 for w in expanded)
    coded = samplers(CodedReducePlan(4, 3, 1), 100, 20)
    assert not all(s.uniform_weights for s in coded)  # the (3,1) integer code has weights 2 and -1


def test_epoch_permutations():
    plan = CodedReducePlan(7, 3, 1)
    a, b = CodedReduceBatchSampler(50, plan, 0, 16), CodedReduceBatchSampler(50, plan, 5, 16)
    epoch0 = [a.global_batch(i) for i in range(len(a))]
    assert [b.global_batch(i) for i in range(len(b))] == epoch0  # same on every rank
    a.set_epoch(1)
    epoch1 = [a.global_batch(i) for i in range(len(a))]
    assert epoch1 != epoch0
    a.set_epoch(0)
    assert [a.global_batch(i) for i in range(len(a))] == epoch0
    flat = [i for gb in epoch1 for i in gb]
    assert sorted(flat[:50]) == list(range(50)) and flat[50:] == flat[: 64 - 50]  # padding wraps around
    plain = CodedReduceBatchSampler(50, plan, 0, 16, shuffle=False)
    plain.set_epoch(3)
    assert [i for k in range(len(plain)) for i in plain.global_batch(k)] == [i % 50 for i in range(64)]
    other_seed = CodedReduceBatchSampler(50, plan, 0, 16, seed=1)
    assert other_seed.global_batch(0) != epoch0[0]


def test_len_identical_on_all_ranks():
    for cfg in PLANS.values():
        plan = CodedReducePlan(*cfg)
        for n in (plan.min_global_batch_size + 5, 1000, 1001):
            for drop_last in (False, True):
                lens = {len(s) for s in samplers(plan, n, plan.min_global_batch_size + 5, drop_last=drop_last)}
                assert len(lens) == 1


def test_dataloader_with_workers_matches_direct_iteration():
    plan = CodedReducePlan(7, 3, 1)
    sampler = CodedReduceBatchSampler(203, plan, 2, 32, seed=3)
    sampler.set_epoch(1)
    direct = list(sampler)
    loader = DataLoader(TensorDataset(torch.arange(203)), batch_sampler=sampler, num_workers=2)
    sampler.set_epoch(1)
    assert [batch[0].tolist() for batch in loader] == direct
    assert len(loader) == len(direct) == 7


@pytest.mark.parametrize("consumed", [0, 1, 4, 6])
def test_state_dict_resumes_mid_epoch(consumed):
    plan = CodedReducePlan(13, 3, 1)
    first = CodedReduceBatchSampler(500, plan, 4, 80, seed=5)
    first.set_epoch(2)
    full = list(first)
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it) for _ in range(consumed)]
    state = first.state_dict()
    assert state == {"epoch": 2, "step": consumed} and seen == full[:consumed]

    resumed = CodedReduceBatchSampler(500, plan, 4, 80, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what Lightning does before every epoch: keeps the loaded position
    assert resumed.state_dict() == state
    assert list(resumed) == full[consumed:]
    assert resumed.state_dict() == {"epoch": 2, "step": len(full)}
    resumed.set_epoch(3)  # a new epoch starts from its first step
    assert resumed.state_dict() == {"epoch": 3, "step": 0} and len(list(resumed)) == len(full)

    without_set_epoch = CodedReduceBatchSampler(500, plan, 4, 80, seed=5)
    without_set_epoch.load_state_dict(state)
    assert list(without_set_epoch) == full[consumed:]
    assert list(without_set_epoch) == full  # the loaded position is used once


def test_loaded_state_for_another_epoch_is_dropped():
    plan = CodedReducePlan(7, 3, 1)
    s = CodedReduceBatchSampler(100, plan, 1, 20)
    s.load_state_dict({"epoch": 0, "step": 3})
    s.set_epoch(1)
    assert s.state_dict() == {"epoch": 1, "step": 0} and len(list(s)) == 5


# ---------------------------------------------------------------- bad input: the message says how to fix
PLAN13 = CodedReducePlan(13, 3, 1)


def test_empty_dataset():
    with pytest.raises(ValueError, match="dataset is empty"):
        CodedReduceBatchSampler(0, PLAN13, 0, 64)


def test_dataset_smaller_than_global_batch_with_drop_last():
    with pytest.raises(ValueError, match="use a global batch <= 50.*or drop_last=False"):
        CodedReduceBatchSampler(50, PLAN13, 0, 64, drop_last=True)
    assert len(CodedReduceBatchSampler(50, PLAN13, 0, 64)) == 1  # padded instead


@pytest.mark.parametrize("rank", [-1, 13])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match="rank must be .*use this process's global rank"):
        CodedReduceBatchSampler(100, PLAN13, rank, 64)


def test_global_batch_below_plan_minimum():
    low = PLAN13.min_global_batch_size
    with pytest.raises(ValueError, match=f"must be >= {low}.*use at least {low}"):
        CodedReduceBatchSampler(100, PLAN13, 0, low - 1)


@pytest.mark.parametrize("kwargs", [dict(dataset_len=10.0), dict(rank="0"), dict(global_batch_size=True), dict(seed=-1)])
def test_non_integer_or_negative_arguments(kwargs):
    args = dict(dataset_len=100, plan=PLAN13, rank=0, global_batch_size=64) | kwargs
    with pytest.raises(ValueError, match="must be"):
        CodedReduceBatchSampler(**args)


def test_global_batch_step_out_of_range():
    s = CodedReduceBatchSampler(100, PLAN13, 0, 64)
    with pytest.raises(ValueError, match="step must be < 2"):
        s.global_batch(2)
