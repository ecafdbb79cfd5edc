"""One rank of the demo: a small MLP on a generated 10-class problem, trained with Lightning.

Launched by ``examples/demo.py`` as W processes, e.g.::

    python -m torch.distributed.run --standalone --nproc_per_node=7 examples/train.py \\
        --strategy codedreduce --straggler 4 --factor 3 --out runs/demo/codedreduce

Rank 0 writes ``<out>/progress.jsonl`` while training and ``<out>/result.json`` at the end (step times,
loss curve on a held-out set from parameter snapshots -- evaluated after training so that measuring
costs nothing during the timed steps --, final loss, global batch, the plan's redundancy); every rank's
``StragglerMonitor`` writes ``<out>/stragglers/rank<r>.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

import lightning_codedreduce  # noqa: F401  (registers strategy="codedreduce")
from lightning_codedreduce.callbacks import StragglerInjector, StragglerMonitor


def make_data(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs N(0, I); labels from a fixed random teacher network, 5 % flipped (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 64, generator=g) / dim ** 0.5
    w2 = torch.randn(64, classes, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(n, generator=g) < 0.05
    y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    return x, y


class MLP(pl.LightningModule):
    def __init__(self, dim: int, hidden: int, classes: int, lr: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Recorder(pl.Callback):
    """Rank 0: step-end times, parameter snapshots every ``every`` steps, a progress file."""

    def __init__(self, out: str, every: int):
        self.out, self.every = out, every
        self.times: list[float] = []
        self.snapshots: list[tuple[int, float, dict]] = []
        self.t0 = None

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            self.progress = open(os.path.join(self.out, "progress.jsonl"), "w")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.t0 is None:
            self.t0 = time.monotonic()
            if trainer.global_rank == 0:
                self._snap(trainer, pl_module, 0.0)

    def _snap(self, trainer, pl_module, t):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.snapshots.append((int(trainer.global_step), t, state))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank != 0:
            return
        t = time.monotonic() - self.t0
        self.times.append(t)
        step = int(trainer.global_step)
        if step % self.every == 0 or step == trainer.max_steps:
            self._snap(trainer, pl_module, t)
        if step % 10 == 0:
            self.progress.write(json.dumps({"step": step, "t": round(t, 3)}) + "\n")
            self.progress.flush()

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            self.progress.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=["ddp", "codedreduce"], required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=128, help="samples per rank per step (the DataLoader batch_size)")
    p.add_argument("--straggler", type=int, default=-1, help="rank slowed by StragglerInjector.paper (-1: none)")
    p.add_argument("--factor", type=float, default=3.0, help="the straggler runs this many times slower")
    p.add_argument("--branching", type=int, default=6)
    p.add_argument("--tolerance", type=int, default=1, help="stragglers tolerated per parent (s)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--samples", type=int, default=65536)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot-every", type=int, default=5)
    p.add_argument("--timeout", type=float, default=30.0, help="codedreduce: seconds before a silent peer is dead")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))

    pl.seed_everything(a.seed, verbose=False)
    x, y = make_data(a.samples + 8192, a.dim, 10, seed=1234)
    train = TensorDataset(x[:a.samples], y[:a.samples])
    x_eval, y_eval = x[a.samples:], y[a.samples:]
    loader = DataLoader(train, batch_size=a.batch, shuffle=True, drop_last=True)
    model = MLP(a.dim, a.hidden, 10, a.lr)

    if a.strategy == "codedreduce":
        from lightning_codedreduce.strategy import CodedReduceStrategy
        strategy = CodedReduceStrategy(branching=a.branching, stragglers=a.tolerance, timeout=a.timeout)
    else:
        strategy = "ddp"
    recorder = Recorder(a.out, a.snapshot_every)
    callbacks = [StragglerMonitor(os.path.join(a.out, "stragglers"), summary=False), recorder]
    if a.straggler >= 0:
        callbacks.append(StragglerInjector.paper(ranks=[a.straggler], factor=a.factor))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, num_nodes=1, strategy=strategy, max_steps=a.steps,
                         logger=CSVLogger(a.out, name="", version="logs"), callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=10, num_sanity_val_steps=0)
    trainer.fit(model, loader)

    if trainer.global_rank != 0:
        return
    curve = []
    with torch.no_grad():
        for step, t, state in recorder.snapshots:
            model.load_state_dict(state)
            loss = nn.functional.cross_entropy(model.net(x_eval), y_eval).item()
            curve.append((step, t, loss))
    times = recorder.times
    warm = min(10, len(times) // 4)
    steps_per_s = (len(times) - 1 - warm) / (times[-1] - times[warm]) if len(times) > warm + 1 else float("nan")
    plan = getattr(trainer.strategy, "plan", None)
    world = trainer.world_size
    result = {
        "strategy": a.strategy, "world_size": world, "steps": len(times), "per_rank_batch": a.batch,
        "global_batch": int(getattr(trainer.strategy, "global_batch_size", None) or a.batch * world),
        "redundancy": float(plan.redundancy) if plan is not None else 1.0,
        "plan": plan.describe() if plan is not None else None,
        "steps_per_s": steps_per_s, "train_s": times[-1], "curve": curve, "final_loss": curve[-1][2],
        "straggler": a.straggler, "factor": a.factor,
    }
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
