"""``strategy="codedreduce"`` trains DDP's run: the same script under ``"ddp"`` and ``"codedreduce"``.

This file is both the test and the scenarios it runs: ``pytest`` launches it as W real processes over
gloo (``python tests/test_ddp_equivalence.py --scenarios ...``), each scenario trains once with
``strategy="ddp"`` and once with ``strategy="codedreduce"`` (default options) in the same processes and
writes what a user would compare (``global_step``, parameters, checkpoint file names, logged metrics).
A scenario that raises records its error and the job goes on, so one crash fails only its own test.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

N, BATCH, RTOL = 61, 3, 1e-5
GRID = list(itertools.product((True, False), (False, True), (1, 2)))  # shuffle, drop_last, accumulate_grad_batches


def grid_name(shuffle: bool, drop_last: bool, accumulate: int) -> str:
    return f"grid_sh{int(shuffle)}_dl{int(drop_last)}_acc{accumulate}"


# ====================================================================== the scenarios (run in each rank)
def _lightning():
    import lightning_codedreduce  # noqa: F401  (registers "codedreduce")
    from lit_common import lightning

    return lightning()


class Named(Dataset):
    """Samples with metadata: ``(features, target, name)``; the name says which sample it is."""

    def __init__(self, n: int = N):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(6, generator=g))[:, None]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], f"s{i}"


def make_module(pl, *, lr=0.1, momentum=0.9, weight_decay=0.0, unused=False, batchnorm=False, delay=None, stall=None):
    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            self.unused = torch.nn.Linear(8, 8) if unused else None  # never reached by backward
            self.bn = torch.nn.BatchNorm1d(6) if batchnorm else None  # statistics only (SWA's BN epoch)
            self.seen: list[int] = []  # samples counted on this rank (metadata checked against the features)
            self.mismatched = 0

        def training_step(self, batch, batch_idx):
            x, y, names = batch
            self.mismatched += sum(int(n[1:]) >= len(DATA.x) or not torch.equal(DATA.x[int(n[1:])], row)
                                   for n, row in zip(names, x))
            import lightning_codedreduce

            if lightning_codedreduce.is_counted(self.trainer):
                self.seen.extend(int(n[1:]) for n in names)
            if self.bn is not None:
                self.bn(x)
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
            if delay and self.trainer.global_rank == delay[0] and JITTER.random() < delay[1]:
                time.sleep(delay[2])
            return loss

        def on_train_batch_start(self, batch, batch_idx):
            # stall=(rank, epoch, seconds): that rank stops before its first batch of that epoch, so the others
            # train the whole epoch without it and it applies every step of it without computing one
            if stall and (self.trainer.global_rank, self.trainer.current_epoch, batch_idx) == (stall[0], stall[1], 0):
                time.sleep(stall[2])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    return Net()


DATA = Named()
WORLD = int(os.environ.get("WORLD_SIZE", 1))  # read before Lightning runs (its teardown may clear it)
JITTER = random.SystemRandom()  # straggler delays at random, outside every seeded generator


def fit(pl, out: Path, name: str, strategy: str, *, shuffle=True, drop_last=False, accumulate=1, epochs=2,
        callbacks=(), deterministic=False, batch_size=BATCH, checkpoint_every_step=True, options=None,
        **module_kw) -> dict:
    pl.seed_everything(0, workers=True)
    model = make_module(pl, **module_kw)
    ckdir = out / f"{name}_{strategy[:3]}_ckpt"
    # a checkpoint every step (its names are compared) is a barrier every step; without it, one per epoch
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(ckdir), filename="{epoch}-{step}", save_top_k=-1,
                                              every_n_train_steps=1 if checkpoint_every_step else None)
    if strategy == "ddp" and (module_kw.get("unused") or module_kw.get("batchnorm")):
        strategy = "ddp_find_unused_parameters_true"  # what DDP needs for parameters backward does not reach
    if options is not None:  # the strategy with options (default: the string, as a user writes it)
        from lightning_codedreduce.strategy import strategy_class
        from lit_common import NAMESPACE

        strategy = strategy_class(NAMESPACE)(**options)
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=epochs,
                         accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=deterministic,
                         callbacks=[checkpoint, *callbacks], default_root_dir=str(out / "root"))
    loader = DataLoader(DATA, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    trainer.fit(model, loader)
    trainer.strategy.barrier()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"global_step": trainer.global_step, "params": params.tolist(),
            "ckpts": sorted(os.listdir(ckdir)) if ckdir.exists() else [],
            "train_loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
            "seen": model.seen, "mismatched": model.mismatched,
            "skipped": sum(r["skipped"] for r in getattr(trainer.strategy, "step_records", [])),
            "early_buckets": sum(r.get("early_buckets", 0) for r in getattr(trainer.strategy, "step_records", [])),
            "steps_per_epoch": trainer.num_training_batches,
            "decisions": list(getattr(trainer.strategy, "plan_decisions", [])),
            "layout": getattr(getattr(trainer.strategy, "plan", None), "layout", None)}


def slow_rank_speeds(slow: int) -> list[float]:
    """Relative speeds with ``slow`` at half speed (when it exists)."""
    return [0.5 if r == slow else 1.0 for r in range(WORLD)]


def both(pl, out, name, **kw) -> dict:
    return {s: fit(pl, out, name, s, **kw) for s in ("ddp", "codedreduce")}


def scenario(pl, out: Path, name: str) -> dict:
    if name.startswith("grid_"):
        sh, dl, acc = name.split("_")[1:]
        return both(pl, out, name, shuffle=sh == "sh1", drop_last=dl == "dl1", accumulate=int(acc[3:]))
    if name == "straggler":  # one rank sleeps at random steps (codedreduce only: DDP would just wait); its share
        # is sized by its speed (speeds=): every step's samples stay DDP's
        return {"ddp": fit(pl, out, name, "ddp"), "codedreduce": fit(pl, out, name, "codedreduce", delay=(1, 0.5, 0.3),
                                                                    options=dict(speeds=slow_rank_speeds(1)))}
    if name == "balanced":
        # the balanced layout (chunk owners) with a random straggler, rank 0 included; one bucket per parameter
        # (each handed in by its gradient hook in the stepping backward), accumulation, an unused parameter
        kw = dict(accumulate=2, unused=True, weight_decay=0.01)
        return {"ddp": fit(pl, out, name, "ddp", **kw),
                "codedreduce": fit(pl, out, name, "codedreduce", delay=(0, 0.5, 0.3), **kw,
                                   options=dict(layout="balanced", bucket_cap_mb=1e-6, speeds=slow_rank_speeds(0)))}
    if name.startswith("auto"):  # stragglers="auto": rank 1 persistently slow; a decision every 2 steps switches
        # plans mid-epoch; "auto_tree" starts on the tree (announced decisions), "auto" on gloo's ring (gathers)
        auto = dict(stragglers="auto", adapt_every=2, adapt_patience=1, layout="tree" if name == "auto_tree" else "auto")
        return {"ddp": fit(pl, out, name, "ddp", epochs=3),
                "codedreduce": fit(pl, out, name, "codedreduce", epochs=3, delay=(1, 1.0, 0.15), options=auto)}
    if name == "coded_root_s2":  # s=2 with a coded root: its own slot has weights 3, 1 and 2, and for some
        # arrival sets the decoding coefficients sum to 0 (e.g. -0.5 and 0.5): flags of 1 per rank decoded to 0
        return {"ddp": fit(pl, out, name, "ddp"), "codedreduce": fit(pl, out, name, "codedreduce", delay=(1, 1.0, 0.15),
                                                                   options=dict(stragglers=2, layout="tree", coded_self="root"))}
    if name == "coded_root":  # the tree with rank 0's own compute coded: rank 0 stalls through epoch 1
        return {"ddp": fit(pl, out, name, "ddp", checkpoint_every_step=False),
                "codedreduce": fit(pl, out, name, "codedreduce", stall=(0, 1, 6.0), checkpoint_every_step=False,
                                   options=dict(layout="tree", coded_self="root"))}
    if name == "stall_whole_epoch":
        return {"ddp": fit(pl, out, name, "ddp", checkpoint_every_step=False),
                "codedreduce": fit(pl, out, name, "codedreduce", stall=(WORLD - 1, 1, 6.0), checkpoint_every_step=False)}
    if name == "swa_batchnorm":
        swa = lambda: [pl.callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)]  # noqa: E731
        # batch_size 4: DDP's last per-rank batch of 61 samples over 4 ranks is then 4 (BatchNorm needs 2 or more)
        return {s: fit(pl, out, name, s, epochs=3, batchnorm=True, callbacks=swa(), batch_size=4)
                for s in ("ddp", "codedreduce")}
    if name == "unused_weight_decay":
        return both(pl, out, name, unused=True, weight_decay=0.1)
    if name.startswith("deterministic"):
        runs = [fit(pl, out, f"{name}{k}", "codedreduce", deterministic=True, delay=(WORLD - 1, 0.5, 0.05))
                for k in range(2)]
        return {"first": runs[0], "second": runs[1]}
    raise ValueError(f"unknown scenario {name}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenarios", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    warnings.filterwarnings("ignore")
    pl = _lightning()
    rank = int(os.environ["RANK"])
    for name in a.scenarios.split(","):
        try:
            result = {"ok": True, **scenario(pl, out, name)}
        except Exception:  # noqa: BLE001 - recorded for the scenario's own test
            result = {"ok": False, "traceback": traceback.format_exc()}
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))


# ====================================================================== the tests (pytest)
def _job(tmp_path_factory, world: int, scenarios: list[str]) -> Path:
    from mp import launch

    out = tmp_path_factory.mktemp(f"ddp_equiv_w{world}")
    run = launch("test_ddp_equivalence.py", world, ["--scenarios", ",".join(scenarios)], out, timeout=900)
    run.check()
    return out


def _result(out: Path, name: str, rank: int = 0) -> dict:
    path = out / f"{name}.rank{rank}.json"
    assert path.exists(), f"no result for {name}: " + "\n".join(p.read_text()[-2000:] for p in out.glob("*.log"))
    res = json.loads(path.read_text())
    assert res["ok"], res["traceback"]
    return res


def _rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def _same_run(res: dict) -> float:
    ddp, cr = res["ddp"], res["codedreduce"]
    assert cr["global_step"] == ddp["global_step"]
    assert cr["ckpts"] == ddp["ckpts"]
    rel = _rel(cr["params"], ddp["params"])
    assert rel <= RTOL, f"parameters differ from DDP's by {rel:.2e} (relative)"
    return rel


WORLDS = (2, 3, 4, 5, 7, 8)
GRID_NAMES = [grid_name(*g) for g in GRID]
EXTRAS = {4: ["swa_batchnorm", "unused_weight_decay", "deterministic", "balanced", "auto", "auto_tree", "coded_root", "coded_root_s2"],
          3: ["deterministic", "stall_whole_epoch"], 7: ["deterministic", "balanced"]}
_JOBS: dict[int, Path] = {}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """``job(world)``: the output folder of the one job that runs every scenario of that world size."""
    def get(world: int) -> Path:
        if world not in _JOBS:
            _JOBS[world] = _job(tmp_path_factory, world, [*GRID_NAMES, "straggler", *EXTRAS.get(world, [])])
        return _JOBS[world]
    return get


pytestmark = [pytest.mark.slow, pytest.mark.timeout(1000)]


@pytest.mark.parametrize("world", WORLDS)
def test_same_run_as_ddp(job, world):
    """Every shuffle x drop_last x accumulate combination: DDP's global_step, parameters and checkpoints."""
    out = job(world)
    table = {name: _same_run(_result(out, name)) for name in GRID_NAMES}
    print(f"\nW={world}: " + ", ".join(f"{k[5:]}: {v:.1e}" for k, v in table.items()))


@pytest.mark.parametrize("world", WORLDS)
def test_same_run_as_ddp_with_a_straggler(job, world):
    _same_run(_result(job(world), "straggler"))


@pytest.mark.parametrize("world", WORLDS)
def test_metadata_and_metric_counts_match_ddp(job, world):
    """Names travel with their samples in every piece; counted samples per epoch are DDP's; the epoch loss too."""
    out = job(world)
    for name in GRID_NAMES:
        ranks = [_result(out, name, r) for r in range(world)]
        for strategy in ("ddp", "codedreduce"):
            assert all(r[strategy]["mismatched"] == 0 for r in ranks), (name, strategy)
        seen = {s: Counter(i for r in ranks for i in r[s]["seen"]) for s in ("ddp", "codedreduce")}
        if any(r["codedreduce"]["skipped"] for r in ranks):
            # a rank that lagged (2 cores, W processes) applied a step without computing it: its samples
            # are not counted, nothing is counted twice
            assert not seen["codedreduce"] - seen["ddp"], name
            continue
        assert seen["codedreduce"] == seen["ddp"], name  # each sample counted once, with DDP's padding
        ddp_loss, cr_loss = ranks[0]["ddp"]["train_loss"], ranks[0]["codedreduce"]["train_loss"]
        assert abs(cr_loss - ddp_loss) <= 1e-5 * max(1.0, abs(ddp_loss)), (name, cr_loss, ddp_loss)


def test_a_rank_that_skips_a_whole_epoch_still_logs_and_trains_ddps_run(job):
    """Epoch-level sync_dist logs are synchronised only among ranks that logged: a rank that caught up through
    a whole epoch (it computed none of its steps) still takes part, and the run is DDP's."""
    ranks = [_result(job(3), "stall_whole_epoch", r) for r in range(3)]
    stalled = ranks[2]["codedreduce"]
    # every step of epoch 1 (a loaded machine may keep the others busy past the stall: a few more)
    assert stalled["skipped"] >= stalled["steps_per_epoch"], stalled["skipped"]
    _same_run(ranks[0])
    assert all(abs(r["codedreduce"]["train_loss"]) < float("inf") for r in ranks)


def test_swa_batchnorm_epoch_matches_ddp(job):
    """StochasticWeightAveraging's BatchNorm epoch steps without backward: the weights do what DDP's do."""
    _same_run(_result(job(4), "swa_batchnorm"))


def test_unused_parameters_with_weight_decay_match_ddp(job):
    """A parameter no rank reaches keeps grad None (no weight decay), as under DDP."""
    res = _result(job(4), "unused_weight_decay")
    _same_run(res)


@pytest.mark.parametrize("world", (3, 4, 7))
def test_deterministic_runs_are_bitwise_identical(job, world):
    """W=4's tree cannot be reproducible (ranks 1 and 2 form a code group through differently shaped subtrees):
    under deterministic=True the strategy takes the balanced layout there, which sums one member per group in
    group order."""
    res = _result(job(world), "deterministic")
    assert res["first"]["params"] == res["second"]["params"]
    assert res["first"]["layout"] == ("balanced" if world == 4 else "tree")


@pytest.mark.parametrize("world", (4, 7))
def test_balanced_layout_with_a_straggling_rank_0_is_ddps_run(job, world):
    ranks = [_result(job(world), "balanced", r) for r in range(world)]
    assert ranks[0]["codedreduce"]["layout"] == "balanced"
    # buckets were handed in by the hooks while backward ran, on the ranks that computed: a straggling rank
    # (rank 0 included) on a loaded machine may catch up through every step and compute none
    assert sum(r["codedreduce"]["early_buckets"] for r in ranks) > 0
    _same_run(ranks[0])



def test_tree_with_a_coded_root_trains_ddps_run_while_rank_0_stalls(job):
    """coded_self="root": rank 0's own compute is one slot of its code, so while it stalls through a whole epoch
    its protocol thread decodes the others' messages and sends every result; it then applies them all."""
    ranks = [_result(job(4), "coded_root", r) for r in range(4)]
    root = ranks[0]["codedreduce"]
    assert root["layout"] == "tree"
    assert root["skipped"] >= root["steps_per_epoch"], root["skipped"]
    _same_run(ranks[0])


def test_coded_root_with_mixed_weights_trains_ddps_run(job):
    """stragglers=2 with a coded root (W=4): rank 0's own slot carries weights 3, 1 and 2. Every step's gradient
    is written back whatever the arrival set, so the run is DDP's (a flag of 1 per rank, decoded with the
    gradients, summed to 0 for some sets and kept the previous step's gradient: 0.34 relative)."""
    _same_run(_result(job(4), "coded_root_s2", 0))


@pytest.mark.parametrize("name", ["auto", "auto_tree"])
def test_auto_plan_switches_mid_epoch_and_trains_ddps_run(job, name):
    """stragglers="auto" with a persistently slow rank: the plan changes mid-epoch (the sampler and the reducer at
    the same agreed step), every sample of every epoch is counted exactly once, and the run is DDP's. From gloo's
    ring (the default start) decisions travel by gathers; from the tree, announced with a result."""
    ranks = [_result(job(4), name, r) for r in range(4)]
    decisions = ranks[0]["codedreduce"]["decisions"]
    assert decisions, "no plan switch with rank 1 sleeping 0.15 s every step"
    applied = [d for d in decisions if d["applied"]]  # (one announced past the last step may reach only some ranks)
    assert all([d for d in r["codedreduce"]["decisions"] if d["applied"]] == applied for r in ranks)  # same steps
    steps_per_epoch = ranks[0]["codedreduce"]["steps_per_epoch"]
    for d in decisions:  # the loader position every rank switched its sampler at is the agreed step's
        assert d["effective_step"] > d["step"] and d["epoch"] * steps_per_epoch + d["batch"] == d["effective_step"]
    assert decisions[0]["applied"]
    if name == "auto":  # (from the tree, the first switch may fall on an epoch's first batch)
        assert any(d["batch"] > 0 and d["applied"] for d in decisions), decisions  # one took effect inside an epoch
    seen = {s: Counter(i for r in ranks for i in r[s]["seen"]) for s in ("ddp", "codedreduce")}
    if not any(r["codedreduce"]["skipped"] for r in ranks):  # (a lagging rank counts none of a skipped step)
        assert seen["codedreduce"] == seen["ddp"]
    assert not seen["codedreduce"] - seen["ddp"]  # nothing counted twice
    _same_run(ranks[0])


if __name__ == "__main__":
    main()
