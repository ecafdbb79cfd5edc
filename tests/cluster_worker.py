"""One rank of the launcher and dead-rank tests (``tests/test_launchers.py``, ``tests/test_faults.py``).

Started by torchrun (one or several agents), by hand with the variables ``srun`` sets, by
``horovodrun`` or ``mpirun``, or by ``tests/mp.py``; the rank is whatever the launcher says (the
Trainer's ``global_rank``). Writes ``<out>/<scenario>.rank<r>.json``.

Scenarios:
* ``equiv``: 6 steps from different initial weights per rank (the strategy broadcasts rank 0's);
  records the global batches for the single-process reference.
* ``fault``: ``--victim`` writes ``<out>/victim_at_step`` at step ``--kill-step`` (or at the end of
  epoch 0, ``--kill-at epoch_end``) and then sleeps (the test kills or stops it); the others train to
  the end of ``--epochs`` epochs with ``ModelCheckpoint(save_last=True)`` and a ``StragglerMonitor``, and save
  ``final.ckpt`` with ``trainer.save_checkpoint``. An error is recorded (and the rank exits 1).
"""
import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if sys.platform.startswith("linux") and ("TORCHELASTIC_RUN_ID" in os.environ or "HOROVOD_RANK" in os.environ):
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # die with the launcher (own sessions)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_codedreduce  # noqa: E402,F401  (registers "codedreduce")
from lightning_codedreduce.callbacks import StragglerMonitor  # noqa: E402
from lightning_codedreduce.strategy import strategy_class  # noqa: E402
from lit_common import RecordsTraining, flat_params, lightning, make_dataset, make_net, param_hash  # noqa: E402

pl = lightning()
CodedReduceStrategy = strategy_class(pl.__name__)

A = None


def env_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def write(name, rank, data):
    path = os.path.join(A.out, f"{name}.rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


class Net(RecordsTraining, pl.LightningModule):
    def __init__(self, lr=0.1, rank_init=False, step_delay=0.0):
        super().__init__()
        self.net = make_net(1000 * env_rank() if rank_init else 0)
        self.lr, self.step_delay = lr, step_delay
        self.batches = []
        self.init = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.step_delay:
            time.sleep(self.step_delay)
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)  # an epoch-end collective

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def result(trainer, model, **extra):
    strategy = trainer.strategy
    return {"rank": trainer.global_rank, "world": trainer.world_size, "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank, "params": flat_params(model).tolist(), "hash": param_hash(model),
            "init": model.init, "batches": model.batches, "global_step": trainer.global_step,
            "epoch": trainer.current_epoch, "global_batch": strategy.global_batch_size,
            "environment": type(strategy.cluster_environment).__name__, "pid": os.getpid(), **extra}


def loader(n=40, batch_size=4):
    return DataLoader(make_dataset(n), batch_size=batch_size, shuffle=True)


def trainer_kw(**kw):
    cfg = dict(accelerator="cpu", devices=A.devices, num_nodes=A.nodes, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               default_root_dir=os.path.join(A.out, "root"))
    if A.devices is None:  # leave devices/num_nodes to the launcher (horovodrun)
        del cfg["devices"], cfg["num_nodes"]
    cfg.update(kw)
    return cfg


# ---------------------------------------------------------------- scenarios
def sc_equiv(name):
    strategy = "codedreduce" if A.by_name else CodedReduceStrategy(branching=A.branching, stragglers=A.stragglers,
                                                                   timeout=A.timeout)
    model = Net(rank_init=True)
    trainer = pl.Trainer(strategy=strategy, max_steps=6, **trainer_kw())
    trainer.fit(model, loader())
    write(name, trainer.global_rank, result(trainer, model))


class _Fault(pl.Callback):
    """The victim marks where it is and sleeps there (to be killed or stopped by the test).

    ``--kill-at step``: at step ``--kill-step``; the others wait at the next step until the test says it
    killed it, and the victim's parent until it has seen the death: the death is agreed mid-epoch, through
    the reduce steps. ``--kill-at epoch_end``: at the end of epoch 0, before ``ModelCheckpoint`` runs; the
    others go straight into the checkpoint's collectives and are waiting in them when the victim dies.
    ``--kill-at validation``: as validation of epoch 0 starts (validation logs ``val_loss`` with
    ``sync_dist=True``, ``EarlyStopping`` and ``ModelCheckpoint`` decide on it after it).
    ``--kill-at anywhere``: the victim marks step 1 and trains on (with validation); the test kills it
    some time later, wherever it is; it waits at the end of training so that it dies during training.
    """

    def _mark_and_sleep(self, trainer):
        with open(os.path.join(A.out, "victim_at_step"), "w") as f:
            f.write(str(trainer.global_step))
        time.sleep(120)  # killed (or stopped) here

    def on_train_batch_end(self, trainer, pl_module, *args):
        if A.kill_at == "step" and trainer.global_rank == A.victim and trainer.global_step == A.kill_step:
            self._mark_and_sleep(trainer)
        if A.kill_at == "anywhere" and trainer.global_rank == A.victim and trainer.global_step == 1:
            with open(os.path.join(A.out, "victim_at_step"), "w") as f:
                f.write("1")  # the test kills this rank some time later, wherever it is then

    def on_train_end(self, trainer, pl_module):
        if A.kill_at == "anywhere" and trainer.global_rank == A.victim:
            time.sleep(120)  # never past the end of training: it dies during training, as the test wants

    def on_train_epoch_end(self, trainer, pl_module):
        if A.kill_at == "epoch_end" and trainer.global_rank == A.victim and trainer.current_epoch == 0:
            self._mark_and_sleep(trainer)

    def on_validation_start(self, trainer, pl_module):
        if A.kill_at == "validation" and trainer.global_rank == A.victim and trainer.current_epoch == 0:
            self._mark_and_sleep(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if A.kill_at == "step" and trainer.global_rank != A.victim and trainer.global_step == A.kill_step + 1:
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(A.out, "killed")) and time.monotonic() < deadline:
                time.sleep(0.02)
            reducer = trainer.strategy.reducer
            if trainer.global_rank == trainer.strategy.plan.parent(A.victim):
                while A.victim not in reducer.dead and reducer.error is None and time.monotonic() < deadline:
                    time.sleep(0.02)


def sc_fault(name):
    EarlyStopping, ModelCheckpoint = pl.callbacks.EarlyStopping, pl.callbacks.ModelCheckpoint

    rank = env_rank()
    validate = A.kill_at in ("validation", "anywhere")
    strategy = CodedReduceStrategy(branching=A.branching, stragglers=A.stragglers, timeout=A.timeout,
                                   global_batch_size="plan")  # the step counts these scenarios were written for
    monitor = StragglerMonitor(os.path.join(A.out, "monitor"), stale_s=1.0, merge_timeout=10.0, summary=False)
    ckpt = ModelCheckpoint(dirpath=os.path.join(A.out, "ckpt"), save_last=True, save_top_k=1)
    callbacks = [_Fault(), monitor, ckpt] + ([EarlyStopping("val_loss", patience=100)] if validate else [])
    model = Net(step_delay=0.02)
    trainer = pl.Trainer(strategy=strategy, max_epochs=A.epochs, callbacks=callbacks,
                         **trainer_kw(enable_checkpointing=True))
    t0 = time.time()
    try:
        trainer.fit(model, loader(n=A.n), loader(n=16) if validate else None)
        trainer.save_checkpoint(os.path.join(A.out, "final.ckpt"))  # after fit: rank 0 writes, no barrier hangs
    except BaseException as err:  # noqa: BLE001 - recorded for the test, then this rank exits non-zero
        write(name, rank, {"rank": rank, "error_type": type(err).__name__, "error": str(err), "t_error": time.time(),
                           "t0": t0, "traceback": traceback.format_exc()})
        sys.stdout.flush()
        sys.exit(1)
    write(name, trainer.global_rank, result(
        trainer, model, error_type=None,
        known_dead=sorted(strategy.known_dead), best=ckpt.best_model_path, last=ckpt.last_model_path,
        t_end=time.time(), metrics={k: float(v) for k, v in trainer.callback_metrics.items()}))


def main():
    global A
    p = argparse.ArgumentParser()
    p.add_argument("--scenarios", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--by-name", action="store_true", help='strategy="codedreduce" instead of an instance')
    p.add_argument("--branching", type=int, default=3)
    p.add_argument("--stragglers", type=int, default=1)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--victim", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=2)
    p.add_argument("--kill-at", choices=("step", "epoch_end", "validation", "anywhere"), default="step")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n", type=int, default=40)
    A = p.parse_args()
    os.makedirs(A.out, exist_ok=True)
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    for name in A.scenarios.split(","):
        globals()["sc_" + name](name)


if __name__ == "__main__":
    main()
