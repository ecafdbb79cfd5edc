"""One rank (or, with Lightning's own launcher, the launching process) of the strategy tests.

Runs the scenarios named in ``--scenarios`` one after another in the same processes (one import of
Lightning, one process group) and writes ``<out>/<scenario>.rank<r>.json`` per scenario and rank:
final parameters and their hash, the global batches used per step, the initial parameters, the
strategy's step records, warnings, or the error a scenario expected.

Launch modes: ``tests/mp.py`` (RANK/WORLD_SIZE/LOCAL_RANK set: Lightning's "externally created
processes"), ``torch.distributed.run``, or one process whose Trainer starts the others
(``--world N`` with Lightning's launcher, including the fork variant).
"""
import argparse
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if sys.platform.startswith("linux") and "TORCHELASTIC_RUN_ID" in os.environ:
    # torchrun starts its workers in sessions of their own: die with it if a test timeout kills it
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

import lightning_codedreduce  # noqa: E402,F401  (registers "codedreduce")
from lightning_codedreduce.strategy import strategy_class  # noqa: E402

from lit_common import DIM, RecordsTraining, flat_params, lightning, make_dataset, make_net, param_hash  # noqa: E402

pl = lightning()
CodedReduceStrategy = strategy_class(pl.__name__)

A = None  # parsed args


class Net(RecordsTraining, pl.LightningModule):
    def __init__(self, lr=0.1, momentum=0.0, delays=None, delay_steps=None, manual=False, step_lr=None,
                 log_sync=False, val=False, init_seed=0, rank_init=False):
        super().__init__()
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        # rank_init: every rank starts from different weights; the strategy must broadcast rank 0's
        self.net = make_net(init_seed + (1000 * rank if rank_init else 0))
        self.lr, self.momentum, self.step_lr = lr, momentum, step_lr
        self.delays = {int(k): v for k, v in (delays or {}).items()}
        self.delay_steps = None if delay_steps is None else set(delay_steps)
        self.manual, self.log_sync, self.val = manual, log_sync, val
        self.automatic_optimization = not manual
        self.batches: list[tuple[int, int, list[int]]] = []
        self.calls = 0  # batches this rank ran training_step on (one call per piece of its share)
        self._last_batch = None
        self.init: list[float] | None = None
        self.val_sampler = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if (self.trainer.current_epoch, batch_idx) != self._last_batch:
            self.calls += 1
            self._last_batch = (self.trainer.current_epoch, batch_idx)
        x, y = batch
        loss = F.mse_loss(self(x).float(), y)
        self.log("train_loss", loss, sync_dist=self.log_sync, on_step=True)
        if self.manual:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            self._delay()
            opt.step()
            sched = self.lr_schedulers()
            if sched is not None:
                sched.step()
        return loss

    def _delay(self):
        rank = self.trainer.global_rank
        if rank in self.delays and (self.delay_steps is None or self.trainer.global_step in self.delay_steps):
            time.sleep(self.delays[rank])

    def on_after_backward(self):
        if not self.manual:
            self._delay()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x).float(), y)
        self.log("val_loss", loss, sync_dist=True)
        self.log("val_count", float(len(x)), reduce_fx="sum", sync_dist=True, on_epoch=True)

    def on_validation_start(self):
        loader = self.trainer.val_dataloaders
        self.val_sampler = type(loader.sampler).__name__

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.step_lr:
            sched = torch.optim.lr_scheduler.StepLR(opt, self.step_lr[0], self.step_lr[1])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


class Recorder(pl.Callback):
    """Writes a rank's result where the training ran (also in forked/spawned children)."""

    def __init__(self, name, extra=None):
        self.name, self.extra = name, extra or {}

    def on_fit_end(self, trainer, pl_module):  # after the strategy's on_train_end (buffers synced)
        strategy = trainer.strategy
        out = {
            "rank": trainer.global_rank, "world": trainer.world_size, "params": flat_params(pl_module).tolist(),
            "hash": param_hash(pl_module), "buffers": buffer_hash(pl_module), "init": pl_module.init, "batches": pl_module.batches,
            "calls": pl_module.calls,
            "records": list(strategy.step_records), "global_batch": strategy.global_batch_size,
            "per_rank": len(strategy.sampler.sample_weights), "uniform": strategy.sampler.uniform_weights,
            "plan": strategy.plan.fingerprint(), "global_step": trainer.global_step,
            "epoch": trainer.current_epoch, "strategy": type(strategy).__name__,
            "start_method": getattr(strategy, "_start_method", None),
            "val_sampler": pl_module.val_sampler,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "dead": dict(strategy.reducer.dead) if strategy.reducer else {},
            **self.extra,
        }
        write(self.name, trainer.global_rank, out)


def buffer_hash(module):
    import hashlib

    h = hashlib.sha256()
    for b in module.buffers():
        h.update(b.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write(name, rank, data):
    path = os.path.join(A.out, f"{name}.rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def my_rank():
    return int(os.environ.get("RANK", 0))


def trainer(name, *, strategy=None, callbacks=(), extra=None, **kw):
    cfg = dict(accelerator="cpu", devices=A.world, strategy=strategy or "codedreduce", logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, max_epochs=-1, default_root_dir=os.path.join(A.out, "root"))
    cfg.update(kw)
    return pl.Trainer(callbacks=[Recorder(name, extra), *callbacks], **cfg)


def loader(n=40, batch_size=4, **kw):
    return DataLoader(make_dataset(n), batch_size=batch_size, shuffle=kw.pop("shuffle", True), **kw)


# ---------------------------------------------------------------- scenarios
def sc_equiv(name, **model_kw):
    model = Net(lr=0.1, rank_init=True, **model_kw)
    trainer(name, max_steps=6).fit(model, loader())


def sc_equiv_instance(name):
    strategy = CodedReduceStrategy(branching=3, stragglers=1, timeout=20.0)
    trainer(name, strategy=strategy, max_steps=6).fit(Net(lr=0.1, rank_init=True), loader())


def sc_delay(name):
    # ranks given by --delay-ranks sleep in on_after_backward on every step
    delays = {r: A.delay for r in A.delay_ranks}
    trainer(name, max_steps=6).fit(Net(lr=0.1, delays=delays), loader())


def sc_catchup(name):
    # one rank stalls once at step 1; the others go on, it catches up by applying results without computing
    delays = {r: A.delay for r in A.delay_ranks}
    trainer(name, max_steps=10).fit(Net(lr=0.1, delays=delays, delay_steps=[1]), loader(n=80))


class _BatchNormNet(Net):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = torch.nn.Sequential(torch.nn.BatchNorm1d(DIM), self.net)


def sc_buffers(name):
    # BatchNorm running statistics differ per rank (local batches, no DDP buffer broadcast per forward);
    # the strategy broadcasts rank 0's buffers before validation and at the end of training
    trainer(name, max_steps=4).fit(_BatchNormNet(lr=0.1), loader())


def sc_catchup_accumulate(name):
    # as catchup, with 2 accumulation micro-batches per step: a lagging rank skips both
    delays = {r: A.delay for r in A.delay_ranks}
    trainer(name, max_steps=8, accumulate_grad_batches=2).fit(Net(lr=0.1, delays=delays, delay_steps=[1]), loader(n=80))


def sc_accumulate(name):
    trainer(name, max_steps=4, accumulate_grad_batches=2).fit(Net(lr=0.1), loader())


def streamed():
    """The balanced layout with one bucket per parameter: every gradient handed in from its hook in backward."""
    return CodedReduceStrategy(layout="balanced", bucket_cap_mb=1e-6)


def sc_clip(name, strategy=None):
    trainer(name, strategy=strategy, max_steps=5, gradient_clip_val=0.05).fit(Net(lr=0.1, momentum=0.9), loader())


def sc_clip_streamed(name):
    sc_clip(name, streamed())


def sc_bf16(name, strategy=None):
    trainer(name, strategy=strategy, max_steps=5, precision="bf16-mixed").fit(Net(lr=0.1), loader())


def sc_bf16_streamed(name):
    sc_bf16(name, streamed())


def sc_accumulate_streamed(name):
    trainer(name, strategy=streamed(), max_steps=4, accumulate_grad_batches=2).fit(Net(lr=0.1), loader())


def sc_manual(name):
    trainer(name, max_steps=6).fit(Net(lr=0.1, manual=True, step_lr=(2, 0.5)), loader())


def sc_sched(name):
    trainer(name, max_steps=6).fit(Net(lr=0.2, momentum=0.5, step_lr=(2, 0.5)), loader())


def sc_val(name):
    model = Net(lr=0.1, val=True)
    t = trainer(name, max_epochs=2, val_check_interval=1.0)
    t.fit(model, loader(), loader(n=10, batch_size=2, shuffle=False))
    # and trainer.validate() afterwards (not fitting: no coded sampler, no reducer)
    out = t.validate(model, loader(n=10, batch_size=2, shuffle=False), verbose=False)
    write(name + "_validate", t.global_rank, {"metrics": out[0], "hash": param_hash(model),
                                               "val_sampler": model.val_sampler})


def sc_max_epochs(name):
    trainer(name, max_epochs=2).fit(Net(lr=0.1), loader())


def sc_fit_twice(name):
    model = Net(lr=0.1)
    trainer(name + "_first", max_steps=3).fit(model, loader())
    model.init_second = flat_params(model).tolist()
    trainer(name, max_steps=3).fit(model, loader())  # a new Trainer: fresh loops, the same model


def sc_fit_same_trainer(name):
    # the same Trainer again with a higher max_steps: Lightning continues where it stopped
    model = Net(lr=0.1)
    t = trainer(name, max_steps=3)
    t.fit(model, loader())
    t.fit_loop.epoch_loop.max_steps = 7
    t.fit(model, loader())


def sc_sync_warn(name):
    ModelCheckpoint = pl.callbacks.ModelCheckpoint

    # no warning: sync_dist in validation, and ModelCheckpoint's own reduce_boolean_decision per step
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        ckpt = ModelCheckpoint(dirpath=os.path.join(A.out, "ckpt_quiet"), monitor="train_loss",
                               every_n_train_steps=1, save_top_k=1)
        trainer(name + "_quiet", max_steps=3, callbacks=[ckpt], enable_checkpointing=True,
                val_check_interval=2, check_val_every_n_epoch=None).fit(
            Net(lr=0.1, val=True), loader(), loader(n=10, batch_size=2, shuffle=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(name + "_run", max_steps=2).fit(Net(lr=0.1, log_sync=True), loader())
    write(name, my_rank(), {"warnings": [str(w.message) for w in caught],
                            "quiet_warnings": [str(w.message) for w in quiet]})


def sc_resume(name):
    ModelCheckpoint = pl.callbacks.ModelCheckpoint

    ckdir = os.path.join(A.out, "ckpt")
    kw = dict(max_steps=8)
    ckpt = ModelCheckpoint(dirpath=ckdir, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer(name + "_full", callbacks=[ckpt], enable_checkpointing=True, **kw).fit(
        Net(lr=0.1, momentum=0.9, step_lr=(3, 0.5)), loader())
    # 40 samples, global batch 8: 5 steps per epoch; resume mid-epoch 0, at the end of epoch 0 (with a
    # prefetching worker process), and mid-epoch 1
    for k, workers in ((3, 0), (5, 1), (7, 0)):
        model = Net(lr=0.1, momentum=0.9, step_lr=(3, 0.5), init_seed=123)  # different init: must be restored
        trainer(f"{name}_from{k}", **kw).fit(model, loader(num_workers=workers),
                                              ckpt_path=os.path.join(ckdir, f"step={k}.ckpt"))


def _expect_error(name, fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test checks type and message
        write(name, my_rank(), {"error_type": type(err).__name__, "error": str(err)})
        return
    write(name, my_rank(), {"error_type": None, "error": None})


class _Stream(IterableDataset):
    def __iter__(self):
        data = make_dataset()
        return iter(zip(data.tensors[0], data.tensors[1]))


def sc_bad_iterable(name):
    _expect_error(name, lambda: trainer(name + "_run", max_steps=2).fit(Net(), DataLoader(_Stream(), batch_size=4)))


def sc_bad_batch_sampler(name):
    from torch.utils.data import BatchSampler, RandomSampler

    ds = make_dataset()
    dl = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), batch_size=4, drop_last=False))
    _expect_error(name, lambda: trainer(name + "_run", max_steps=2).fit(Net(), dl))


def sc_bad_small_batch(name):
    strategy = CodedReduceStrategy(global_batch_size=1)
    _expect_error(name, lambda: trainer(name + "_run", strategy=strategy, max_steps=2).fit(Net(), loader()))


class _Crash(Net):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == A.world - 1 and self.trainer.global_step == 2:
            raise RuntimeError("injected failure")
        return super().training_step(batch, batch_idx)


def sc_crash(name):
    # the last rank fails at step 2; the others must stop with an error naming it, not hang
    t0 = time.monotonic()
    try:
        trainer(name + "_run", max_steps=20, strategy=CodedReduceStrategy(timeout=5.0)).fit(_Crash(), loader())
    except BaseException as err:  # noqa: BLE001
        write(name, my_rank(), {"error_type": type(err).__name__, "error": str(err), "after": time.monotonic() - t0})
        return
    write(name, my_rank(), {"error_type": None, "error": None, "after": time.monotonic() - t0})


class _Marker(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 5:
            open(os.path.join(A.out, f"at5.rank{trainer.global_rank}"), "w").close()


def sc_sigterm(name):
    # the test driver sends SIGTERM to one rank once training runs; nobody may hang
    t0 = time.monotonic()
    delays = {r: 0.02 for r in range(A.world)}
    try:
        trainer(name + "_run", max_steps=1000, callbacks=[_Marker()],
                strategy=CodedReduceStrategy(timeout=5.0)).fit(Net(delays=delays), loader())
    except BaseException as err:  # noqa: BLE001
        write(name, my_rank(), {"error_type": type(err).__name__, "error": str(err), "after": time.monotonic() - t0})
        return
    write(name, my_rank(), {"error_type": None, "error": None, "after": time.monotonic() - t0})


def sc_bad_devices(name):
    _expect_error(name, lambda: trainer(name + "_run", devices=A.world + 1, max_steps=2))


def main():
    global A
    p = argparse.ArgumentParser()
    p.add_argument("--scenarios", required=True)
    p.add_argument("--world", type=int, default=None)
    p.add_argument("--strategy", default="codedreduce")
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--delay-ranks", default="")
    p.add_argument("--out", required=True)
    A = p.parse_args()
    A.world = A.world or int(os.environ["WORLD_SIZE"])
    A.delay_ranks = [int(r) for r in A.delay_ranks.split(",") if r]
    os.makedirs(A.out, exist_ok=True)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    for name in A.scenarios.split(","):
        fn = globals()["sc_" + name]
        try:
            if name == "equiv" and A.strategy != "codedreduce":
                model = Net(lr=0.1, rank_init=True)
                trainer(name, strategy=A.strategy, max_steps=6).fit(model, loader())
            else:
                fn(name)
        except BaseException:
            # a scenario that fails must not leave the other ranks waiting: report and stop this rank
            write(name + "_crash", my_rank(), {"traceback": traceback.format_exc()})
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


if __name__ == "__main__":
    main()
