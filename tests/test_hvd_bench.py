"""The benchmark's Horovod script (benchmarks/hvd_script.py): the data each API hands each rank, and a tiny
harness run of the script under ``horovod.torch`` and under ``lightning_codedreduce.horovod`` side by side.

Protocol facts only (records for every step and rank, identical parameters), never timings.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_codedreduce.plan import CodedReducePlan
from procs import PY, ROOT, clean_env, run_all

sys.path.insert(0, str(ROOT))

import lightning_codedreduce.horovod as hvd  # noqa: E402
from benchmarks.hvd_script import GlobalBatchStream  # noqa: E402
from benchmarks.workloads import Scheme, global_batch, layout  # noqa: E402


def _stream(n: int, world: int, b: int, steps: int) -> GlobalBatchStream:
    """Sample i's features are (i, i): what a batch holds tells which samples it is."""
    X = np.repeat(np.arange(n, dtype=np.float32)[:, None], 2, axis=1)
    return GlobalBatchStream(X, np.zeros(n, dtype=np.int64), world * b, seed=3, steps=steps, dtype=torch.float64)


@pytest.mark.parametrize("world,lay", [(4, "tree"), (4, "balanced"), (7, "tree")])
def test_both_samplers_train_on_the_harness_global_batches(world, lay):
    """Under torch's sampler (Horovod) step t's W loader batches are the harness's global batch t; the coded
    sampler gives every rank exactly the units ``workloads.unit_layout`` says (its R), of that same batch."""
    n, b, steps = 200, 4, 5
    B = world * b
    data = _stream(n, world, b, steps)
    plan = CodedReducePlan(world, 3, 1, layout=lay)
    units = layout(Scheme("hvd_api", "hvd_api", 3, 1, lay), world, b)
    assert units.global_batch == B and units.redundancy == pytest.approx(sum(map(len, units.positions)) / B)
    for step in range(steps):
        want = global_batch(n, B, 3, step)
        horovod = [list(DataLoader(data, batch_size=b, sampler=DistributedSampler(data, world, r, shuffle=False)))[step]
                   for r in range(world)]
        assert sorted(int(v) for x, _, _ in horovod for v in x[:, 0]) == sorted(want.tolist())
        for r in range(world):
            sampler = hvd.DistributedSampler(data, shuffle=False, batch_size=b, plan=plan, rank=r)
            per_step = len(sampler) // steps
            assert per_step == units.samples(r)
            mine = list(sampler)[step * per_step:(step + 1) * per_step]
            assert [k - step * B for k in mine] == units.positions[r]  # positions within the global batch
            assert Counter(int(data[k][0][0]) for k in mine) == Counter(want[units.positions[r]].tolist())


# ---------------------------------------------------------------------------- the harness, both APIs
STEPS = 4


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("Horovod is not installed (make horovod): the baseline needs horovod.torch")
    out = tmp_path_factory.mktemp("hvd_bench")
    cmd = [PY, "benchmarks/harness.py", "--network", "loopback", "--worlds", "4", "--workloads", "mlp",
           "--stragglers", "none", "paper", "--steps", str(STEPS), "--schemes", "horovod", "hvd_api",
           "--script-dtype", "float64", "--save-params", "--no-sim", "--no-plots", "--out", str(out)]
    group = run_all([(cmd, clean_env())], out / "logs", timeout=170)  # stops the harness (and so its ranks) on timeout
    group.check()
    return out, group.outputs[0]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_every_rank_records_every_step_under_both_apis(side_by_side):
    out, _ = side_by_side
    res = json.loads((out / "results.json").read_text())
    cells = {(m["stragglers"], m["scheme"]): m for m in res["cells"]}
    assert set(cells) == {(s, k) for s in ("none", "paper") for k in ("horovod", "hvd_api")}
    for (model, scheme), m in cells.items():
        assert m["steps"] == STEPS and m["checksums_agree"] and m["matches_replay"], m["id"]
        assert m["R"] == pytest.approx(1.75 if scheme == "hvd_api" else 1.0)  # W=4 tree: 7 units of 4
        for r in range(4):
            rank = json.loads((out / "raw" / "W4" / "cells" / m["id"] / f"rank{r}.json").read_text())
            assert [rec["step"] for rec in rank["records"]] == list(range(STEPS))
            assert all(rec["t_done"] >= rec["t_in"] for rec in rank["records"])
            computed = [rec for rec in rank["records"] if not rec.get("skipped")]
            assert computed and all(rec["target_end"] >= rec["start"] for rec in computed)
            assert rank["api"] == ("horovod" if scheme == "horovod" else "codedreduce")
    # the straggler (paper: rank 3 sleeps 3x its compute) is delayed in both; only the coded API may skip steps
    assert json.loads((out / "raw" / "W4" / "cells" / cells["paper", "horovod"]["id"] / "rank0.json").read_text())[
        "skipped_steps"] == 0


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_coded_api_trains_exactly_what_horovod_trains(side_by_side):
    """float64: the coded API's decoded sums equal Horovod's all-reduce to rounding, stragglers or not."""
    out, _ = side_by_side
    raw = out / "raw" / "W4" / "cells"
    for model in ("none", "paper"):
        theirs = np.load(raw / f"W4-mlp-{model}-horovod" / "params.npy")
        mine = np.load(raw / f"W4-mlp-{model}-hvd_api" / "params.npy")
        assert mine.shape == theirs.shape and np.abs(theirs).max() > 0
        assert np.abs(mine - theirs).max() <= 1e-5 * np.abs(theirs).max(), model
        loss = [json.loads((raw / f"W4-mlp-{model}-{s}" / "rank0.json").read_text())["final_loss"]
                for s in ("horovod", "hvd_api")]
        assert loss[1] == pytest.approx(loss[0], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ratios_carry_R_and_the_script_table_is_written(side_by_side):
    out, stdout = side_by_side
    res = json.loads((out / "results.json").read_text())
    rows = [r for r in res["ratios"] if r["scheme"] == "hvd_api" and r["vs"] == "horovod"]
    assert {r["stragglers"] for r in rows} == {"none", "paper"}
    assert all(r["R"] == pytest.approx(1.75) and r["R_vs"] == 1.0 and r["step_speedup"] > 0 for r in rows)
    assert res["meta"]["script"] == {"launcher": "horovodrun", "dtype": "float64"}
    md = (out / "results.md").read_text()
    assert "## Horovod script: horovod.torch vs the coded API" in md and "R 1.75)" in md
    assert "Horovod script, horovod.torch vs the coded API" in stdout
