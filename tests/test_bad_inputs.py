"""What users get wrong, and what they then see: every case either works or fails with an error that
says what to fix.

Two halves:
* in-process, before any process group exists (fast): strategy options, transport, launch layouts;
* one launched job of 4 ranks (``tests/bad_inputs_worker.py``) that runs the fit-time cases one after
  another: data loaders, models (unused/frozen/non-float/lazy/complex parameters), NaN gradients,
  per-rank configuration that differs, sync_dist, manual optimization, LBFGS. Every case fails the
  same way on every rank (or works), so the ranks stay in step; each test reads its case's results.
W=4 with the default plan makes ranks 1-3 weight their samples unequally (a (3,1) block code), so the
chunked training step is exercised by every case that trains.
"""
import json
import os

import pytest
import torch

from mp import launch

pytestmark = pytest.mark.timeout(420)

CUDA = torch.cuda.is_available()


# ================================================================ in-process: configuration
CONFIG_CASES = [
    # (kwargs, exception, regex the message must match: what is wrong and how to fix it)
    (dict(branching=1), ValueError, r"branching must be >= 2.*e\.g\. branching=3"),
    (dict(branching="3"), ValueError, r"branching must be an integer, got '3'"),
    (dict(branching=2.5), ValueError, r"branching must be an integer, got 2\.5"),
    (dict(stragglers=-1), ValueError, r"stragglers must be >= 0.*use 0 for an uncoded tree"),
    (dict(stragglers=True), ValueError, r"stragglers must be an integer, got True"),
    (dict(branching=3, stragglers=3), ValueError, r"stragglers=3 must be smaller than branching=3.*branching=5"),
    (dict(code="cyclic"), ValueError, r"unknown code 'cyclic'; choose one of 'auto', 'frc'"),
    (dict(seed=-1), ValueError, r"seed must be >= 0.*the same on every rank"),
    (dict(timeout=0), ValueError, r"timeout must be a finite, positive number of seconds"),
    (dict(timeout=float("nan")), ValueError, r"timeout must be a finite, positive number of seconds.*nan"),
    (dict(timeout=float("inf")), ValueError, r"timeout must be a finite, positive number of seconds.*inf"),
    (dict(timeout="30"), ValueError, r"timeout must be a finite, positive number of seconds.*'30'"),
    (dict(global_batch_size=0), ValueError, r"global_batch_size must be a positive integer, None"),
    (dict(global_batch_size=2.5), ValueError, r"global_batch_size must be a positive integer, None"),
    (dict(global_batch_size=True), ValueError, r"global_batch_size must be a positive integer, None"),
    (dict(ddp_comm_hook=lambda *a: None), ValueError, r"ddp_comm_hook is a DistributedDataParallel option"),
    (dict(transport="mpi"), ValueError, r"unknown transport 'mpi'; choose one of 'gloo', 'nccl'"),
    (dict(speeds="fast"), ValueError, r"speeds must be a list of relative speeds, one per rank.*e\.g\. speeds=\["),
    (dict(speeds=[1, -1]), ValueError, r"speeds must be positive and finite, got -1\.0 for rank 1"),
    (dict(stragglers="Auto"), ValueError, r"stragglers must be an integer >= 0 or 'auto'"),
    (dict(stragglers="auto", adapt_every=0), ValueError, r"adapt_every must be >= 1.*e\.g\. 50"),
    (dict(stragglers="auto", adapt_patience=0), ValueError, r"adapt_patience must be >= 1"),
    (dict(stragglers="auto", speeds=[1, 1]), ValueError, r"stragglers='auto' measures the ranks' speeds itself"),
    (dict(coded_self=True), ValueError, r"coded_self must be one of 'none', 'root', 'all'.*'root' tolerates a slow rank 0"),
]


@pytest.mark.parametrize("kwargs,exc,message", CONFIG_CASES, ids=[
    "branching_too_small", "branching_str", "branching_float", "stragglers_negative", "stragglers_bool",
    "stragglers_not_below_branching", "unknown_code", "seed_negative", "timeout_zero", "timeout_nan", "timeout_inf",
    "timeout_str", "global_batch_zero", "global_batch_float", "global_batch_bool", "ddp_comm_hook",
    "unknown_transport", "speeds_str", "speeds_negative", "auto_misspelt", "adapt_every_zero", "adapt_patience_zero",
    "auto_with_speeds", "coded_self_bool"])
def test_bad_option(kwargs, exc, message):
    from lightning_codedreduce import CodedReduceStrategy

    with pytest.raises(exc, match=message):
        CodedReduceStrategy(**kwargs)


def test_ddp_only_option_is_ignored_with_a_warning():
    from lightning_codedreduce import CodedReduceStrategy

    with pytest.warns(UserWarning, match=r"ignores the DistributedDataParallel options \['find_unused_parameters'\]"):
        CodedReduceStrategy(find_unused_parameters=True)  # unused parameters simply work (see below)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: transport='nccl' is allowed")
def test_nccl_transport_without_cuda():
    from lightning_codedreduce import CodedReducePlan, CodedReduceStrategy
    from lightning_codedreduce.engine import CodedReducer

    fix = r"transport='nccl' needs CUDA GPUs.*use transport='gloo' \(CUDA tensors are staged through host memory\)"
    with pytest.raises(RuntimeError, match=fix):
        CodedReduceStrategy(transport="nccl")
    with pytest.raises(RuntimeError, match=fix):  # the engine says the same, before it needs a process group
        CodedReducer(CodedReducePlan(2), transport="nccl")


def test_reducer_without_process_group():
    from lightning_codedreduce import CodedReducePlan
    from lightning_codedreduce.engine import CodedReducer

    with pytest.raises(RuntimeError, match=r"initialise torch.distributed \(e.g. gloo\) before creating a CodedReducer"):
        CodedReducer(CodedReducePlan(2))


@pytest.mark.parametrize("segments,message", [
    ([(0, 5), (4, 8)], r"disjoint, non-empty \(start, stop\) ranges within the 10-element buffer, got \[\(0, 5\), \(4, 8\)\]"),
    ([(3, 3)], r"disjoint, non-empty"),
    ([(8, 12)], r"within the 10-element buffer"),
    ([5], r"segments must be \(start, stop\) pairs of element offsets, got \[5\]"),
])
def test_segments_that_cannot_order_the_ring(segments, message):
    # CodedReducer.begin(step, flat, segments=...) checks them on every layout (engine/ring.py)
    from lightning_codedreduce.engine.ring import checked_segments

    with pytest.raises(ValueError, match=message):
        checked_segments(segments, 10)
    assert checked_segments([(5, 10), (0, 5)], 10) == [(5, 10), (0, 5)]  # the caller's order is the ring's


# ================================================================ in-process: launch layout
def _manual_launch(monkeypatch, world):
    """The variables of processes started by hand (Lightning's "externally created processes")."""
    for k in list(os.environ):
        if k.startswith(("SLURM_", "TORCHELASTIC_", "HOROVOD_", "OMPI_", "PMI_")) or k in ("GROUP_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


def test_devices_do_not_match_the_launched_processes(monkeypatch):
    import pytorch_lightning as pl

    import lightning_codedreduce  # noqa: F401

    _manual_launch(monkeypatch, 4)
    with pytest.raises(ValueError, match=r"started 4 processes.*devices=2 and num_nodes=1.*devices \* num_nodes == 4"):
        pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=2, logger=False)


def test_num_nodes_do_not_match_the_launched_processes(monkeypatch):
    import pytorch_lightning as pl

    import lightning_codedreduce  # noqa: F401

    _manual_launch(monkeypatch, 4)
    with pytest.raises(ValueError, match=r"devices=2 and num_nodes=4 \(8 processes\).*devices \* num_nodes == 4"):
        pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=2, num_nodes=4, logger=False)


# ================================================================ 4 ranks: fit-time cases
SCENARIOS = [
    "iterable", "batch_sampler", "empty", "smaller_than_batch", "drop_last_too_few", "weighted_sampler",
    "replacement", "length_differs", "global_batch_too_small", "chunk_without_tensors", "unused_parameters",
    "frozen_layers", "non_float_parameters", "float64", "complex_parameter", "lazy_parameters", "lazy_materialised",
    "nan_gradient", "nan_gradient_skipped", "seed_differs", "stragglers_differ", "speeds_wrong_length", "sync_dist", "manual_default",
    "lbfgs",
]
WORLD = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_inputs")
    run = launch("bad_inputs_worker.py", WORLD, ["--scenarios", ",".join(SCENARIOS)], out, timeout=400)
    run.check()
    return out


def _results(out, name):
    res = []
    for r in range(WORLD):
        path = out / f"{name}.rank{r}.json"
        assert path.exists(), f"no result {path.name}:\n" + (out / f"rank{r}.log").read_text()[-3000:]
        res.append(json.loads(path.read_text()))
    return res


def _expect(out, name, error_type, *fragments, ranks=range(WORLD)):
    res = _results(out, name)
    for r in ranks:
        d = res[r]
        assert d["error_type"] == error_type, (r, d["error_type"], d["error"], d.get("traceback", "")[-2000:])
        for fragment in fragments:
            assert fragment in d["error"], (r, fragment, d["error"])
    return res


def _works(out, name):
    """Trained without error, and every rank ended with bitwise the same parameters and buffers."""
    res = _results(out, name)
    for d in res:
        assert d["error_type"] is None, (d["error"], d.get("traceback", "")[-2000:])
    assert len({d["params"] for d in res}) == 1, [d["params"] for d in res]
    assert len({d["buffers"] for d in res}) == 1, [d["buffers"] for d in res]
    return res


# -- data loaders
def test_iterable_dataset(job):
    _expect(job, "iterable", "ValueError", "cannot train from an IterableDataset", "Use a map-style Dataset")


def test_user_batch_sampler(job):
    _expect(job, "batch_sampler", "ValueError", "custom batch_sampler (", "Pass batch_size=")


def test_empty_dataset(job):
    _expect(job, "empty", "ValueError", "the training dataset is empty", "at least 4 samples per step")


def test_dataset_smaller_than_the_global_batch_works(job):
    # 5 samples, global batch 10, drop_last=False: one step per epoch, the batch wraps around the permutation
    res = _works(job, "smaller_than_batch")
    assert res[0]["global_step"] == 2 and res[0]["finite"]


def test_drop_last_with_too_few_samples(job):
    _expect(job, "drop_last_too_few", "ValueError", "5 samples: 2 per rank under DDP's sampler, fewer than batch_size=4",
            "drop_last=True leaves no step", "use a smaller batch_size or drop_last=False")


def test_custom_sampler(job):
    _expect(job, "weighted_sampler", "ValueError", "cannot use the custom sampler WeightedRandomSampler",
            "Use shuffle=True or shuffle=False")


def test_sampler_with_replacement(job):
    # as under DDP: Lightning replaces a RandomSampler (with replacement too) by its DistributedSampler
    _expect(job, "replacement", None)


def test_ranks_with_different_datasets(job):
    res = _expect(job, "length_differs", "ValueError", "the ranks disagree on the training data",
                  "every rank must build the same DataLoader")
    assert "(44, 16," in res[0]["error"]  # the odd rank's dataset length is shown


def test_global_batch_too_small(job):
    _expect(job, "global_batch_too_small", "ValueError", "global_batch_size=2 is too small", "use global_batch_size>=4")


def test_weighted_chunks_need_per_sample_tensors(job):
    # ranks 1-3 weight their samples unequally and must split the batch; rank 0 (weights 1) learns they stopped
    # a batch that is only a list of per-sample ids is split like any per-sample structure: it trains
    _expect(job, "chunk_without_tensors", None)


# -- models
def test_unused_parameters_work(job):
    # DDP needs find_unused_parameters=True; here a parameter without gradient gets a zero gradient on every rank
    res = _works(job, "unused_parameters")
    assert len({d["unused"] for d in res}) == 1 and res[0]["global_step"] == 3


def test_frozen_layers_work(job):
    res = _works(job, "frozen_layers")
    assert len({d["frozen"] for d in res}) == 1 and all(d["frozen_unchanged_on_rank0"] for d in res)


def test_non_float_parameters_and_buffers_work(job):
    # integer and bool buffers and an integer parameter (requires_grad=False) start rank-dependent: rank 0's win
    res = _works(job, "non_float_parameters")
    # calls: forward passes on rank 0 (a piece each, its buffers win), at least one per step
    assert len({d["calls"] for d in res}) == 1 and res[0]["calls"] >= 3
    assert [(d["mask"], d["index"]) for d in res] == [([True, True, False], [0, 1, 2])] * WORLD


def test_float64_model_works(job):
    res = _works(job, "float64")
    assert res[0]["dtype"] == "torch.float64"


def test_complex_parameter(job):
    _expect(job, "complex_parameter", "ValueError", "parameter net.phase is torch.complex64",
            "Set requires_grad=False on it", "torch.view_as_real")


def test_lazy_parameters(job):
    _expect(job, "lazy_parameters", "ValueError", "not initialised yet (lazy modules: net.body.0.weight",
            "run one forward pass with a dummy batch", "setup() hook")


def test_lazy_parameters_materialised_in_setup_work(job):
    _works(job, "lazy_materialised")


def test_nan_gradient_is_the_same_on_every_rank(job):
    # rank 0's loss is NaN at step 1: the reduced gradient is NaN -- on every rank alike (computed once at the
    # root), so the ranks stay identical (bitwise), as with DDP; training does not hang
    res = _works(job, "nan_gradient")
    assert not res[0]["finite"] and all(d["nonfinite_steps"] == [1, 2, 3] for d in res)


def test_nan_gradient_can_be_skipped_consistently(job):
    # the README's recipe: since the reduced gradient is the same everywhere, dropping non-finite steps in
    # on_before_optimizer_step is the same decision on every rank
    res = _works(job, "nan_gradient_skipped")
    assert res[0]["finite"] and all(d["nonfinite_steps"] == [1] for d in res) and res[0]["global_step"] == 4


# -- configuration that differs between ranks
def test_seed_differs_on_one_rank(job):
    _expect(job, "seed_differs", "ValueError", "the ranks built different CodedReduce plans",
            "seed: rank 0 0, rank 1 1, rank 2 0, rank 3 0", "with the same branching, stragglers, code, seed")


def test_stragglers_differ_on_one_rank(job):
    _expect(job, "stragglers_differ", "ValueError", "stragglers: rank 0 1, rank 1 1, rank 2 0, rank 3 1",
            "every rank must create CodedReduceStrategy with the same")


def test_speeds_of_the_wrong_length(job):
    _expect(job, "speeds_wrong_length", "ValueError", "speeds has 3 entries but there are 4 ranks",
            "give one relative speed per rank")


# -- training loop
def test_sync_dist_on_step_warns_and_does_not_hang(job):
    res = _works(job, "sync_dist")
    loud = [w for w in res[0]["warnings"] if "sync_dist=True" in w]
    assert len(loud) == 1 and "on_step=False, on_epoch=True" in loud[0], res[0]["warnings"]
    assert not [w for d in res[1:] for w in d["warnings"] if "sync_dist=True" in w]  # rank 0 only


def test_manual_optimization_works_with_default_options(job):
    res = _works(job, "manual_default")
    assert res[0]["global_step"] == 3 and all(d["uniform"] for d in res)


def test_optimizer_that_calls_the_closure_twice(job):
    _expect(job, "lbfgs", "RuntimeError", "called its closure more than once", "(e.g. LBFGS)")


def test_case_count():
    """The suite covers at least 30 cases (each test above is one, each parametrised option one)."""
    in_process = len(CONFIG_CASES) + 5
    assert in_process + len(SCENARIOS) >= 30
