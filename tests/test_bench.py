"""Benchmarks: the simulator's model, the shared straggler/GC machinery, the emulated network, and the
harness end to end (quick mode; loopback where network namespaces are not permitted)."""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_codedreduce import sim
from lightning_codedreduce.plan import CodedReducePlan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import netns  # noqa: E402
from benchmarks.workloads import Scheme, default_schemes, global_batch, layout  # noqa: E402

M = 20_000  # bytes per message
FAST = sim.NetworkModel(bandwidth_bps=1e9, latency_s=1e-4, decode_bytes_per_s=1e15)


# ---------------------------------------------------------------------------- simulator
def test_processor_sharing_link():
    assert sim._ps_finish([(0.0, i) for i in range(4)], 1.0) == {i: pytest.approx(4.0) for i in range(4)}
    done = sim._ps_finish([(0.0, 0), (0.5, 1)], 1.0)  # alone for 0.5, then two share the link
    assert done[0] == pytest.approx(1.5) and done[1] == pytest.approx(2.0)


def test_no_stragglers_tree_is_L_hops_of_message_over_bandwidth():
    """Regular uncoded tree W=13, n=3 (L=2): up L hops, each parent's 3 messages share its ingress;
    down L hops, each parent's 3 copies share its egress."""
    hop = FAST.latency_s + 3 * M * 8 / FAST.bandwidth_bps
    r = sim.simulate("cr", 13, branching=3, s=0, msg_bytes=M, compute_s=0.05, net=FAST, steps=12)
    assert r.redundancy == pytest.approx(1.0)
    assert r.mean_step == pytest.approx(0.05 + 2 * hop + 2 * hop, rel=1e-6)
    assert r.step_end[0] == pytest.approx(0.05 + 2 * hop, rel=1e-6)  # root's result after the upward pass


def test_no_stragglers_ring_and_master_worker():
    rar = sim.simulate("rar", 13, msg_bytes=M, compute_s=0.05, net=FAST, steps=6)
    assert rar.mean_step == pytest.approx(0.05 + 2 * 12 * (FAST.latency_s + M / 13 * 8 / 1e9), rel=1e-6)
    gc = sim.simulate("gc", 13, s=1, msg_bytes=M, compute_s=0.05, net=FAST, steps=6)
    assert gc.redundancy == pytest.approx(2.0)
    # the master funnels: it decodes after one message per FRC pair, but all 12 share its ingress
    # (processor sharing finishes them together), then sends 12 copies through its egress
    assert gc.mean_step == pytest.approx(0.05 + 2 * (FAST.latency_s + 12 * M * 8 / 1e9), rel=1e-6)


def test_replay_carries_a_delay_into_the_next_steps():
    """Balanced s=1 at W=4, groups {0, 2} and {1, 3}, 1 s of compute per step. Rank 0 takes 2 s at step 0 (not
    waited for: rank 2 covers it), then rank 2 takes 1.5 s at step 1. Rank 0 is still computing step 0 when step
    1 begins, so step 1 waits for rank 2: 1.5 s, where scoring step 1 on its own says 1 s. A rank whose next
    results are out before it could begin them skips those steps."""
    plan = CodedReducePlan(4, 3, 1, layout="balanced")
    assert plan.balanced.groups == ((0, 2), (1, 3))
    topo = sim.Topology(plan)
    compute = np.ones((4, 4))
    compute[0, 0], compute[1, 2] = 2.0, 1.5
    ends, _ = sim.replay(topo, lambda r, t, start: start + compute[t, r], 4, M, FAST)
    comm = sim.step_time(topo, [0.0] * 4, M, FAST)  # one step's communication after the last gradient used
    assert np.diff(ends, prepend=0.0) == pytest.approx([1 + comm, 1.5 + comm, 1 + comm, 1 + comm], abs=1e-9)
    assert sim.step_time(topo, list(compute[1]), M, FAST) == pytest.approx(1 + comm)  # step 1 alone: rank 0 on time
    compute[0, 0], compute[1, 2] = 3.5, 1.0  # rank 0's step 0 ends after steps 1 and 2 are reduced without it
    ends, _ = sim.replay(topo, lambda r, t, start: start + compute[t, r], 4, M, FAST)
    assert ends[2] == pytest.approx(3 + 3 * comm) and ends[3] == pytest.approx(4 + 4 * comm)  # rank 0 not waited for


def test_regime_table_shows_auto_settled_and_against_the_best_fixed_scheme():
    from benchmarks.report import regime_table, settled_step

    done = np.cumsum([0.3] * 10 + [0.1] * 20)  # 10 slow steps, a switch effective at step 10, then 0.1 s
    assert settled_step(done, [{"effective_step": 10, "applied": True}], warmup=2) == pytest.approx(0.1)
    assert settled_step(done, [{"effective_step": 10}, {"effective_step": 29, "applied": False}], 2) == pytest.approx(0.1)
    assert settled_step(done, [], 2) is None and settled_step(done, [{"effective_step": 29}], 2) is None

    def cell(scheme, step, R=1.0, settled=None, adaptive=False):
        return {"W": 13, "workload": "mlp", "stragglers": "heavy", "scheme": scheme, "R": R, "step_s": step,
                "settled_step_s": settled, "scheme_cfg": {"adaptive": adaptive}}
    table = regime_table({"meta": {"batch": "global"}, "cells": [
        cell("ddp", 0.6), cell("crb_s1", 0.2, 2.17), cell("auto", 0.3, 1.8, 0.22, adaptive=True)]})
    assert "| regime | ddp R1.00 | crb_s1 R2.17 | auto (R per plan) | auto ÷ best fixed |" in table
    assert "| heavy | 600 | 200 (3.00x) | 300 (2.00x) [220, 2.73x] | 1.50x [1.10x] |" in table


def test_heavy_stall_rar_pays_it_codedreduce_does_not():
    heavy = sim.StragglerSpec.default("heavy")
    kw = dict(msg_bytes=M, compute_s=0.05, net=FAST, steps=30)
    rar = sim.simulate("rar", 13, stragglers=heavy, **kw)
    rar0 = sim.simulate("rar", 13, **kw)
    cr = sim.simulate("cr", 13, branching=3, s=1, stragglers=heavy, **kw)
    cr0 = sim.simulate("cr", 13, branching=3, s=1, **kw)
    tree = sim.simulate("cr", 13, branching=3, s=0, stragglers=heavy, **kw)
    assert rar.mean_step > 8 * rar0.mean_step  # ~10x compute stall in every step
    assert tree.mean_step > 8 * rar0.mean_step  # an uncoded tree waits too
    assert cr.mean_step < 1.2 * cr0.mean_step  # tolerated: one straggler per parent at most
    assert rar.mean_step / cr.mean_step > 3


def test_paper_stragglers_and_catch_up():
    paper = sim.StragglerSpec.default("paper")
    kw = dict(msg_bytes=M, compute_s=0.05, net=FAST, steps=30)
    cr = sim.simulate("cr", 7, branching=3, s=1, stragglers=paper, **kw)
    rar = sim.simulate("rar", 7, stragglers=paper, **kw)
    assert rar.mean_step == pytest.approx(4 * 0.05 + sim.ring_time(7, M, FAST), rel=1e-6)  # sleeps 3x compute
    assert cr.mean_step < 0.07


def test_paper_table_and_sweep_run():
    rows = sim.paper_table(FAST, steps=6, models=("none", "paper"))
    assert [r["stragglers"] for r in rows] == ["none", "paper"]
    for r in rows:
        assert r["W"] == 157 and r["R_cr"] > 3 and r["cr_vs_rar"] > 1 and r["paper_vs_gc"] == 27.2
    sw = sim.sweep(worlds=(13, 157), net=FAST, steps=6)
    assert [r["W"] for r in sw] == [13, 157] and all(r["rar"] > r["cr_s1"] for r in sw)


def test_sweep_reaches_10000_workers_quickly():
    r = sim.simulate("cr", 10_000, branching=12, s=1, msg_bytes=M, compute_s=0.05, net=FAST, steps=3,
                     stragglers=sim.StragglerSpec.default("heavy"))
    assert math.isfinite(r.mean_step) and r.redundancy > 10
    g = sim.simulate("gc", 10_000, s=1, msg_bytes=M, compute_s=0.05, net=FAST, steps=3)
    assert g.mean_step > 2 * 9_999 * M * 8 / 1e9


# ---------------------------------------------------------------------------- GC plan, stragglers, workloads
@pytest.mark.parametrize("world", [7, 13, 40])
def test_master_worker_plan(world):
    p = sim.MasterWorkerPlan(world, 1)
    assert p.depth == 1 and p.children(0) == list(range(1, world))
    assert p.loads[0] == 0 and p.redundancy == pytest.approx(2.0)
    assert p.shards(0, p.global_batch_for(64)) == []
    B = p.global_batch_for(64)
    for dead in (1, world - 1):  # the decoded sum counts every sample of the global batch exactly once
        coefs = p.decoder(0, [0, *(c for c in p.children(0) if c != dead)])
        effective = np.zeros(B)
        for r, a in coefs.items():
            for sh in p.shards(r, B):
                effective[sh.start:sh.stop] += a * sh.weight
        assert np.allclose(effective, 1.0)
    if (world - 1) % 2 == 0:
        odd = [c for c in p.children(0) if c % 2]  # one worker of each FRC pair
        assert p.decoder(0, [0, *odd]) is not None and p.decoder(0, [0, *odd[:-1]]) is None
        assert not p.tolerates([1, 2])
    assert p.tolerates([2])


def test_heavy_stall_episodes_one_at_a_time_and_deterministic():
    comp = {r: 0.05 for r in range(13)}
    a = sim.Stragglers(sim.StragglerSpec.default("heavy"), 13, comp, seed=3, t0=10.0)
    b = sim.Stragglers(sim.StragglerSpec.default("heavy"), 13, comp, seed=3, t0=10.0)
    eps = a.episodes(15.0)
    assert eps == b.episodes(15.0)
    assert {r for r, _, _ in a.episodes(60.0)} == set(range(13))  # every computing rank stalls, rank 0 included
    assert all(e2[1] == pytest.approx(e1[1] + e1[2]) and e1[0] != e2[0] for e1, e2 in zip(eps, eps[1:]))
    assert all(d == pytest.approx(0.5) for _, _, d in eps)  # 10x compute
    rank, start, dur = eps[3]
    end, delay = a.finish(rank, 0, start - 0.01)  # 10 ms of progress, then paused for the episode
    assert end == pytest.approx(start + dur + 0.04) and delay == pytest.approx(dur)
    other = next(r for r in range(1, 13) if r != rank and all(e[0] != r for e in eps[2:6]))
    assert a.finish(other, 0, start)[1] == pytest.approx(0.0, abs=1e-12)
    master = sim.Stragglers(sim.StragglerSpec.default("heavy"), 13, {0: 0.0, **{r: 0.05 for r in range(1, 13)}}, seed=3)
    assert 0 not in {r for r, _, _ in master.episodes(60.0)}  # a rank that computes nothing (GC's master) never


def test_paper_and_shiftexp_models():
    comp = {r: 0.1 for r in range(7)}
    p = sim.Stragglers(sim.StragglerSpec.default("paper"), 7, comp, seed=0)
    (slow,) = p.fixed
    assert p.finish(slow, 5, 1.0) == (pytest.approx(1.4), pytest.approx(0.3))
    assert 0 in {next(iter(sim.Stragglers(sim.StragglerSpec.default("paper"), 7, comp, seed=s).fixed))
                 for s in range(40)}  # rank 0 is drawn like any other
    e = sim.Stragglers(sim.StragglerSpec.default("shiftexp"), 7, comp, seed=0)
    d = [e.finish(3, k, 0.0)[1] for k in range(400)]
    assert d == [e.finish(3, k, 0.0)[1] for k in range(400)] and 0.07 < np.mean(d) < 0.13


def test_workload_layouts_match_the_sampler():
    from lightning_codedreduce.sampler import CodedReduceBatchSampler

    for sc in default_schemes(13):
        lay = layout(sc, 13, 64, "per-rank")
        if sc.kind == "hvd_api":  # the Horovod API always trains on DDP's global batch, in units of 64
            assert lay.global_batch == 13 * 64 and all(lay.samples(r) % 64 == 0 for r in range(13))
            continue
        assert max(lay.samples(r) for r in range(13)) == 64
        if sc.kind == "gc":
            assert lay.samples(0) == 0 and lay.redundancy == pytest.approx(2.0)
        if sc.kind in ("allreduce", "horovod"):
            assert lay.global_batch == 13 * 64
    plan = CodedReducePlan(7, 3, 1)
    B = plan.global_batch_for(64)
    sampler = CodedReduceBatchSampler(1000, plan, 4, B, seed=5)
    sampler.set_epoch(0)
    want = [list(b) for _, b in zip(range(8), iter(sampler))]  # crosses an epoch boundary? (1000/192 -> 6 steps)
    lay = layout(Scheme("x", "coded", 3, 1), 7, 64, "per-rank")
    for step, idx in enumerate(want):
        assert list(global_batch(1000, B, 5, step)[lay.positions[4]]) == idx


# ---------------------------------------------------------------------------- emulated network
def test_netns_create_and_always_tear_down():
    ok, why = netns.probe()
    if not ok:
        pytest.skip(f"network namespaces not permitted here: {why}")
    net = netns.EmulatedNetwork(3, rate="100mbit")
    with pytest.raises(RuntimeError, match="boom"):
        with net:
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert all(n in listed for n in net.names + [net.switch])
            out = subprocess.run(net.exec_prefix(1) + ["ip", "-4", "addr", "show", "dev", "eth0"],
                                 capture_output=True, text=True).stdout
            assert net.address(1) + "/15" in out and net.address(1).startswith("198.18.")
            qd = subprocess.run(net.exec_prefix(1) + ["tc", "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True).stdout
            assert "tbf" in qd and "100Mbit" in qd
            raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in net.names + [net.switch])
    assert not any((netns.NETNS_ETC / n).exists() for n in net.names)


# ---------------------------------------------------------------------------- the harness
def _horovod_available() -> tuple[bool, str]:
    if importlib.util.find_spec("horovod") is not None:
        return True, ""
    cache = Path(os.environ.get("HOROVOD_WHEEL_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                / "lightning_codedreduce" / "wheels"))
    if glob.glob(str(cache / "torch*" / "horovod-0.28.1-*.whl")):  # cached wheel: installing it is cheap
        proc = subprocess.run(["make", "horovod"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            return True, ""
    return False, "Horovod is not installed and no cached wheel exists (run `make horovod`; the build takes ~10 min)"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    hvd_ok, why = _horovod_available()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/harness.py", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=720)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, hvd_ok, why


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture's quick run (about 5 min here) counts towards the first test
def test_quick_mode_end_to_end(quick):
    out, stdout, hvd_ok, _ = quick
    res = json.loads((out / "results.json").read_text())
    assert {m["stragglers"] for m in res["cells"]} == {"none", "paper", "heavy"}
    schemes = {m["scheme"] for m in res["cells"]}
    assert {"cr_n3_s1", "cr_flat_n6_s1", "tree_n3_s0", "ddp", "gc_s1"} <= schemes
    for m in res["cells"]:
        assert m["checksums_agree"], m["id"]  # every rank applied the same updates
        assert m["matches_replay"], m["id"]  # ... the exact minibatch SGD trajectory
        assert m["R"] is not None and m["network"] in ("netns", "loopback")
    heavy = {m["scheme"]: m for m in res["cells"] if m["stragglers"] == "heavy"}
    assert heavy["ddp"]["step_s"] > 3 * heavy["cr_n3_s1"]["step_s"]  # DDP pays the stall, CodedReduce does not
    assert all(r["R"] is not None for r in res["ratios"]) and res["own"] and res["goals"]
    assert res["sim"]["validation"] and res["sim"]["paper_table"] and res["sim"]["sweep"]
    md = (out / "results.md").read_text()
    assert "| scheme | R |" in md and "paper 27.2x" in md
    for png in ("step_times_W7_logreg.png", "time_to_target_W7_logreg.png", "sim_validation.png", "sim_sweep.png"):
        assert (out / png).stat().st_size > 5000
    assert "CodedReduce step-time speed-up" in stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "crbench" not in listed or all(f"crbench{os.getpid()}" not in n for n in listed.split())


@pytest.mark.slow
@pytest.mark.timeout(900)  # (when it is the first to use the fixture, e.g. run alone)
def test_quick_mode_horovod_baseline(quick):
    out, _, hvd_ok, why = quick
    if not hvd_ok:
        pytest.skip(why)
    res = json.loads((out / "results.json").read_text())
    hvd = [m for m in res["cells"] if m["scheme"] == "horovod"]
    assert len(hvd) == 3 and all(m["checksums_agree"] and m["matches_replay"] for m in hvd)
    assert res["meta"]["horovod"]["available"]


@pytest.mark.slow
def test_loopback_fallback_is_marked(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/harness.py", "--network", "loopback", "--worlds", "4",
                           "--stragglers", "none", "--steps", "4", "--schemes", "coded", "allreduce", "--horovod", "off",
                           "--no-sim", "--no-plots", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["network"]["mode"] == "loopback"
    assert res["cells"] and all(m["network"] == "loopback" for m in res["cells"])
    assert "network: **loopback**" in (tmp_path / "results.md").read_text()


def test_persistent_slow_models_and_the_speeds_they_imply():
    comp = {r: 0.1 for r in range(7)}
    slow = sim.Stragglers(sim.StragglerSpec.default("slow"), 7, comp, seed=2)
    (r,) = slow.fixed
    assert all(slow.finish(r, k, 0.0) == (pytest.approx(0.2), pytest.approx(0.1)) for k in range(5))  # 2x, every step
    assert all(slow.finish(q, 3, 0.0)[1] == 0.0 for q in range(7) if q != r)
    assert sim.persistent_speeds(sim.StragglerSpec.default("slow"), 7, seed=2) == [0.5 if q == r else 1.0 for q in range(7)]
    root = sim.Stragglers(sim.StragglerSpec.default("slowroot"), 7, comp, seed=0)
    assert root.fixed == {0} and root.finish(0, 0, 1.0) == (pytest.approx(1.3), pytest.approx(0.2))  # 3x
    assert sim.persistent_speeds(sim.StragglerSpec.default("slowroot"), 4, seed=0) == pytest.approx([1 / 3, 1, 1, 1])
    assert sim.persistent_speeds(sim.StragglerSpec.default("heavy"), 4, seed=0) == [1.0] * 4


def test_blog_model_sleeps_rarely_and_long_on_every_rank():
    comp = {r: 0.1 for r in range(8)}
    b = sim.Stragglers(sim.StragglerSpec.default("blog"), 8, comp, seed=0)
    delays = np.array([[b.finish(r, k, 0.0)[1] for k in range(500)] for r in range(8)])
    assert set(np.round(np.unique(delays), 9)) == {0.0, 1.8}  # 18x compute, or nothing
    assert 0.004 < (delays > 0).mean() < 0.02 and (delays[0] > 0).any()  # about 1 % of steps, rank 0 too
    assert (delays == np.array([[b.finish(r, k, 0.0)[1] for k in range(500)] for r in range(8)])).all()


def test_same_global_batch_layouts_and_prop_scheme():
    """--batch global: every scheme trains on DDP's global batch; a coded rank computes about R x the per-rank
    batch. prop_s0 exists only where the regime has persistently slow ranks, and gives them smaller shares."""
    schemes = {s.name: s for s in default_schemes(7, sim.StragglerSpec.default("slow"), seed=2)}
    assert "prop_s0" not in {s.name for s in default_schemes(7, sim.StragglerSpec.default("heavy"))}
    for s in schemes.values():
        if s.kind == "horovod":
            continue
        lay = layout(s, 7, 32, "global")
        assert lay.global_batch == 7 * 32
        assert sum(lay.samples(r) for r in range(7)) == pytest.approx(lay.redundancy * 7 * 32, abs=7)
    (slow,) = [r for r, v in enumerate(schemes["prop_s0"].speeds) if v < 1]
    prop = layout(schemes["prop_s0"], 7, 32, "global")
    assert prop.samples(slow) < min(prop.samples(r) for r in range(7) if r != slow)
    assert layout(schemes["cr_n3_s1"], 7, 32, "per-rank").global_batch < 7 * 32
    with pytest.raises(ValueError, match="unknown batch mode"):
        layout(schemes["ddp"], 7, 32, "local")


def test_crossover_map_picks_by_regime(tmp_path):
    from benchmarks import crossover

    rows = {r["stragglers"]: r for r in crossover.crossover((7,), ("none", "slow", "heavy"), steps=12)}
    calm = rows["none"]
    assert calm["R"][calm["best"]] == 1.0 and "prop" not in calm["best"]  # no redundancy to pay for
    slow = rows["slow"]["step_s"]
    assert slow["balanced prop s=0"] < slow["balanced s=0"] and rows["slow"]["best_vs_ddp"] > 1.3  # smaller share
    heavy = rows["heavy"]
    assert heavy["R"][heavy["best"]] > 1.5 and heavy["best_vs_ddp"] > 3  # coding pays under heavy stalls
    assert crossover.main(["--worlds", "4", "--regimes", "none", "heavy", "--msg-mb", "1", "--steps", "6",
                           "--out", str(tmp_path)]) == 0
    assert (tmp_path / "crossover_1MiB.png").stat().st_size > 5000 and "| heavy | 4 |" in (tmp_path / "crossover.md").read_text()


def test_phase_changing_run_follows_its_phases():
    comp = {r: 0.1 for r in range(5)}
    run = sim.Stragglers(sim.StragglerSpec("phases", count=20), 5, comp, seed=1)
    delays, t = [], 0.0
    for step in range(80):
        delays.append([run.finish(r, step, t)[1] for r in range(5)])
        t += 0.3
    delays = np.array(delays)
    assert not delays[:20].any() and not delays[60:].any()  # calm, and calm again
    assert (delays[20:40].max(axis=1) > 0.5).mean() > 0.5  # heavy: a stalled rank in most steps
    slow = delays[40:60]
    (r,) = np.flatnonzero(slow.max(axis=0) > 0)
    assert np.allclose(slow[:, r], 0.1)  # one rank 2x slower, every step of the phase
    assert run.scales_with_compute(45) and not run.scales_with_compute(25)
    assert sim.StragglerSpec.default("phases").count == 50
