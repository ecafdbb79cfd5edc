"""Multi-process tests of the CodedReducer over gloo: exactness, stragglers, catch-up, faults, frames."""
import json
import signal
import time

import pytest

from mp import launch

pytestmark = pytest.mark.timeout(240)


def _results(run, ranks):
    return {r: run.result(r) for r in ranks}


def _assert_exact_and_identical(res):
    hashes = {r: d["hashes"] for r, d in res.items()}
    first = next(iter(hashes.values()))
    for r, h in hashes.items():
        assert h == first, f"rank {r} got different results than rank {next(iter(hashes))}"
    for r, d in res.items():
        assert d["error"] is None, d["error"]
        # error relative to the float32 rounding bound of the gradient computation (eps32 = 6e-8)
        assert max(d["errors"]) < 1e-6, f"rank {r}: relative error {max(d['errors'])} vs float64 reference"
    assert len({d["theta"] for d in res.values()}) == 1


def _assert_the_others_went_on(res, sleeper, at_least, caught_up=True):
    """Every rank but ``sleeper`` completed ``at_least`` steps while it slept; it then caught up by applying the
    results it missed, not by computing them."""
    start, end = res[sleeper]["sleep"]
    for r in set(res) - {sleeper}:
        during = sum(1 for t in res[r]["applied_at"] if start < t < end)
        assert during >= at_least, f"rank {r} completed only {during} steps while rank {sleeper} slept"
    if caught_up:
        assert len(res[sleeper]["skipped"]) >= at_least


@pytest.mark.parametrize("world,n,s,coded", [(7, 3, 1, "none"), (7, 2, 1, "none"), (7, 6, 2, "none"),
                                             (13, 3, 1, "none"), (13, 12, 1, "none"), (13, 4, 2, "none"),
                                             (7, 3, 0, "none"), (13, 3, 1, "root"), (7, 3, 1, "all")])
def test_exact_under_random_delays(tmp_path, world, n, s, coded):
    run = launch("engine_worker.py", world, ["--n", str(n), "--s", str(s), "--steps", "12", "--jitter", "0.03",
                                             "--coded-self", coded], tmp_path)
    run.check()
    _assert_exact_and_identical(_results(run, range(world)))


@pytest.mark.parametrize("layout", ["tree", "balanced"])
def test_adaptive_reducer_switches_plans_and_stays_exact(tmp_path, layout):
    """Plain PyTorch with stragglers="auto" (AdaptiveReducer): rank 2 computes 4x slower, so a decision round moves
    off the uncoded plan; every rank switches at the same step and every step's sum is the float64 reference's."""
    run = launch("engine_worker.py", 4, ["--s", "0", "--adaptive", "3", "--compute", "0.02", "--slow", "2:4",
                                         "--steps", "15", "--layout", layout], tmp_path)
    run.check()
    res = _results(run, range(4))
    decisions = res[0]["decisions"]
    # announced with a result (the tree), effective past rank 0's result frontier; gloo's ring: the next step
    lead = 1 if layout == "balanced" else 2
    assert decisions and decisions[0]["applied"] and decisions[0]["effective_step"] >= decisions[0]["step"] + lead
    assert decisions[0]["stragglers"] >= 1 or decisions[0]["speeds"][2] < 0.5, decisions[0]
    applied = [d for d in decisions if d["applied"]]  # (one announced past the last step may reach only some ranks)
    assert all([x for x in d["decisions"] if x["applied"]] == applied for d in res.values())
    for d in res.values():  # every rank took each decision in before the step it takes effect at
        assert all(s < x["effective_step"] for s, x in zip(d["decision_seen_after"], d["decisions"]))
    _assert_exact_and_identical(res)


def test_adaptive_decision_rounds_do_not_wait_for_a_sleeping_rank(tmp_path):
    """Announced decisions: every 3 steps each rank sends its notes to rank 0 without waiting, and rank 0 decides
    (here never to switch) from what arrived: a leaf that sleeps 8 s holds nobody up, rounds included."""
    run = launch("engine_worker.py", 4, ["--adaptive", "3", "--adapt-margin", "0.99", "--compute", "0.02",
                                         "--steps", "60", "--sleep-once", "3:4:8"], tmp_path)
    run.check()
    res = _results(run, range(4))
    _assert_the_others_went_on(res, 3, 15, caught_up=False)  # (about 5 decision rounds while it slept)
    assert all(d["decisions"] == [] for d in res.values())
    _assert_exact_and_identical(res)


def test_leaf_sleeping_20s_does_not_stop_the_others(tmp_path):
    # W=7, n=3, s=1: rank 6 is a leaf; it sleeps 20 s once at step 5
    run = launch("engine_worker.py", 7, ["--steps", "60", "--compute", "0.05", "--sleep-once", "6:5:20"], tmp_path)
    run.check()
    res = _results(run, range(7))
    _assert_the_others_went_on(res, 6, 20)
    _assert_exact_and_identical(res)


@pytest.mark.parametrize("coded,sleeper", [("root", 0), ("all", 1)])
def test_coded_own_slot_sleeping_parent_root_included_does_not_stop_the_others(tmp_path, coded, sleeper):
    """coded_self: the sleeping parent's protocol thread still decodes its children (and, at the root, sends
    every result down) while its compute sleeps; it then catches up by applying the results it missed."""
    run = launch("engine_worker.py", 7, ["--steps", "60", "--compute", "0.05", "--coded-self", coded,
                                         "--sleep-once", f"{sleeper}:5:15"], tmp_path)
    run.check()
    res = _results(run, range(7))
    _assert_the_others_went_on(res, sleeper, 15)
    # an uncoded own share never sends without it (0 such steps); how many of the sleep's steps went up through the
    # sleeper, rather than being decoded above it without its subtree, depends on the load
    forwarded = [t for t in res[sleeper]["forwarded_without_own"] if t >= 5]
    assert len(forwarded) >= 5, f"rank {sleeper} decoded only steps {forwarded} without its own gradient"
    _assert_exact_and_identical(res)


def training_started(out_dir):
    return (out_dir / "rank0.at5").exists()


def after(seconds, condition):
    """A launch action trigger: ``seconds`` after ``condition`` first held."""
    seen = []

    def trigger(out_dir):
        if not seen and condition(out_dir):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= seconds

    return trigger


def test_sigstop_leaf_catches_up(tmp_path):
    run = launch("engine_worker.py", 7, ["--steps", "150", "--compute", "0.05", "--timeout", "25"], tmp_path,
                 actions=[(training_started, 5, signal.SIGSTOP), (after(10, training_started), 5, signal.SIGCONT)])
    run.check()
    res = _results(run, range(7))
    assert len(res[5]["skipped"]) >= 10, "the stopped leaf should have applied results it missed"
    _assert_exact_and_identical(res)


def test_slow_leaf_lag_and_memory_stay_bounded(tmp_path):
    # sleep-emulated compute long enough that scheduling jitter on 2 shared cores stays small against it
    run = launch("engine_worker.py", 7, ["--steps", "200", "--compute", "0.04", "--slow", "4:3"], tmp_path,
                 timeout=200)
    run.check()
    res = _results(run, range(7))
    assert max(res[4]["backlog"]) <= 2, f"lag of the slow leaf reached {max(res[4]['backlog'])} steps"
    assert len(res[4]["skipped"]) >= 100
    for r, d in res.items():
        assert d["max_buffered"] <= 2 * 3, f"rank {r} buffered {d['max_buffered']} child messages"
        assert max(d["backlog"] or [0]) <= 2
    _assert_exact_and_identical(res)


def test_internal_straggler_subtree_excluded(tmp_path):
    # rank 1 is a parent (children 3, 4); it is slow for one long step: the root decodes without its subtree
    run = launch("engine_worker.py", 7, ["--steps", "30", "--compute", "0.02", "--sleep-once", "1:3:3"], tmp_path)
    run.check()
    res = _results(run, range(7))
    assert res[3]["drained"] + res[1]["drained"] + res[0]["drained"] >= 1 or len(res[1]["skipped"]) >= 1
    assert len(res[1]["skipped"]) >= 5
    _assert_exact_and_identical(res)


def test_sigkill_leaf_tolerated_with_s1(tmp_path):
    run = launch("engine_worker.py", 7, ["--steps", "120", "--compute", "0.03", "--timeout", "10"], tmp_path,
                 actions=[(after(1.0, training_started), 4, signal.SIGKILL)])
    assert run.returncodes[4] == -signal.SIGKILL
    survivors = [r for r in range(7) if r != 4]
    assert all(run.returncodes[r] == 0 for r in survivors), run.outputs
    res = _results(run, survivors)
    assert "4" in res[1]["dead"], "the parent should record the dead child"
    _assert_exact_and_identical(res)
    assert all(len(d["hashes"]) == 120 for d in res.values())


def test_leaf_stopped_past_the_timeout_counts_as_dead(tmp_path):
    # SIGSTOP without SIGCONT: rank 6 (a leaf under rank 2) is silent; after the timeout its parent counts it
    # dead and the others finish exactly. Each link has a process group of its own: a gloo receive timeout
    # closes every pair of its group, and must not cut rank 2's healthy link to its parent.
    def survivors_done(out_dir):
        return all((out_dir / f"rank{r}.json").exists() for r in range(6))

    # training (300 x 40 ms) lasts well past the 5 s until the stop counts as a death, so the news reaches all
    run = launch("engine_worker.py", 7, ["--steps", "300", "--compute", "0.04", "--timeout", "5"], tmp_path,
                 actions=[(training_started, 6, signal.SIGSTOP), (survivors_done, 6, signal.SIGKILL)])
    survivors = list(range(6))
    assert all(run.returncodes[r] == 0 for r in survivors), run.outputs
    res = _results(run, survivors)
    assert "silent for 5 s" in res[2]["dead"]["6"], res[2]["dead"]
    assert all(list(d["dead"]) == ["6"] for d in res.values()), {r: d["dead"] for r, d in res.items()}
    _assert_exact_and_identical(res)
    assert all(len(d["hashes"]) == 300 for d in res.values())


def test_sigkill_leaf_fails_fast_with_s0(tmp_path):
    timeout = 8.0
    killed = []

    def kill_now(out_dir):
        if training_started(out_dir):
            killed.append(time.time())
            return True
        return False

    run = launch("engine_worker.py", 7, ["--s", "0", "--steps", "100000", "--compute", "0.03", "--timeout",
                                         str(timeout)], tmp_path, actions=[(kill_now, 6, signal.SIGKILL)], timeout=90)
    survivors = [r for r in range(7) if r != 6]
    for r in survivors:
        assert run.returncodes[r] == 3, f"rank {r} exited {run.returncodes[r]}:\n{run.outputs[r][-2000:]}"
        d = run.result(r)
        assert "rank 6" in d["error"], d["error"]
        assert d["error_at"] - killed[0] < timeout + 5, "the error must come within the configured bound"


def test_control_collectives_complete_without_a_rank_killed_while_they_wait(tmp_path):
    # W=7, n=3, s=1: rank 5 (a leaf under rank 1) is killed while the others wait for it in a control collective
    def victim_waits(out_dir):
        return (out_dir / "gather_victim").exists()

    run = launch("engine_worker.py", 7, ["--steps", "6", "--gathers", "3", "--gather-victim", "5", "--timeout", "10"],
                 tmp_path, actions=[(after(1.0, victim_waits), 5, signal.SIGKILL)])
    assert run.returncodes[5] == -signal.SIGKILL
    survivors = [r for r in range(7) if r != 5]
    assert all(run.returncodes[r] == 0 for r in survivors), run.outputs
    res = _results(run, survivors)
    for r, d in res.items():
        assert len(d["gathers"]) == 3, (r, d["error"])
        for k, g in enumerate(d["gathers"]):
            assert g["values"] == {str(q): {"rank": q, "k": k} for q in survivors}, (r, k, g)
            assert g["dead"] == [5], (r, k, g)  # every survivor agrees on who died, rank 6 too (told by the root)
    _assert_exact_and_identical(res)


def test_control_collectives_all_ranks(tmp_path):
    run = launch("engine_worker.py", 13, ["--n", "3", "--steps", "3", "--gathers", "4"], tmp_path)
    run.check()
    res = _results(run, range(13))
    for d in res.values():
        assert [g["values"] for g in d["gathers"]] == [{str(q): {"rank": q, "k": k} for q in range(13)}
                                                       for k in range(4)]
        assert all(g["dead"] == [] for g in d["gathers"])


def test_bad_frames_rejected(tmp_path):
    run = launch("frame_worker.py", 2, [], tmp_path, timeout=90)
    run.check()
    res = json.loads((tmp_path / "frames.json").read_text())
    assert "built a different CodedReduce plan" in res["plans"]
    assert "different CodedReduce plan (fingerprint" in res["fingerprint"]
    assert "UP frame for step 7" in res["step"]
    assert "sent 5" in res["length"] and "expected 4" in res["length"]
    assert "bad magic" in res["magic"]
    assert "ANNOUNCE frame from rank 1, which is not this rank's parent" in res["announce"]


# ---------------------------------------------------------------------------- the balanced layout
BALANCED = ["--layout", "balanced", "--dim", "3000", "--chunk-bytes", "1024"]  # 12 KB: several chunks per owner


@pytest.mark.parametrize("world,s,in_place", [(2, 1, False), (4, 1, True), (7, 2, True), (13, 1, True), (5, 0, False)])
def test_balanced_exact_under_random_delays(tmp_path, world, s, in_place):
    run = launch("engine_worker.py", world, [*BALANCED, "--s", str(s), "--steps", "12", "--jitter", "0.03",
                                             *(["--in-place"] if in_place else [])], tmp_path)
    run.check()
    _assert_exact_and_identical(_results(run, range(world)))


@pytest.mark.parametrize("sleeper", [0, 3])
def test_balanced_sleeping_rank_root_included_does_not_stop_the_others(tmp_path, sleeper):
    # W=7, s=1: groups {0,3,6} {1,4} {2,5}; the sleeper still serves its chunks while its compute sleeps
    run = launch("engine_worker.py", 7, [*BALANCED, "--steps", "60", "--compute", "0.05",
                                         "--sleep-once", f"{sleeper}:5:15"], tmp_path)
    run.check()
    res = _results(run, range(7))
    _assert_the_others_went_on(res, sleeper, 15)
    _assert_exact_and_identical(res)


def test_balanced_is_reproducible_whoever_arrives_first(tmp_path):
    # two runs with different random delays: the same bits (owners sum one member per group, in group order)
    thetas = []
    for seed in (1, 2):
        run = launch("engine_worker.py", 4, [*BALANCED, "--steps", "10", "--jitter", "0.05", "--jitter-seed",
                                             str(seed), "--in-place"], tmp_path / str(seed))
        run.check()
        res = _results(run, range(4))
        _assert_exact_and_identical(res)
        thetas.append(res[0]["theta"])
    assert thetas[0] == thetas[1]


def test_balanced_dead_rank_stops_every_rank_naming_it(tmp_path):
    run = launch("engine_worker.py", 7, [*BALANCED, "--steps", "400", "--compute", "0.05", "--timeout", "10"], tmp_path,
                 actions=[(training_started, 4, signal.SIGKILL)])
    res = _results(run, [r for r in range(7) if r != 4])
    for r, d in res.items():
        assert d["error"] is not None and "rank 4" in d["error"], f"rank {r}: {d['error']}"


@pytest.mark.parametrize("world,s,sleeper,segments", [(4, 1, 0, 0), (7, 2, 3, 0), (5, 0, -1, 0), (5, 0, -1, 4),
                                                      (4, 1, 0, 4)])
def test_balanced_gradient_handed_in_while_it_is_written(tmp_path, world, s, sleeper, segments):
    # begin / filled / finish, as the strategy's gradient hooks do in backward: ranges announced in random
    # order, chunks sent as they close; a sleeping rank gets results for chunks it is still writing. With
    # segments, s=0 (gloo's ring) all-reduces each as soon as it and those before it are written: every rank
    # writes different ranges in a different order, and the collectives must still match
    sleep = ["--sleep-once", f"{sleeper}:4:1.5"] if sleeper >= 0 else []
    run = launch("engine_worker.py", world, [*BALANCED, "--s", str(s), "--steps", "12", "--jitter", "0.03",
                                             "--parts", "7", "--segments", str(segments), *sleep], tmp_path)
    run.check()
    res = _results(run, range(world))
    _assert_exact_and_identical(res)
    if sleeper >= 0:  # the others reduced the step it was writing without it, and went on
        start, end = res[sleeper]["sleep"]
        for r in set(range(world)) - {sleeper}:
            assert res[r]["applied_at"][4] < end, f"rank {r} waited for rank {sleeper}'s half-written gradient"


@pytest.mark.parametrize("layout,s", [("tree", 1), ("balanced", 1), ("balanced", 0)])
def test_closed_reducers_leave_no_process_groups_behind(tmp_path, layout, s):
    """A reducer's link groups (and a group it owns) are destroyed once it and its neighbours closed: opening
    and closing reducers one after another (as every switch of stragglers="auto" does) keeps the threads gloo
    runs per group at one reducer's worth. Before, each reducer left them all (W=13, 26 of them: 835 threads)."""
    world = 5
    run = launch("engine_worker.py", world, ["--layout", layout, "--s", str(s), "--steps", "2", "--reopen", "6"],
                 tmp_path)
    run.check()
    for r, d in _results(run, range(world)).items():
        reopened = d["reopened"]
        assert all(x["late"] == [] for x in reopened), reopened
        assert all(abs(x["sum"] - d["batch"]) < 1e-3 for x in reopened), f"rank {r}: not the global batch: {reopened}"
        counts = [x["threads"] for x in reopened]
        # (one reducer's threads are a few per link; a leak adds them again at every reopening)
        assert counts[-1] <= counts[1] + 2, f"rank {r}: threads after each closed reducer: {counts}"
