"""Tests of ``CodedReduceStrategy`` with real processes over gloo.

The Lightning checks of one world size run as one launched job (``tests/lightning_worker.py`` runs
its scenarios one after another in the same processes: one Lightning import, one process group);
each test then checks its scenario's per-rank results. Equivalence is against a single-process
float32 SGD run on the same global batches (``lit_common.reference_train``).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_common import reference_train
from mp import ROOT, launch

pytestmark = pytest.mark.timeout(300)

WORKER = "lightning_worker.py"
RTOL, ATOL = 1e-5, 1e-6

TWO_RANK_SCENARIOS = [
    "equiv", "delay", "accumulate", "clip", "bf16", "accumulate_streamed", "clip_streamed", "bf16_streamed", "manual", "sched", "val", "max_epochs", "fit_twice", "fit_same_trainer",
    "sync_warn", "buffers", "resume", "bad_iterable", "bad_batch_sampler", "bad_small_batch", "bad_devices", "crash",
]


# ---------------------------------------------------------------- helpers
def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run_process(cmd, out_dir: Path, timeout: float, env=None) -> str:
    """Run one launcher process (it starts the ranks itself); its whole session is stopped on timeout or exit."""
    from lightning_codedreduce._procs import LaunchTimeout, run

    try:
        res = run([(cmd, env or _env())], out_dir, timeout, cwd=ROOT, log_names=["launcher.log"], term_grace=15.0)
    except LaunchTimeout as err:
        pytest.fail(str(err))
    text = res.output(0)
    assert res.returncodes[0] == 0, f"{cmd} failed (rc {res.returncodes[0]}):\n{text[-4000:]}"
    return text


def _load(out: Path, name: str, world: int) -> list[dict]:
    res = []
    for r in range(world):
        path = out / f"{name}.rank{r}.json"
        if not path.exists():
            crashes = "\n".join(p.read_text()[-3000:] for p in out.glob("*_crash.rank*.json"))
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("*.log")))
            pytest.fail(f"no result {path.name}; crashes:\n{crashes}\n{logs}")
        res.append(json.loads(path.read_text()))
    return res


def _steps(batches, accumulate=1):
    """Group the recorded (epoch, batch_idx, global batch) into optimizer steps as Lightning does."""
    steps = []
    for _epoch, idx, batch in batches:
        if idx % accumulate == 0:
            steps.append([])
        steps[-1].append(batch)
    return steps


def _assert_identical(res):
    hashes = {d["hash"] for d in res}
    assert len(hashes) == 1, f"ranks ended with different parameters: {[d['hash'] for d in res]}"
    for d in res[1:]:
        assert d["init"] == res[0]["init"], "ranks started from different parameters (no broadcast from rank 0?)"
        assert d["batches"] == res[0]["batches"], "ranks disagree on the global batches"


def _assert_reference(res, *, lr, momentum=0.0, clip=None, step_lr=None, accumulate=1, n=40, bf16=False,
                      rtol=RTOL, atol=ATOL):
    d = res[0]
    ref = reference_train(d["init"], _steps(d["batches"], accumulate), lr=lr, momentum=momentum, clip=clip,
                          step_lr=step_lr, n=n, bf16=bf16, accumulate=accumulate)
    got = torch.tensor(d["params"])
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    return ref


def _launch(tmp: Path, world: int, scenarios, extra=(), timeout=240, actions=()):
    return launch(WORKER, world, ["--scenarios", ",".join(scenarios), *extra], tmp, timeout=timeout, actions=actions)


# ---------------------------------------------------------------- in-process: registry and arguments
def test_registration_and_arguments():
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import StrategyRegistry

    import lightning_codedreduce
    from lightning_codedreduce import CodedReduceStrategy

    assert "codedreduce" in StrategyRegistry and "codedreduce_fork" in StrategyRegistry
    assert StrategyRegistry["codedreduce_fork"]["init_params"] == {"start_method": "fork"}
    lightning_codedreduce.register_strategies()  # again: no "already present" error
    CodedReduceStrategy.register_strategies(StrategyRegistry)

    trainer = pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is CodedReduceStrategy and trainer.strategy._start_method == "popen"
    assert trainer.strategy.strategy_name == "codedreduce"
    strategy = CodedReduceStrategy(branching=4, stragglers=1, global_batch_size=64, timeout=5.0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=3, logger=False)
    assert trainer.strategy is strategy and strategy.global_batch_size == 64 and strategy.plan is None

    with pytest.raises(ValueError, match="stragglers=3 must be smaller than branching=3"):
        CodedReduceStrategy(branching=3, stragglers=3)
    with pytest.raises(ValueError, match="global_batch_size must be a positive integer"):
        CodedReduceStrategy(global_batch_size=0)
    with pytest.raises(ValueError, match="never wraps the model in DDP"):
        CodedReduceStrategy(ddp_comm_hook=lambda *a: None)
    for bad in (-1, float("nan"), "25", True):
        with pytest.raises(ValueError, match="bucket_cap_mb must be a number of MiB >= 0"):
            CodedReduceStrategy(bucket_cap_mb=bad)
    with pytest.warns(UserWarning, match="ignores the DistributedDataParallel options"):
        CodedReduceStrategy(find_unused_parameters=True)


def test_import_order_and_light_import():
    """The plan/engine do not import Lightning; registration works whichever is imported first."""
    code = (
        "import sys\n"
        "import lightning_codedreduce, lightning_codedreduce.engine\n"
        "assert 'pytorch_lightning' not in sys.modules\n"
        "from pytorch_lightning.strategies import StrategyRegistry\n"
        "assert 'codedreduce' in StrategyRegistry and 'codedreduce_fork' in StrategyRegistry\n"
    )
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=120)


def _function(attribute):
    """The function behind a class attribute (method, classmethod, staticmethod, property), else None."""
    if isinstance(attribute, property):
        return attribute.fget
    attribute = getattr(attribute, "__func__", attribute)
    return attribute if callable(attribute) else None


def test_one_strategy_class_composed_of_collaborators():
    """No mixins: along the strategy's MRO no name is defined by two of the package's classes, and every
    hook it overrides is marked ``@override`` (and delegates to a collaborator)."""
    from lightning_codedreduce.strategy import strategy_class
    from lit_common import NAMESPACE

    cls = strategy_class(NAMESPACE)
    ours = [k for k in cls.__mro__ if k.__module__.startswith("lightning_codedreduce")]
    defined: dict[str, list[str]] = {}
    for klass in ours:
        for name in vars(klass):
            if not (name.startswith("__") and name.endswith("__")):
                defined.setdefault(name, []).append(klass.__qualname__)
    twice = {name: owners for name, owners in defined.items() if len(owners) > 1}
    assert not twice, f"defined more than once along {cls.__qualname__}'s MRO: {twice}"
    assert len(ours) == 1, [k.__qualname__ for k in ours]

    bases = cls.__mro__[1:]
    unmarked = [name for name, attribute in vars(cls).items()
                if name != "__init__" and _function(attribute) is not None and any(name in vars(b) for b in bases)
                and not getattr(_function(attribute), "__override__", False)]
    assert not unmarked, f"hooks overridden without @override: {unmarked}"


def test_strategy_uses_only_the_reducers_public_api():
    """The strategy package never reads the engine's private state (``reducer._...``)."""
    import re

    package = ROOT / "lightning_codedreduce" / "strategy"
    private = {p.name: re.findall(r"reducer\._\w+", p.read_text()) for p in package.glob("*.py")}
    assert not {k: v for k, v in private.items() if v}, private


# ---------------------------------------------------------------- two ranks: every feature, one job
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    run = _launch(out, 2, TWO_RANK_SCENARIOS, ["--delay", "0.1", "--delay-ranks", "1"], timeout=280)
    return run, out


def test_two_ranks_job_exits_cleanly(two_ranks):
    run, _ = two_ranks
    run.check()


def test_equivalence_two_ranks(two_ranks):
    res = _load(two_ranks[1], "equiv", 2)
    _assert_identical(res)
    _assert_reference(res, lr=0.1)
    assert res[0]["global_step"] == 6 and len(res[0]["records"]) == 6  # max_steps
    assert res[0]["global_batch"] == 8 and res[0]["per_rank"] == 4  # batch_size=4 per rank, as DDP


def test_equivalence_two_ranks_delayed(two_ranks):
    res = _load(two_ranks[1], "delay", 2)
    _assert_identical(res)
    _assert_reference(res, lr=0.1)
    assert min(r["compute_s"] for r in res[1]["records"] if r["compute_s"] is not None) >= 0.1


def _streamed(res, name):
    """``*_streamed``: the balanced layout took every step's gradient bucket by bucket during backward."""
    if name.endswith("_streamed"):
        assert all(r["early_buckets"] > 0 for rank in res for r in rank["records"] if not r["skipped"])


@pytest.mark.parametrize("name", ["accumulate", "accumulate_streamed"])
def test_gradient_accumulation(two_ranks, name):
    res = _load(two_ranks[1], name, 2)
    _assert_identical(res)
    # 5 batches per epoch, accumulate 2: steps [0,1] [2,3] [4] | [0,1] -> 4 optimizer steps, 7 batches
    assert res[0]["global_step"] == 4 and len(res[0]["batches"]) == 7 and len(res[0]["records"]) == 4
    _assert_reference(res, lr=0.1, accumulate=2)
    _streamed(res, name)


@pytest.mark.parametrize("name", ["clip", "clip_streamed"])
def test_gradient_clipping(two_ranks, name):
    res = _load(two_ranks[1], name, 2)
    _assert_identical(res)
    ref = _assert_reference(res, lr=0.1, momentum=0.9, clip=0.05)
    unclipped = reference_train(res[0]["init"], _steps(res[0]["batches"]), lr=0.1, momentum=0.9)
    assert (unclipped - ref).abs().max() > 1e-2  # the clip was active
    _streamed(res, name)


@pytest.mark.parametrize("name", ["bf16", "bf16_streamed"])
def test_bf16_mixed_precision(two_ranks, name):
    res = _load(two_ranks[1], name, 2)
    _assert_identical(res)
    _assert_reference(res, lr=0.1, bf16=True, rtol=1e-2, atol=2e-3)
    _streamed(res, name)


def test_manual_optimization(two_ranks):
    res = _load(two_ranks[1], "manual", 2)
    _assert_identical(res)
    assert res[0]["global_step"] == 6 and len(res[0]["records"]) == 6
    _assert_reference(res, lr=0.1, step_lr=(2, 0.5))


def test_lr_scheduler(two_ranks):
    res = _load(two_ranks[1], "sched", 2)
    _assert_identical(res)
    _assert_reference(res, lr=0.2, momentum=0.5, step_lr=(2, 0.5))


def test_validation_and_logging(two_ranks):
    res = _load(two_ranks[1], "val", 2)
    _assert_identical(res)
    _assert_reference(res, lr=0.1)
    for d in res:
        assert d["val_sampler"] == "DistributedSampler"  # validation keeps Lightning's sampler
        assert d["metrics"]["val_count"] == 10.0  # every validation sample seen once over the ranks
        assert d["metrics"]["val_loss"] == res[0]["metrics"]["val_loss"]  # sync_dist in validation
        assert "train_loss" in d["metrics"]
    after = _load(two_ranks[1], "val_validate", 2)
    for d in after:
        assert d["hash"] == res[0]["hash"] and d["val_sampler"] == "DistributedSampler"
        assert d["metrics"]["val_count"] == 10.0 and d["metrics"]["val_loss"] == after[0]["metrics"]["val_loss"]


def test_max_epochs(two_ranks):
    res = _load(two_ranks[1], "max_epochs", 2)
    _assert_identical(res)
    assert res[0]["global_step"] == 10 and res[0]["epoch"] == 2  # 2 epochs of 5 steps
    assert [b[:2] for b in res[0]["batches"]] == [[e, i] for e in range(2) for i in range(5)]
    assert res[0]["batches"][0][2] != res[0]["batches"][5][2]  # a new permutation each epoch
    _assert_reference(res, lr=0.1)


def test_fit_twice(two_ranks):
    first = _load(two_ranks[1], "fit_twice_first", 2)
    res = _load(two_ranks[1], "fit_twice", 2)
    _assert_identical(first)
    _assert_identical(res)
    assert len(res[0]["batches"]) == 6 and res[0]["global_step"] == 3
    assert [r["step"] for r in res[0]["records"]] == [0, 1, 2]  # a new Trainer, a new strategy
    _assert_reference(res, lr=0.1)  # plain SGD: the two fits are one 6-step run
    # the same Trainer fitted again with a higher max_steps continues (Lightning starts a new epoch)
    res = _load(two_ranks[1], "fit_same_trainer", 2)
    _assert_identical(res)
    assert res[0]["global_step"] == 7 and [r["step"] for r in res[0]["records"]] == list(range(7))
    assert [b[:2] for b in res[0]["batches"]] == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [1, 3]]
    _assert_reference(res, lr=0.1)


def test_sync_dist_warning(two_ranks):
    res = _load(two_ranks[1], "sync_warn", 2)
    quiet = [w for w in res[0]["quiet_warnings"] if "straggler" in w]
    assert not quiet, f"false alarm for sync_dist in validation / ModelCheckpoint: {quiet}"
    loud = [w for w in res[0]["warnings"] if "sync_dist=True" in w]
    assert len(loud) == 1 and "training_step" in loud[0] and "not synchronised" in loud[0]
    assert not [w for w in res[1]["warnings"] if "sync_dist=True" in w]  # rank 0 only


def test_buffers_identical_after_training(two_ranks):
    res = _load(two_ranks[1], "buffers", 2)
    assert len({d["hash"] for d in res}) == 1 and len({d["buffers"] for d in res}) == 1


def test_checkpoint_resume_is_exact(two_ranks):
    out = two_ranks[1]
    full = _load(out, "resume_full", 2)
    _assert_identical(full)
    _assert_reference(full, lr=0.1, momentum=0.9, step_lr=(3, 0.5))
    for k in (3, 5, 7):  # mid-epoch 0, end of epoch 0 (resumed with a worker process), mid-epoch 1
        res = _load(out, f"resume_from{k}", 2)
        assert [d["hash"] for d in res] == [full[0]["hash"]] * 2, f"resume from step {k} diverged"
        assert res[0]["batches"] == full[0]["batches"][k:], f"resume from step {k} used other batches"
        assert res[0]["global_step"] == 8 and [r["step"] for r in res[0]["records"]] == list(range(k, 8))
    ckpt = torch.load(out / "ckpt" / "step=3.ckpt", weights_only=False, map_location="cpu")
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["epoch"] == 0 and state["consumed"] == 3 and state["reduce_step"] == 3
    assert state["global_batch_size"] == 8


def _expect(out, name, world, error_type, *fragments):
    for d in _load(out, name, world):
        assert d["error_type"] == error_type, d
        for fragment in fragments:
            assert fragment in d["error"], d["error"]


def test_bad_iterable_dataset(two_ranks):
    _expect(two_ranks[1], "bad_iterable", 2, "ValueError", "IterableDataset", "map-style")


def test_bad_user_batch_sampler(two_ranks):
    _expect(two_ranks[1], "bad_batch_sampler", 2, "ValueError", "custom batch_sampler", "batch_size=")


def test_bad_global_batch_too_small(two_ranks):
    _expect(two_ranks[1], "bad_small_batch", 2, "ValueError", "too small", "at least 2")


def test_bad_devices_mismatch(two_ranks):
    _expect(two_ranks[1], "bad_devices", 2, "ValueError", "devices=3", "== 2")


def test_failing_rank_stops_the_others(two_ranks):
    # W=2: rank 0 cannot decode without rank 1, which raises in training_step at step 2
    res = _load(two_ranks[1], "crash", 2)
    assert res[1]["error_type"] == "RuntimeError" and "injected failure" in res[1]["error"]
    assert res[0]["error_type"] == "CodedReduceError" and "rank 1 failed" in res[0]["error"]
    assert res[0]["after"] < 60


# ---------------------------------------------------------------- catch-up, 5 and 7 ranks
def test_three_ranks_straggler_catches_up(tmp_path):
    # W=3: rank 0 decodes from either child (same data); rank 2 stalls 1.5 s at step 1, the others go on
    # and rank 2 then applies the steps it missed without running forward/backward
    sigterm_rank0 = (lambda out: (out / "at5.rank0").exists(), 0, signal.SIGTERM)  # during "sigterm" only
    run = _launch(tmp_path, 3, ["equiv", "catchup", "catchup_accumulate", "bad_devices", "crash", "sigterm"],
                  ["--delay", "1.5", "--delay-ranks", "2"], actions=[sigterm_rank0])
    run.check()
    for name, n in (("equiv", 40), ("catchup", 80)):
        res = _load(tmp_path, name, 3)
        _assert_identical(res)
        _assert_reference(res, lr=0.1, n=n)
    res = _load(tmp_path, "catchup", 3)
    lag = res[2]["records"]
    assert lag[1]["compute_s"] >= 1.5 and not lag[1]["skipped"]
    skipped = [r for r in lag if r["skipped"]]
    assert len(skipped) >= 2 and all(r["compute_s"] is None for r in skipped)
    assert res[0]["global_step"] == res[2]["global_step"] == 10
    # with gradient accumulation the lagging rank skips every micro-batch of a step already reduced
    res = _load(tmp_path, "catchup_accumulate", 3)
    _assert_identical(res)
    _assert_reference(res, lr=0.1, n=80, accumulate=2)
    skipped = sum(r["skipped"] for r in res[2]["records"])
    # each skipped step saves at least its stepping micro-batch; a rank that catches up runs one batch per
    # epoch forward-only (so that it logs what the others log): 80 samples, 3 ranks, batch 4 -> 2 epochs
    epochs = len({epoch for epoch, _, _ in res[2]["batches"]})
    assert skipped >= 2 and res[2]["calls"] <= len(res[2]["batches"]) - skipped + epochs
    # DDP's batches: 80 samples over 3 ranks, 27 per rank, 7 batches of 4 per epoch; 4 steps per epoch -> 2 epochs
    assert res[0]["calls"] == len(res[0]["batches"]) == 14
    _expect(tmp_path, "bad_devices", 3, "ValueError", "devices=4")
    # a rank that fails inside the tolerance: the others train on to max_steps
    crash = _load(tmp_path, "crash", 3)
    assert crash[2]["error_type"] == "RuntimeError"
    assert crash[0]["error_type"] is None and crash[1]["error_type"] is None
    # SIGTERM to rank 0 (Lightning's per-batch SIGTERM broadcast is replaced by a local check): it stops,
    # and the others, which cannot go on without the root, stop with an error naming it instead of hanging
    sig = _load(tmp_path, "sigterm", 3)
    assert sig[0]["error_type"] == "SIGTERMException"
    for d in sig[1:]:
        assert d["error_type"] == "CodedReduceError" and "rank 0 failed" in d["error"] and d["after"] < 60


def test_equivalence_five_ranks_weighted_code(tmp_path):
    # W=5 (n=3, s=1): the root's 3 children use a remainder block code, so some ranks' samples carry
    # weights other than 1 and the strategy splits their batch into weighted chunks
    run = _launch(tmp_path, 5, ["equiv", "delay", "manual"], ["--delay", "0.3", "--delay-ranks", "3"])
    run.check()
    for name in ("equiv", "delay"):
        res = _load(tmp_path, name, 5)
        _assert_identical(res)
        _assert_reference(res, lr=0.1)
        assert not all(d["uniform"] for d in res)
    # manual optimization with the default options: the strategy picks a 0/1 code (weights cannot be applied
    # to a loss the user back-propagates) and trains DDP's run
    res = _load(tmp_path, "manual", 5)
    _assert_identical(res)
    assert all(d["uniform"] for d in res)
    _assert_reference(res, lr=0.1, step_lr=(2, 0.5))


def test_equivalence_seven_ranks(tmp_path):
    # W=7 (n=3, s=1): two levels of FRC pairs; ranks 3 and 6 are leaves in different groups
    run = _launch(tmp_path, 7, ["equiv", "delay"], ["--delay", "0.3", "--delay-ranks", "3,6"])
    run.check()
    for name in ("equiv", "delay"):
        res = _load(tmp_path, name, 7)
        _assert_identical(res)
        _assert_reference(res, lr=0.1)


# ---------------------------------------------------------------- launchers
def test_lightning_launcher(tmp_path):
    """One process, Trainer(devices=2, strategy="codedreduce"): Lightning starts the other rank."""
    _run_process([sys.executable, str(ROOT / "tests" / WORKER), "--scenarios", "equiv", "--world", "2",
                  "--out", str(tmp_path)], tmp_path, timeout=180)
    res = _load(tmp_path, "equiv", 2)
    _assert_identical(res)
    _assert_reference(res, lr=0.1)


def test_torchrun_with_strategy_instance(tmp_path):
    """torchrun (TorchElasticEnvironment) and Trainer(strategy=CodedReduceStrategy(...))."""
    _run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(ROOT / "tests" / WORKER), "--scenarios", "equiv_instance", "--out", str(tmp_path)],
                 tmp_path, timeout=180)
    res = _load(tmp_path, "equiv_instance", 2)
    _assert_identical(res)
    _assert_reference(res, lr=0.1)


def test_fork_variant(tmp_path):
    """"codedreduce_fork": processes forked by Lightning (the notebook variant)."""
    _run_process([sys.executable, str(ROOT / "tests" / WORKER), "--scenarios", "equiv", "--world", "2",
                  "--strategy", "codedreduce_fork", "--out", str(tmp_path)], tmp_path, timeout=180)
    res = _load(tmp_path, "equiv", 2)
    assert res[0]["start_method"] == "fork"
    _assert_identical(res)
    _assert_reference(res, lr=0.1)


# ---------------------------------------------------------------- reductions over the tree (pure)
@pytest.mark.parametrize("op,ref", [
    ("sum", lambda s: s.sum(0)), ("mean", lambda s: s.mean(0)), ("avg", lambda s: s.mean(0)),
    (None, lambda s: s.sum(0)), ("max", lambda s: s.amax(0)), ("min", lambda s: s.amin(0)),
    ("product", lambda s: s.prod(0)), (torch.distributed.ReduceOp.SUM, lambda s: s.sum(0)),
    (torch.distributed.ReduceOp.MAX, lambda s: s.amax(0)), (torch.distributed.ReduceOp.AVG, lambda s: s.mean(0)),
])
def test_tree_reductions_match_torch(op, ref):
    from lightning_codedreduce.strategy.collectives import combine

    values = [torch.randn(3, 2, generator=torch.Generator().manual_seed(k)) for k in range(5)]
    torch.testing.assert_close(combine(values, op), ref(torch.stack(values)), rtol=0, atol=1e-6)


def test_tree_reduction_refuses_unknown_ops():
    from lightning_codedreduce.strategy.collectives import combine

    with pytest.raises(ValueError, match="supports reduce_op 'sum', 'mean'"):
        combine([torch.ones(1)], "median")
    with pytest.raises(ValueError, match="BAND"):
        combine([torch.ones(1)], torch.distributed.ReduceOp.BAND)
