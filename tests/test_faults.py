"""Dead ranks under Lightning: ``SIGKILL`` of a leaf during ``trainer.fit``.

The kill is triggered by training progress, not wall time: the victim writes ``victim_at_step`` (at
step 2, or at the end of epoch 0) and then sleeps; the test kills it when the file appears (and writes
``killed``). See ``tests/cluster_worker.py`` (``_Fault``) for where the others are at that moment.

* s=1 (W=4, branching 2: rank 0's children 1 and 2 hold the same data, rank 3 is rank 1's child), the
  victim killed mid-epoch, or killed or stopped while the others wait in the epoch-end checkpoint's
  collectives (which travel the reduce tree and wait only for live ranks): the survivors 0, 1, 3 train all 3 epochs with the exact gradient (identical parameters, equal to a
  single-process reference), ``ModelCheckpoint`` saves at every epoch end and ``last.ckpt``,
  ``trainer.save_checkpoint`` after fit works, every rank exits 0, and every survivor's
  ``StragglerMonitor`` file records the death (rank 3 is not linked to rank 2: it learns through the tree).
* s=0 (W=3): nobody can do without rank 2, so the survivors stop within the reducer's timeout with
  ``CodedReduceError`` naming rank 2, and exit non-zero.
"""
import csv
import signal
import time

import pytest
import torch

from lit_common import reference_train
from procs import PY, ROOT, clean_env, free_port, run_all

pytestmark = pytest.mark.timeout(240)

WORKER = str(ROOT / "tests" / "cluster_worker.py")
TIMEOUT = 5.0  # CodedReduceStrategy(timeout=...): seconds of silence before a peer counts as dead


def _launch(tmp_path, world, stragglers, victim, epochs=3, kill_at="step", sig=signal.SIGKILL, delay=0.0):
    port = free_port()
    cmd = [PY, WORKER, "--scenarios", "fault", "--devices", str(world), "--branching", "2",
           "--stragglers", str(stragglers), "--victim", str(victim), "--kill-step", "2", "--timeout", str(TIMEOUT),
           "--epochs", str(epochs), "--kill-at", kill_at, "--out", str(tmp_path)]
    commands = [(cmd, clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(r),
                                LOCAL_RANK=str(r))) for r in range(world)]

    seen = []

    def victim_reached_step(out):  # then ``delay`` seconds later
        if not seen and (out / "victim_at_step").exists():
            seen.append(time.monotonic())
        if seen and time.monotonic() - seen[0] >= delay:
            (out / "killed").write_text(repr(time.time()))
            return True
        return False

    def survivors_done(out):  # a stopped victim is killed once the others have finished
        return all((out / f"fault.rank{r}.json").exists() for r in range(world) if r != victim)

    actions = [(victim_reached_step, victim, sig)]
    if sig != signal.SIGKILL:
        actions.append((survivors_done, victim, signal.SIGKILL))
    group = run_all(commands, tmp_path, timeout=200, actions=actions)
    assert victim in group.actions_done, "the victim never reached the kill step:\n" + group.outputs[victim][-3000:]
    return group


@pytest.mark.parametrize("kill_at,sig", [("step", signal.SIGKILL), ("epoch_end", signal.SIGKILL),
                                         ("epoch_end", signal.SIGSTOP), ("validation", signal.SIGKILL)])
def test_dead_leaf_tolerated_s1(tmp_path, kill_at, sig):
    """``step``: the death is agreed mid-epoch; ``epoch_end``: the survivors are already waiting in
    ``ModelCheckpoint``'s collectives when the victim dies (or stops: then it counts as dead after the
    timeout); ``validation``: in validation's ``sync_dist`` and ``EarlyStopping``'s decision."""
    world, victim, survivors = 4, 2, [0, 1, 3]
    group = _launch(tmp_path, world, stragglers=1, victim=victim, kill_at=kill_at, sig=sig)
    res = _check_survivors(group, tmp_path, victim, survivors)
    if kill_at == "validation":  # synchronised over the survivors: the same value everywhere
        assert all(d["metrics"]["val_loss"] == res[0]["metrics"]["val_loss"] for d in res)
    # the monitor recorded the death on every survivor, rank 3 included (told through the tree)
    for r in survivors:
        with open(tmp_path / "monitor" / f"rank{r}.csv") as f:
            dead = [row["dead"] for row in csv.DictReader(f) if row["dead"]]
        assert dead == [str(victim)], f"rank {r}'s monitor file: dead column {dead}"
    summary = (tmp_path / "monitor" / "summary.txt").read_text()
    assert "dead ranks tolerated: [2]" in summary


@pytest.mark.parametrize("delay", [0.0, 0.4, 0.9, 1.5, 2.5])
def test_sigkill_leaf_at_arbitrary_moments_s1(tmp_path, delay):
    """The victim does not wait to be killed: it trains on (with validation, checkpoints and early stopping)
    and is killed ``delay`` seconds after step 1, wherever it is then: in a step, in validation, in a
    checkpoint's collectives (it is never let past the end of training: there it waits)."""
    world, victim, survivors = 4, 2, [0, 1, 3]
    group = _launch(tmp_path, world, stragglers=1, victim=victim, kill_at="anywhere", delay=delay)
    _check_survivors(group, tmp_path, victim, survivors)
    # the summary names the death, even one found only at the end of training (no step row saw it)
    assert f"dead ranks tolerated: [{victim}]" in (tmp_path / "monitor" / "summary.txt").read_text()


def _check_survivors(group, tmp_path, victim, survivors) -> list[dict]:
    """Every survivor exits 0 after every epoch, with identical parameters equal to the reference, agreeing on
    who died; checkpoints at every epoch end and after fit."""
    assert group.returncodes[victim] == -signal.SIGKILL
    group.check(survivors)
    res = [group.result("fault", r) for r in survivors]
    assert all(d["error_type"] is None for d in res)
    assert all(d["epoch"] == 3 and d["global_step"] == 15 for d in res), [(d["epoch"], d["global_step"]) for d in res]
    assert len({d["hash"] for d in res}) == 1, "survivors ended with different parameters"
    assert all(d["batches"] == res[0]["batches"] for d in res)
    ref = reference_train(res[0]["init"], [[b[2]] for b in res[0]["batches"]], lr=0.1)
    torch.testing.assert_close(torch.tensor(res[0]["params"]), ref, rtol=1e-5, atol=1e-6)
    # every survivor agrees that rank 2 died (and so keeps Lightning's collectives after fit away from it)
    assert all(d["known_dead"] == [victim] for d in res)
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert ckpts == ["epoch=2-step=15.ckpt", "last.ckpt"], ckpts
    final = torch.load(tmp_path / "final.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 15 and final["epoch"] == 3
    params = torch.cat([v.reshape(-1).float() for k, v in final["state_dict"].items()])
    torch.testing.assert_close(params, torch.tensor(res[0]["params"]), rtol=0, atol=0)
    return res


@pytest.mark.parametrize("kill_at", ["step", "epoch_end"])
def test_sigkill_leaf_stops_everyone_s0(tmp_path, kill_at):
    world, victim, survivors = 3, 2, [0, 1]
    group = _launch(tmp_path, world, stragglers=0, victim=victim, kill_at=kill_at)
    killed = group.actions_done[victim]
    assert group.returncodes[victim] == -signal.SIGKILL
    for r in survivors:
        assert group.returncodes[r] not in (0, None), f"rank {r} exited {group.returncodes[r]}"
        d = group.result("fault", r)
        assert d["error_type"] == "CodedReduceError" and "rank 2" in d["error"], d
        # the error came within the configured timeout, and the process exited soon after (no hang at teardown)
        assert d["t_error"] - killed < TIMEOUT + 2, d["t_error"] - killed
        assert group.exit_times[r] - killed < 2 * TIMEOUT + 10, group.exit_times[r] - killed
