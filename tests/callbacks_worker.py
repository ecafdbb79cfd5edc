"""One rank of a short Lightning run with StragglerMonitor and StragglerInjector (for test_callbacks.py).

The monitor uses its default directory, ``<trainer.log_dir>/stragglers`` (a CSVLogger under --out).
"""
import argparse
import os
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_codedreduce  # noqa: E402,F401  (registers "codedreduce")
from lightning_codedreduce.callbacks import StragglerInjector, StragglerMonitor  # noqa: E402
from lightning_codedreduce.strategy import strategy_class  # noqa: E402
from lit_common import lightning  # noqa: E402

pl = lightning()
CSVLogger = pl.loggers.CSVLogger


def make_dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, torch.tanh(x @ torch.randn(6, 1, generator=g)))


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="codedreduce")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--delay", default="", help="rank:seconds[,rank:seconds...]")
    p.add_argument("--timeout", type=float, default=None, help="codedreduce: seconds before a silent peer is dead")
    p.add_argument("--auto", action="store_true", help="codedreduce: stragglers='auto', a decision every 2 steps")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    world = int(os.environ["WORLD_SIZE"])
    delays = {}
    for item in filter(None, a.delay.split(",")):
        r, s = item.split(":")
        delays[int(r)] = float(s)
    strategy = a.strategy
    if a.strategy == "codedreduce" and a.timeout is not None:
        strategy = strategy_class(pl.__name__)(timeout=a.timeout)
    if a.auto:
        strategy = strategy_class(pl.__name__)(stragglers="auto", adapt_every=2, adapt_patience=1)
    monitor = StragglerMonitor(plot=True, stale_s=5.0)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=a.steps,
                         logger=CSVLogger(a.out, name="lg", version=0), log_every_n_steps=1,
                         callbacks=[StragglerInjector(delays=delays), monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(Net(), DataLoader(make_dataset(400), batch_size=4, shuffle=True))


if __name__ == "__main__":
    main()
