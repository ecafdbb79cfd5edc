"""Peak memory per rank of a training step, ``strategy="ddp"`` against ``strategy="codedreduce"``.

A model whose activations dominate (a wide MLP, small parameters, a large per-rank batch): DDP keeps one
batch of activations; CodedReduce's ranks compute about ``R x batch_size`` samples per step, in pieces of
at most ``batch_size``, so their peak should stay close to DDP's. Each rank reports the growth of its
resident memory from the ``setup`` hook (the model built, before the strategy wraps it: DDP's buckets and
the reduce's buffers both count) to the peak of ``fit``; the script prints the per-rank numbers and the
ratio of the largest ones.

Two allocator settings, each for every strategy: glibc's default raises its mmap threshold as large blocks
are freed, after which freed activations stay in the heap and the peak RSS depends on the order of
allocations more than on what is live (it varies by rank and run, DDP's included); with
``MALLOC_MMAP_THRESHOLD_`` pinned, every large tensor is mapped and unmapped, and RSS follows live memory.

    .venv/bin/python benchmarks/memory.py            # W=4, batch 512, 6 blocks 8192 -> 64 -> 8192 (4 M parameters)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(a: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_codedreduce  # noqa: F401
    import pytorch_lightning as pl

    class Wide(pl.LightningModule):
        def __init__(self):
            super().__init__()
            layers = [torch.nn.Linear(64, a.width), torch.nn.ReLU()]
            for _ in range(a.layers - 1):
                layers += [torch.nn.Linear(a.width, a.bottleneck), torch.nn.ReLU(),
                           torch.nn.Linear(a.bottleneck, a.width), torch.nn.ReLU()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(a.width, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Measure(pl.Callback):
        def setup(self, trainer, module, stage):
            self.start = rss_mb()

        def on_train_end(self, trainer, module):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            Path(a.out, f"{a.strategy}.rank{trainer.global_rank}.json").write_text(json.dumps(
                {"start_mb": self.start, "peak_mb": peak, "growth_mb": peak - self.start,
                 "redundancy": getattr(getattr(trainer.strategy, "plan", None), "redundancy", 1.0)}))

    g = torch.Generator().manual_seed(0)
    n = a.world * a.batch * a.steps
    data = TensorDataset(torch.randn(n, 64, generator=g), torch.randn(n, 1, generator=g))
    strategy = a.strategy
    if strategy == "codedreduce-plan":  # the plan-derived global batch: one piece of about batch_size per rank
        from lightning_codedreduce import CodedReduceStrategy

        strategy = CodedReduceStrategy(global_batch_size="plan")
    trainer = pl.Trainer(accelerator="cpu", devices=a.world, strategy=strategy, max_steps=a.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Measure()])
    trainer.fit(Wide(), DataLoader(data, batch_size=a.batch, shuffle=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--bottleneck", type=int, default=64, help="narrow layers between the wide ones (few parameters)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--strategy", default=None, help=argparse.SUPPRESS)  # set in the ranks
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.strategy:
        return worker(a)
    from lightning_codedreduce._procs import run

    print(f"W={a.world}, batch_size={a.batch}, MLP {a.layers} blocks {a.width} -> {a.bottleneck} -> {a.width}; "
          "RSS growth per rank from setup to the peak of fit")
    strategies = ("ddp", "codedreduce", "codedreduce-plan")
    for allocator, extra in (("MALLOC_MMAP_THRESHOLD_ pinned: RSS follows live memory", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
                             ("glibc default", {})):
        out = Path(tempfile.mkdtemp(prefix="codedreduce-memory-"))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
        for strategy in strategies:  # torchrun starts the ranks; stopped with all of them on timeout or Ctrl-C
            res = run([([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.world}",
                         __file__, "--strategy", strategy, "--out", str(out), "--world", str(a.world),
                         "--batch", str(a.batch), "--width", str(a.width), "--layers", str(a.layers),
                         "--bottleneck", str(a.bottleneck), "--steps", str(a.steps)], env)],
                      out, timeout=900, label=f"memory {strategy}", log_names=[f"{strategy}.log"])
            if res.failed:
                sys.exit(f"memory {strategy}: torchrun exited {res.returncodes[0]}:\n{res.tails()}")
        reports = {s: [json.loads((out / f"{s}.rank{r}.json").read_text()) for r in range(a.world)] for s in strategies}
        growth = {s: [rep["growth_mb"] for rep in reps] for s, reps in reports.items()}
        print(f"{allocator}:")
        for s, values in growth.items():
            print(f"  {s:16s} (R = {reports[s][0]['redundancy']:.2f}) " + ", ".join(f"{v:.0f} MB" for v in values))
        for s in strategies[1:]:
            print(f"  peak per rank {s} / ddp = {max(growth[s]) / max(growth['ddp']):.2f} (root: "
                  f"{growth[s][0] / max(growth['ddp']):.2f}, other ranks: "
                  f"{max(growth[s][1:]) / max(growth['ddp']):.2f})")


if __name__ == "__main__":
    main()
