"""StragglerInjector and StragglerMonitor: unit tests with a fake trainer, then real multi-process runs."""
from __future__ import annotations

import collections
import csv
import json
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from lightning_codedreduce.callbacks import (StragglerInjector, StragglerMonitor, format_summary, merge_csv,
                                             plot_stragglers, read_rows, summarize)
from lightning_codedreduce.callbacks.monitor import COLUMNS
from lightning_codedreduce.engine.reducer import StepStats
from lightning_codedreduce.plan import CodedReducePlan
from mp import launch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Sleeps:
    """Records what the injector would sleep instead of sleeping."""

    def __init__(self):
        self.calls = []

    def __call__(self, seconds):
        self.calls.append(seconds)


def fake_trainer(rank=0, step=0, world=3, strategy=None, callbacks=(), log_dir=None):
    return SimpleNamespace(global_rank=rank, global_step=step, world_size=world, callbacks=list(callbacks),
                           strategy=strategy or SimpleNamespace(), loggers=[], log_dir=log_dir,
                           default_root_dir=log_dir)


class FakeClock:
    """``time.monotonic`` that moves only when told: the injector's measurements are exact, whatever the load."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


def one_step(inj, trainer, module=None, compute_s=0.0, after_s=0.0, backwards=1, clock=None):
    """on_train_batch_start, `compute_s` of work, a real backward (if a module is given), `after_s` of
    waiting that is not compute (DDP's all-reduce), on_after_backward -- `backwards` times. With a
    ``FakeClock`` the work and the wait advance it instead of sleeping."""
    wait = time.sleep if clock is None else clock.advance
    inj.on_train_batch_start(trainer, module, None, 0)
    for _ in range(backwards):
        wait(compute_s)
        if module is not None:
            module(torch.ones(2, 3)).sum().backward()
        wait(after_s)
        inj.on_after_backward(trainer, module)


# ------------------------------------------------------------------------------------------ injector
def test_fixed_delays_sleep_once_per_step_on_the_chosen_rank_only():
    sleeps = Sleeps()
    inj = StragglerInjector(delays={1: 0.25}, sleep=sleeps)
    for step in range(3):
        one_step(inj, fake_trainer(rank=1, step=step), backwards=2)  # accumulation: 2 backward passes
        one_step(inj, fake_trainer(rank=0, step=step))
    assert sleeps.calls == [0.25, 0.25, 0.25]
    assert inj.injected == {0: 0.25, 1: 0.25, 2: 0.25}
    assert [inj.delay(r, 7) for r in range(3)] == [0.0, 0.25, 0.0]


def test_paper_model_sleeps_factor_minus_one_times_the_measured_compute(clock):
    sleeps = Sleeps()
    inj = StragglerInjector.paper(ranks=[2], factor=3.0, sleep=sleeps)
    module = torch.nn.Linear(3, 1)
    inj.on_train_start(fake_trainer(rank=2), module)
    # 50 ms of compute, then 150 ms that are not compute (e.g. DDP's all-reduce inside the backward)
    one_step(inj, fake_trainer(rank=2, step=0), module, compute_s=0.05, after_s=0.15, clock=clock)
    one_step(inj, fake_trainer(rank=1, step=0), module, compute_s=0.05, clock=clock)
    assert sleeps.calls == [pytest.approx(2 * 0.05)]  # the 150 ms wait is not counted
    # a backward that computes no parameter gradient (a step skipped while catching up) does not sleep
    inj.on_train_batch_start(fake_trainer(rank=2, step=1), module, None, 0)
    torch.zeros((), requires_grad=True).backward()
    inj.on_after_backward(fake_trainer(rank=2, step=1), module)
    assert len(sleeps.calls) == 1 and 1 not in inj.injected
    inj.on_train_end(fake_trainer(rank=2), module)
    assert inj.delay(2, 5, measured_s=0.1) == pytest.approx(0.2) and inj.delay(0, 5, measured_s=0.1) == 0.0


def test_paper_model_without_parameter_hooks_times_to_on_after_backward(clock):
    sleeps = Sleeps()
    inj = StragglerInjector.paper(ranks=[0], factor=2.0, sleep=sleeps)
    one_step(inj, fake_trainer(rank=0), compute_s=0.04, clock=clock)
    assert sleeps.calls == [pytest.approx(0.04)]


def test_random_model_is_reproducible_by_seed_and_follows_the_model():
    a = StragglerInjector.random(p=0.3, shift=0.05, scale=0.1, seed=7)
    b = StragglerInjector.random(p=0.3, shift=0.05, scale=0.1, seed=7)
    c = StragglerInjector.random(p=0.3, shift=0.05, scale=0.1, seed=8)
    grid = [(r, s) for r in range(8) for s in range(500)]
    da = [a.delay(r, s) for r, s in grid]
    assert da == [b.delay(r, s) for r, s in reversed(grid)][::-1]  # order of queries does not matter
    assert da != [c.delay(r, s) for r, s in grid]
    hits = [d for d in da if d > 0]
    assert abs(len(hits) / len(da) - 0.3) < 0.03
    assert min(hits) >= 0.05
    assert abs(sum(hits) / len(hits) - 0.15) < 0.015  # shift + mean of Exponential(scale)
    only = StragglerInjector.random(p=1.0, shift=0.01, scale=0.0, ranks=[3])
    assert [only.delay(r, 0) for r in range(5)] == [0.0, 0.0, 0.0, 0.01, 0.0]
    # the hooks sleep exactly what delay() says, once per step
    sleeps = Sleeps()
    d = StragglerInjector.random(p=0.5, shift=0.01, scale=0.02, seed=3, sleep=sleeps)
    for step in range(20):
        one_step(d, fake_trainer(rank=1, step=step), backwards=2)
    assert sleeps.calls == [x for x in (d.delay(1, s) for s in range(20)) if x > 0]


@pytest.mark.parametrize("make, match", [
    (lambda: StragglerInjector(delays={1: -1.0}), "seconds"),
    (lambda: StragglerInjector.paper(ranks=[1], factor=0.5), "factor"),
    (lambda: StragglerInjector.paper(ranks=[]), "at least one rank"),
    (lambda: StragglerInjector.random(p=1.5), "probability"),
    (lambda: StragglerInjector.random(seed=-1), "seed"),
])
def test_injector_rejects_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------ monitor (unit)
def test_monitor_rows_from_engine_stats(tmp_path):
    """Rank 0 of a 3-rank plan (children 1 and 2): rank 2 is late every step and dies at step 3."""
    plan = CodedReducePlan(3, 3, 1)
    reducer = SimpleNamespace(finished_stats=collections.deque(), dead={})
    strategy = SimpleNamespace(plan=plan, step_records=[], reducer=reducer)
    inj = StragglerInjector(delays={})
    inj.injected[1] = 0.5
    trainer = fake_trainer(rank=0, world=3, strategy=strategy, callbacks=[inj], log_dir=str(tmp_path))
    mon = StragglerMonitor(summary=False, merge_timeout=1.0, stale_s=0.2)
    mon.setup(trainer, None, "fit")
    mon.on_train_start(trainer, None)
    t = 1000.0
    for step in range(5):
        t0 = t + step
        arrivals = {1: t0 + 0.005}
        if step == 0:
            arrivals[2] = t0 + 0.05  # late, but arrived while the record was open
        reducer.finished_stats.append(StepStats(step, local_ready=t0, sent=t0 + 0.01, result=t0 + 0.01, used=(1,),
                                                arrivals=arrivals))
        if step == 3:
            reducer.dead[2] = "silent for 30 s"
        strategy.step_records.append({"step": step, "compute_s": 0.02, "skipped": False})
        trainer.global_step = step + 1
        mon.on_train_batch_start(trainer, None, None, step)
        mon.on_train_batch_end(trainer, None, None, None, step)
    mon.on_train_end(trainer, None)
    mon.on_fit_end(trainer, None)
    path = tmp_path / "stragglers" / "rank0.csv"
    with open(path) as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    rows = read_rows(path)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["used"] == "1" and r["dropped"] == "2" and r["children"] == "1;2" for r in rows)
    assert rows[0]["late"] == "2" and float(rows[0]["saved_s"]) == pytest.approx(0.04)
    assert rows[0]["saved_is_lower_bound"] == "0"
    # never arrived: at least until the record became final (the next step's decode, 1 s later)
    assert rows[1]["saved_is_lower_bound"] == "1" and float(rows[1]["saved_s"]) == pytest.approx(1.0)
    assert float(rows[0]["wait_s"]) == pytest.approx(0.01)
    assert float(rows[1]["injected_s"]) == 0.5 and 1 not in inj.injected
    assert [r["dead"] for r in rows] == ["", "", "", "2", ""]
    summary = {s["rank"]: s for s in mon.summary}
    assert summary[2]["straggled"] == 5 and summary[1]["straggled"] == 0 and summary[0]["dropped"] == 5
    assert "rank 2 (5x)" in mon.summary_text and "dead ranks tolerated: [2]" in mon.summary_text
    assert "ranks [1, 2] did not finish" in mon.summary_text  # bounded wait: their files never came
    assert (tmp_path / "stragglers" / "stragglers.csv").exists()


def test_summary_merge_and_plot_from_files(tmp_path):
    header = ",".join(COLUMNS)
    rank0 = [header] + [f"0,{s},{s}.0,,0.010,0.020,0,0,0.005,1;2,1,2,,0.030,1," for s in range(6)]
    rank1 = [header] + [f"1,{s},{s}.0,0,0.010,0.020,0,0,,,,,,,0," for s in range(6)]
    rank2 = [header] + [f"2,{s},{s}.0,0,0.030,0.020,0.020,{s % 2},,,,,,,0," for s in range(6)] + ["2,6,6.0,0,0.0"]
    for r, lines in enumerate((rank0, rank1, rank2)):
        (tmp_path / f"rank{r}.csv").write_text("\n".join(lines) + "\n")
    n = merge_csv([tmp_path / f"rank{r}.csv" for r in range(3)], tmp_path / "all.csv")
    assert n == 18  # the truncated last line of rank 2 is skipped
    summary = summarize(read_rows(tmp_path / "all.csv"), world_size=3)
    assert [s["straggled"] for s in summary] == [0, 0, 6]
    assert summary[2]["skipped"] == 3 and summary[0]["saved_s"] == pytest.approx(0.18)
    text = format_summary(summary)
    assert "rank 2 (6x)" in text and "0.18 s*" in text
    png = plot_stragglers(tmp_path / "all.csv", tmp_path / "p.png")
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    switch = {"step": 1, "effective_step": 4, "plan": "s=1", "redundancy": 2.0, "reason": "s=1 predicted 3x faster"}
    assert "from step 4: s=1 (R 2.00): s=1 predicted 3x faster" in format_summary(summary, decisions=[switch])
    assert plot_stragglers(tmp_path / "all.csv", tmp_path / "q.png", decisions=[switch])


# ------------------------------------------------------------------------------------------ real runs
def check_png(path):
    from PIL import Image

    assert path.exists(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_monitor_on_a_codedreduce_run_names_the_delayed_rank(tmp_path):
    steps = 12
    run = launch("callbacks_worker.py", 3, ["--strategy", "codedreduce", "--steps", str(steps), "--delay", "2:0.3"],
                 tmp_path, timeout=150)
    run.check()
    d = tmp_path / "lg" / "version_0" / "stragglers"  # the default: <trainer.log_dir>/stragglers
    for r in range(3):
        with open(d / f"rank{r}.csv") as f:
            assert tuple(next(csv.reader(f))) == COLUMNS
        rows = read_rows(d / f"rank{r}.csv")
        assert sorted(int(x["step"]) for x in rows) == list(range(steps)), r
        assert (d / f"rank{r}.done").read_text().strip() == "ok"
    rows0 = read_rows(d / "rank0.csv")
    assert all(x["children"] == "1;2" and x["parent"] == "" for x in rows0)
    assert all(x["wait_s"] != "" and x["used"] != "" for x in rows0)
    rows2 = read_rows(d / "rank2.csv")
    assert sum(float(x["injected_s"]) for x in rows2) >= 0.3
    assert any(int(x["skipped"]) for x in rows2)  # it lagged and caught up without computing
    merged = read_rows(d / "stragglers.csv")
    assert len(merged) == 3 * steps
    summary = {s["rank"]: s for s in summarize(merged, world_size=3)}
    assert summary[2]["straggled"] >= steps // 2
    assert summary[2]["straggled"] > summary[1]["straggled"]
    assert summary[0]["saved_s"] > 0
    text = (d / "summary.txt").read_text()
    assert "stragglers (dropped by their parent): rank 2" in text
    assert "straggler summary" in run.outputs[0] and "rank 2 (" in run.outputs[0]  # printed at the end of fit
    check_png(d / "stragglers.png")
    with open(tmp_path / "lg" / "version_0" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert {"straggler/wait_s", "straggler/saved_s", "straggler/dropped", "straggler/compute_s"} <= set(columns)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_monitor_shows_the_plan_switches_of_auto(tmp_path):
    """stragglers="auto" switches the plan (and the reducer) while training: no row is lost across a switch, and the
    decisions reach the summary, plan_decisions.json, the plot and the Lightning logger."""
    steps = 12
    run = launch("callbacks_worker.py", 4, ["--auto", "--steps", str(steps), "--delay", "1:0.2"], tmp_path, timeout=150)
    run.check()
    d = tmp_path / "lg" / "version_0" / "stragglers"
    for r in range(4):
        assert sorted(int(x["step"]) for x in read_rows(d / f"rank{r}.csv")) == list(range(steps)), r
    decisions = json.loads((d / "plan_decisions.json").read_text())
    assert decisions and all(x["effective_step"] > x["step"] for x in decisions)
    # the first comes from gloo's ring (where auto starts): the first step past the loader's prefetch; later ones
    # are announced past rank 0's result frontier, which a coded root's protocol thread may hold ahead of its step
    assert decisions[0]["effective_step"] - decisions[0]["step"] <= 4
    text = (d / "summary.txt").read_text()
    assert f"from step {decisions[0]['effective_step']}: {decisions[0]['plan']}" in text
    check_png(d / "stragglers.png")
    with open(tmp_path / "lg" / "version_0" / "metrics.csv") as f:
        assert {"codedreduce/stragglers", "codedreduce/predicted_gain"} <= set(next(csv.reader(f)))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_callbacks_degrade_gracefully_under_ddp(tmp_path):
    steps = 6
    run = launch("callbacks_worker.py", 2, ["--strategy", "ddp", "--steps", str(steps), "--delay", "1:0.2"],
                 tmp_path, timeout=150)
    run.check()
    d = tmp_path / "lg" / "version_0" / "stragglers"
    merged = read_rows(d / "stragglers.csv")
    assert len(merged) == 2 * steps
    for row in merged:
        assert row["compute_s"] != "" and row["step_s"] != "" and row["wait_s"] == "" and row["dropped"] == ""
    slow = [float(x["compute_s"]) for x in merged if x["rank"] == "1"]
    fast = [float(x["compute_s"]) for x in merged if x["rank"] == "0"]
    assert all(c >= 0.2 for c in slow) and sum(fast) / len(fast) < 0.2  # DDP's wait is not counted as compute
    assert sum(float(x["injected_s"]) for x in merged if x["rank"] == "1") == pytest.approx(0.2 * steps, rel=0.05)
    step_s = [float(x["step_s"]) for x in merged if x["rank"] == "0" and int(x["step"]) > 0]
    assert min(step_s) >= 0.19  # DDP waits for the slow rank every step
    assert "no CodedReduce tree in this run" in (d / "summary.txt").read_text()
    check_png(d / "stragglers.png")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_monitor_reports_a_dead_rank_without_hanging(tmp_path):
    """Rank 2 is killed mid-run: the others train on (it is tolerated); at the end rank 0 waits a bounded
    time for rank 2's file, merges what exists and reports the death -- no collective, no hang."""
    d = tmp_path / "lg" / "version_0" / "stragglers"

    def rank2_trains(out_dir):
        p = d / "rank2.csv"
        return p.exists() and len(p.read_text().splitlines()) > 4

    steps = 40
    run = launch("callbacks_worker.py", 3, ["--steps", str(steps), "--delay", "0:0.05,1:0.05,2:0.05", "--timeout", "5"],
                 tmp_path, timeout=150, actions=[(rank2_trains, 2, signal.SIGKILL)])
    assert run.returncodes[2] == -signal.SIGKILL
    assert run.returncodes[:2] == [0, 0], run.outputs[0][-3000:]
    assert not (d / "rank2.done").exists()
    merged = read_rows(d / "stragglers.csv")
    assert sum(1 for r in merged if r["rank"] == "0") == steps and sum(1 for r in merged if r["rank"] == "1") == steps
    assert any(r["rank"] == "0" and r["dead"] == "2" for r in merged)
    text = (d / "summary.txt").read_text()
    assert "dead ranks tolerated: [2]" in text and "ranks [2] did not finish" in text
