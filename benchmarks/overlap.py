"""Communication overlapped with backward: the balanced layout's buckets (``bucket_cap_mb``) in one run.

A stack of linear layers (about 25 MB of gradients) whose backward takes emulated compute: each layer's
backward sleeps its share of the compute (the GIL is released, as in a real kernel), so gradients
appear over time as in a real backward. Per setting the script measures the median step time and the
rank's compute (``step_records``' ``compute_s``: its forward and backward passes) after a warm-up:

1. communication alone, per tolerance (s=1: the coded reduce; s=0: gloo's ring all-reduce, DDP's too):
   the step without emulated compute and without buckets, less the real forward/backward in it;
2. each rank's compute per step set to its tolerance's communication (or ``--compute``; at DDP's global
   batch an s=1 rank computes R pieces, each taking 1/R of it): s=1 without overlap
   (``bucket_cap_mb=0``), with the default buckets (25 MiB, the first 1 MiB) and with 1 MiB buckets;
3. s=0 without and with the default buckets (all-reduced bucket by bucket as DDP's; where
   ``stragglers="auto"`` starts);
4. ``strategy="ddp"`` at s=0's compute, for reference.

It prints each step time over ``max(compute, communication)`` (1.0 is perfect overlap; the target is
<= 1.3) and writes ``runs/bench/overlap.json``.

    .venv/bin/python benchmarks/overlap.py                 # W=4, loopback
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(a: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import pytorch_lightning as pl
    from lightning_codedreduce import CodedReduceStrategy

    torch.set_num_threads(1)
    per_layer = a.compute / a.layers

    class SlowBackward(torch.autograd.Function):  # identity forward; backward takes emulated compute
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            time.sleep(per_layer)
            return grad

    class Stack(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(a.width, a.width) for _ in range(a.layers))

        def training_step(self, batch, batch_idx):
            x, y = batch
            for layer in self.layers:
                x = torch.tanh(layer(SlowBackward.apply(x)))
            return torch.nn.functional.mse_loss(x, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    class Clock(pl.Callback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_train_batch_start(self, *args):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            self.times.append(time.perf_counter() - self.t0)

    clock = Clock()
    n = a.world * a.batch * a.steps
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, a.width, generator=g), torch.randn(n, a.width, generator=g))
    strategy = "ddp" if a.setting == "ddp" else CodedReduceStrategy(layout="balanced", bucket_cap_mb=a.bucket,
                                                                    stragglers=a.stragglers)
    trainer = pl.Trainer(accelerator="cpu", devices=a.world, strategy=strategy, max_steps=a.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock])
    trainer.fit(Stack(), DataLoader(data, batch_size=a.batch))
    if trainer.global_rank == 0:
        records = getattr(trainer.strategy, "step_records", [])
        Path(a.out, f"{a.setting}.json").write_text(json.dumps({
            "step_s": statistics.median(clock.times[a.warmup:]),
            "compute_s": statistics.median([r["compute_s"] for r in records[a.warmup:]]) if records else None,
            "early_buckets": statistics.median([r["early_buckets"] for r in records]) if records else None}))


def measure(a: argparse.Namespace, out: Path, setting: str, compute: float, bucket: float, stragglers: int = 1) -> dict:
    from lightning_codedreduce._procs import run

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = run([([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.world}",
                 __file__, "--setting", setting, "--out", str(out), "--world", str(a.world), "--batch", str(a.batch),
                 "--width", str(a.width), "--layers", str(a.layers), "--steps", str(a.steps),
                 "--warmup", str(a.warmup), "--compute", str(compute), "--bucket", str(bucket),
                 "--stragglers", str(stragglers)], env)],
              out, timeout=900, label=f"overlap {setting}", log_names=[f"{setting}.log"])
    if res.failed:
        sys.exit(f"overlap {setting}: torchrun exited {res.returncodes[0]}:\n{res.tails()}")
    return json.loads((out / f"{setting}.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6, help="linear layers of width x width (6 x 4 MiB: 25 MB)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--compute", type=float, default=None,
                   help="each rank's emulated backward compute per step (default: its tolerance's communication)")
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)  # set in the ranks
    p.add_argument("--bucket", type=float, default=25.0, help=argparse.SUPPRESS)
    p.add_argument("--stragglers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.setting:
        return worker(a)
    out = Path(tempfile.mkdtemp(prefix="codedreduce-overlap-"))
    from lightning_codedreduce.plan import CodedReducePlan

    redundancy = {1: CodedReducePlan(a.world, 3, 1, layout="balanced").redundancy, 0: 1.0}
    comm = {}  # per tolerance: the step without emulated compute, less the real forward/backward in it
    for stragglers in (1, 0):
        alone = measure(a, out, f"s{stragglers}_communication", 0.0, 0.0, stragglers)
        comm[stragglers] = alone["step_s"] - alone["compute_s"]
    rows = {"communication_s1": comm[1], "communication_s0": comm[0]}
    print(f"W={a.world}, {a.layers} x Linear({a.width}, {a.width}) "
          f"({a.layers * (a.width + 1) * a.width * 4 / 1e6:.1f} MB of gradients), loopback; communication alone "
          f"{comm[1]:.3f} s/step at s=1 (R {redundancy[1]:g}), {comm[0]:.3f} at s=0 (gloo's ring, DDP's too); each "
          f"rank's backward compute per step set to its tolerance's communication"
          f"{'' if a.compute is None else f' (--compute {a.compute:g} s)'}", flush=True)
    ring_compute = None  # DDP computes what s=0 does (one piece per rank): its compute is s=0's
    for setting, bucket, stragglers in (("no_overlap", 0.0, 1), ("buckets_25", 25.0, 1), ("buckets_1", 1.0, 1),
                                        ("s0_no_overlap", 0.0, 0), ("s0_buckets_25", 25.0, 0), ("ddp", 25.0, 0)):
        target = comm[stragglers] if a.compute is None else a.compute
        # a rank computes R pieces per step at DDP's global batch: each piece's backward sleeps its part
        r = measure(a, out, setting, target / redundancy[stragglers], bucket, stragglers)
        compute = r["compute_s"] if r["compute_s"] is not None else ring_compute
        ring_compute = compute if stragglers == 0 else ring_compute
        bound = max(compute, comm[stragglers])
        rows[setting] = {"step_s": r["step_s"], "compute_s": compute, "bound_s": bound}
        early = "" if r["early_buckets"] is None else f", {r['early_buckets']:.0f} bucket(s) handed in during backward"
        print(f"  {setting:14s} {r['step_s']:.3f} s/step, compute {compute:.3f} s: {r['step_s'] / bound:.2f} x "
              f"max(compute, communication){early}", flush=True)
    path = ROOT / "runs" / "bench" / "overlap.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"world": a.world, **rows}, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
