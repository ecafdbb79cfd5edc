"""``lightning_codedreduce.horovod``: Horovod's PyTorch API over the coded reduce.

* every supported call next to ``horovod.torch``'s, in the same processes (``horovod_api_worker.py``);
* Horovod's MNIST example structure (``examples/horovod_mnist.py``) run with ``import horovod.torch`` and
  with ours, under ``horovodrun --gloo``, ``torchrun``'s variables and ``mpirun``: the same parameters;
* a SIGKILL of a leaf during the example: the survivors end with Horovod's parameters (the dead rank's
  data is decoded from the others) and the metric ``allreduce`` after the kill returns on each of them;
* the sampler's allocation against torch's ``DistributedSampler`` (no processes), and every refused option.
"""
import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lightning_codedreduce.horovod as hvd
from lightning_codedreduce.plan import CodedReducePlan
from procs import PY, ROOT, clean_env, free_port, horovodrun_exe, mpi_launcher, mpirun_env, run_all

EXAMPLE = str(ROOT / "examples" / "horovod_mnist.py")
WORLD = 4
# 6 full steps per epoch at 64 samples per rank; 3 epochs (the kill comes in the second)
EXAMPLE_ARGS = ["--epochs", "3", "--train-size", str(WORLD * 64 * 6), "--test-size", "512", "--log-interval", "1"]


def _horovodrun(args: list[str], out: Path, env: dict | None = None, timeout: float = 240):
    exe = horovodrun_exe()
    cmd = [exe, "-np", str(WORLD), "-H", f"localhost:{WORLD}", "--gloo", PY, *args]
    group = run_all([(cmd, clean_env(PATH=f"{Path(PY).parent}:{clean_env()['PATH']}", **(env or {})))], out, timeout)
    group.check()
    return group


def _torchrun_env(args: list[str], out: Path, env: dict | None = None, actions=(), timeout: float = 240):
    """The W processes with the variables torchrun sets (what ``torchrun --standalone`` would start)."""
    port = str(free_port())
    commands = [([PY, *args], clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(WORLD), RANK=str(r),
                                         LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(WORLD), **(env or {})))
                for r in range(WORLD)]
    return run_all(commands, out, timeout, actions)


def _params(out: Path, api: str, rank: int) -> torch.Tensor:
    data = json.loads((out / f"{api}.rank{rank}.json").read_text())
    return torch.cat([torch.tensor(p, dtype=torch.float64) for p in data["params"]])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------- every call against horovod.torch
@pytest.mark.timeout(300)
def test_every_supported_call_matches_horovod(tmp_path):
    _horovodrun([str(ROOT / "tests" / "horovod_api_worker.py"), "--out", str(tmp_path)], tmp_path,
                env={"PYTHONPATH": str(ROOT)})
    for rank in range(WORLD):
        res = json.loads((tmp_path / f"api.rank{rank}.json").read_text())
        for name, (ours, theirs) in res.pop("identity").items():
            assert ours == theirs, (name, ours, theirs)
        assert all(count >= 1 for count in res.pop("early_buckets"))  # gradients handed in from the hooks
        assert "sparse_as_dense=True" in res.pop("sparse_refused")
        skipped = res.pop("skipped_by_slow_rank")
        assert skipped >= 1 if rank == 2 else skipped >= 0, (rank, skipped)
        joined = res.pop("join")
        assert 0 <= joined[0] < WORLD and 0 <= joined[1] < WORLD
        res.pop("rank")
        expected = {"allreduce_Average", "allreduce_Sum", "allreduce_Min", "allreduce_Max", "allreduce_Product",
                    "allreduce_default", "allreduce_average_false", "allreduce_scaled", "allreduce_scalar_metric",
                    "allreduce_", "allgather", "allgather_object", "broadcast", "broadcast_", "broadcast_object",
                    "broadcast_parameters_state_dict", "broadcast_parameters_named", "broadcast_optimizer_state_adam",
                    "broadcast_optimizer_state_fresh_sgd", "optimizer_average", "optimizer_sum",
                    "optimizer_clip_synchronize", "optimizer_backward_passes_2", "optimizer_predivide_groups",
                    "optimizer_clip_edit_slow_rank", "optimizer_sparse_as_dense"}
        assert set(res) == expected
        for name, difference in res.items():  # float64 throughout: equal to rounding
            assert difference <= 1e-12, (rank, name, difference)


# ---------------------------------------------------------------- the example, both ways, three launchers
@pytest.fixture(scope="module")
def horovod_runs(tmp_path_factory):
    """Horovod's own runs of the example (float64 and float32): the references."""
    out = tmp_path_factory.mktemp("horovod_example")
    for dtype in ("float64", "float32"):
        _horovodrun([EXAMPLE, "--api", "horovod", "--dtype", dtype, *EXAMPLE_ARGS, "--out", str(out / dtype)],
                    out / f"logs_{dtype}")
    return out


def _assert_same_parameters(ours_dir: Path, reference_dir: Path, tolerance: float, ranks=range(WORLD)):
    reference = _params(reference_dir, "horovod", 0)
    for rank in ranks:
        assert _relative(_params(ours_dir, "codedreduce", rank), reference) <= tolerance, rank


@pytest.mark.timeout(600)
def test_example_both_ways_under_horovodrun(horovod_runs, tmp_path):
    """float32 with the balanced layout (fractional repetition: plain sums) to 1e-5; float64 with the default
    tree (whose code has coefficients 2 and -1) to 1e-9."""
    _horovodrun([EXAMPLE, "--dtype", "float32", *EXAMPLE_ARGS, "--out", str(tmp_path / "f32")], tmp_path / "l32",
                env={"CODEDREDUCE_LAYOUT": "balanced"})
    _assert_same_parameters(tmp_path / "f32", horovod_runs / "float32", 1e-5)
    _horovodrun([EXAMPLE, "--dtype", "float64", *EXAMPLE_ARGS, "--out", str(tmp_path / "f64")], tmp_path / "l64")
    _assert_same_parameters(tmp_path / "f64", horovod_runs / "float64", 1e-9)


@pytest.mark.timeout(600)
def test_example_under_torchrun_and_mpirun(horovod_runs, tmp_path):
    group = _torchrun_env([EXAMPLE, "--dtype", "float64", *EXAMPLE_ARGS, "--out", str(tmp_path / "torchrun")],
                          tmp_path / "logs_torchrun")
    group.check()
    _assert_same_parameters(tmp_path / "torchrun", horovod_runs / "float64", 1e-9)
    mpirun, python = mpi_launcher()
    cmd = [mpirun, "-np", str(WORLD), "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", python, EXAMPLE,
           "--dtype", "float64", *EXAMPLE_ARGS, "--out", str(tmp_path / "mpirun")]
    run_all([(cmd, mpirun_env())], tmp_path / "logs_mpirun", 240).check()
    _assert_same_parameters(tmp_path / "mpirun", horovod_runs / "float64", 1e-9)


@pytest.mark.timeout(600)
def test_changing_only_the_import(horovod_runs, tmp_path):
    """The script with torch's sampler and only its import changed: with stragglers=0 (each rank its own batch,
    an uncoded sum) Horovod's parameters; with stragglers=1 every rank stops with the fix (use hvd.DistributedSampler)."""
    args = [EXAMPLE, "--dtype", "float64", *EXAMPLE_ARGS, "--torch-sampler"]
    _torchrun_env([*args, "--out", str(tmp_path / "s0")], tmp_path / "l0", env={"CODEDREDUCE_STRAGGLERS": "0"}).check()
    _assert_same_parameters(tmp_path / "s0", horovod_runs / "float64", 1e-9)
    group = _torchrun_env([*args, "--out", str(tmp_path / "s1")], tmp_path / "l1", env={"CODEDREDUCE_TIMEOUT": "10"})
    assert all(rc != 0 for rc in group.returncodes)
    assert "needs the training data from hvd.DistributedSampler" in group.outputs[0]


@pytest.mark.timeout(600)
def test_sigkill_of_a_leaf_during_the_example(horovod_runs, tmp_path):
    """Rank 3 (a leaf of the W=4 tree, stragglers=1) is SIGKILLed when rank 0 starts the second epoch. The
    survivors finish all three epochs with Horovod's parameters (every step's global batch, the dead rank's
    share included, is decoded from the others) and their metric allreduces after the kill return."""
    victim = 3

    def second_epoch(out_dir: Path) -> bool:
        log = out_dir / "proc0.log"
        return log.exists() and "Train Epoch: 2" in log.read_text()

    group = _torchrun_env([EXAMPLE, "--dtype", "float64", *EXAMPLE_ARGS, "--out", str(tmp_path / "res")], tmp_path,
                          env={"CODEDREDUCE_TIMEOUT": "10"}, actions=[(second_epoch, victim, signal.SIGKILL)])
    assert group.returncodes[victim] == -signal.SIGKILL, group.returncodes
    survivors = [r for r in range(WORLD) if r != victim]
    group.check(survivors)
    assert not (tmp_path / "res" / f"codedreduce.rank{victim}.json").exists()
    _assert_same_parameters(tmp_path / "res", horovod_runs / "float64", 1e-9, survivors)
    for rank in survivors:
        metrics = json.loads((tmp_path / "res" / f"codedreduce.rank{rank}.json").read_text())["metrics"]
        assert len(metrics) == 3 and all(0.0 <= acc <= 1.0 for _, acc in metrics)


@pytest.mark.timeout(600)
def test_a_slow_rank_skips_steps_the_others_reduced(horovod_runs, tmp_path):
    """Rank 2's compute is 30x slower: the others reduce without it, and it applies those steps' results
    instead of computing them (catch-up). Every rank still ends with Horovod's parameters."""
    slow = 2
    group = _torchrun_env([EXAMPLE, "--dtype", "float64", *EXAMPLE_ARGS, "--slow-rank", str(slow), "--slow-factor", "30",
                           "--out", str(tmp_path / "res")], tmp_path)
    group.check()
    _assert_same_parameters(tmp_path / "res", horovod_runs / "float64", 1e-9)
    skipped = [json.loads((tmp_path / "res" / f"codedreduce.rank{r}.json").read_text())["skipped_steps"]
               for r in range(WORLD)]
    assert skipped[slow] >= 1, skipped


# ---------------------------------------------------------------- the sampler (no processes)
PLANS = [CodedReducePlan(4, 3, 1), CodedReducePlan(7, 3, 1), CodedReducePlan(5, 3, 1), CodedReducePlan(13, 3, 1),
         CodedReducePlan(7, 3, 1, layout="balanced"), CodedReducePlan(6, 3, 2, layout="balanced"),
         CodedReducePlan(4, 3, 0), CodedReducePlan(7, 3, 1, coded_self="root")]


def _fractional(plan: CodedReducePlan) -> bool:
    return all(len({sh.weight for sh in shards}) == 1 for shards in plan.allocation(plan.world_size))


@settings(max_examples=40, deadline=None)
@given(plan=st.sampled_from(PLANS), batch=st.integers(1, 9), steps=st.integers(1, 4), extra=st.integers(0, 30),
       shuffle=st.booleans(), drop_last=st.booleans(), epoch=st.integers(0, 2))
def test_sampler_messages_are_the_coded_share_of_ddps_batches(plan, batch, steps, extra, shuffle, drop_last, epoch):
    """Each rank's stream, cut into loader batches, weighted by ``pieces()``, gives ``sum_u w_u mean_u`` per step
    (the plan's code over the W units of DDP's global batch), and ``sum_u mean_u / W`` is the average of the
    per-rank means that torch's ``DistributedSampler`` would give: the same global batch, the same update."""
    world = plan.world_size
    n = world * batch * steps + extra
    samplers = []
    for rank in range(world):
        try:
            s = hvd.DistributedSampler(range(n), shuffle=shuffle, seed=3, drop_last=drop_last, batch_size=batch,
                                       plan=plan, rank=rank)
        except ValueError as err:  # a short last step under a code with mixed weights: refused, with the fix
            assert not _fractional(plan) and "short" in str(err)
            return
        s.set_epoch(epoch)
        samplers.append(s)
    values = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    # DDP: torch's sampler per rank, cut into batches of ``batch``; per step the average of the ranks' means
    ddp = []
    for q in range(world):
        theirs = torch.utils.data.distributed.DistributedSampler(range(n), num_replicas=world, rank=q, shuffle=shuffle,
                                                                 seed=3, drop_last=drop_last)
        theirs.set_epoch(epoch)
        idx = list(theirs)
        ddp.append([values[idx[i:i + batch]].mean(0) for i in range(0, len(idx), batch)])
    ddp_steps = [sum(ddp[q][t] for q in range(world)) / world for t in range(len(ddp[0]))]
    shards = plan.allocation(world)
    unit_means: list[dict[int, torch.Tensor]] = [{} for _ in ddp_steps]  # per step: unit -> its mean
    for r, s in enumerate(samplers):
        assert s.steps == len(ddp_steps)
        stream = list(s)
        batches = [stream[i:i + batch] for i in range(0, len(stream), batch)]
        pieces = s.pieces()
        assert len(batches) == len(pieces) and len(stream) == len(s)
        assert [p.step for p in pieces if p.closes_step] == list(range(s.steps))
        message = [torch.zeros(3, dtype=torch.float64) for _ in ddp_steps]
        for b, piece in zip(batches, pieces):
            message[piece.step] += piece.scale * values[b].mean(0)
        offset = 0
        for t in range(s.steps):
            m = s.step_size(t)
            for j, (u, _) in enumerate(s.units):
                mean = values[stream[offset + j * m: offset + (j + 1) * m]].mean(0)
                if u in unit_means[t]:  # every rank that computes a unit computes the same samples
                    torch.testing.assert_close(unit_means[t][u], mean)
                unit_means[t][u] = mean
            offset += m * len(s.units)
            expected = sum(sh.weight * unit_means[t][u] for sh in shards[r] for u in range(sh.start, sh.stop))
            torch.testing.assert_close(message[t], expected)
    for t, means in enumerate(unit_means):
        assert sorted(means) == list(range(world))
        torch.testing.assert_close(sum(means.values()) / world, ddp_steps[t])


def test_sampler_refuses_what_it_cannot_allocate():
    plan = CodedReducePlan(4, 3, 1)
    with pytest.raises(TypeError, match="batch_size"):
        hvd.DistributedSampler(range(64), plan=plan, rank=0)
    with pytest.raises(ValueError, match="num_replicas=3.*all 4 ranks"):
        hvd.DistributedSampler(range(64), num_replicas=3, batch_size=4, plan=plan, rank=0)
    with pytest.raises(ValueError, match=r"last step of an epoch is short \(17 samples per rank.*ranks \[1, 2, 3\]"):
        hvd.DistributedSampler(range(68), batch_size=4, plan=plan, rank=0)
    hvd.DistributedSampler(range(68), batch_size=4, plan=CodedReducePlan(4, 3, 1, layout="balanced"), rank=0)


# ---------------------------------------------------------------- refused options (before any process group)
def _optimizer():
    return torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)


@pytest.mark.parametrize("call,error,match", [
    (lambda: hvd.init(comm=[0, 1]), ValueError, r"comm=\.\.\.\) selects an MPI communicator"),
    (lambda: hvd.init(process_sets=[]), ValueError, "process sets are not supported"),
    (lambda: hvd.init(layout="auto"), ValueError, "layout must be 'tree' or 'balanced'"),
    (lambda: hvd.DistributedOptimizer(_optimizer(), compression=hvd.Compression.fp16), ValueError,
     "compression='fp16' is not supported.*hvd.Compression.none"),
    (lambda: hvd.DistributedOptimizer(_optimizer(), op=hvd.Adasum), ValueError, "Adasum is not supported"),
    (lambda: hvd.DistributedOptimizer(_optimizer(), op=hvd.Max), ValueError, "Max is not supported for gradients"),
    (lambda: hvd.DistributedOptimizer(_optimizer(), process_set=object()), ValueError, "process sets are not supported"),
    (lambda: hvd.DistributedOptimizer(_optimizer(), op=hvd.Sum, gradient_predivide_factor=2.0), ValueError,
     "gradient_predivide_factor not supported with op != Average"),
    (lambda: hvd.DistributedOptimizer(_optimizer(), backward_passes_per_step=0), ValueError,
     "backward_passes_per_step must be > 0"),
    (lambda: hvd.allreduce(torch.ones(2), op=hvd.Adasum), ValueError, "Adasum is not supported"),
    (lambda: hvd.allreduce(torch.ones(2), average=True, op=hvd.Sum), ValueError, "cannot both be given"),
    (lambda: hvd.allreduce(torch.ones(2), compression=hvd.Compression.fp16), ValueError, "compression"),
    (lambda: hvd.allgather(torch.ones(2), process_set=object()), ValueError, "process sets are not supported"),
    (lambda: hvd.rank(), ValueError, r"use hvd.init\(\)"),
    (lambda: hvd.SyncBatchNorm, AttributeError, "SyncBatchNorm needs every rank"),
    (lambda: hvd.allreduce_async, AttributeError, "asynchronous handles"),
    (lambda: hvd.ProcessSet, AttributeError, "process sets are not supported"),
    (lambda: hvd.elastic, AttributeError, "elastic Horovod is not supported"),
])
def test_refused_options_say_why(call, error, match):
    with pytest.raises(error, match=match):
        call()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
