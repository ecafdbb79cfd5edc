"""Communication overlapped with backward: the balanced layout's buckets (``bucket_cap_mb``) in one run.

A stack of linear layers (about 25 MB of gradients) whose backward takes emulated compute: each layer's
backward sleeps ``compute / layers`` seconds (the GIL is released, as in a real kernel), so gradients
appear over time as in a real backward. Per setting the script measures the median step time after a
warm-up:

1. ``communication``: no emulated compute, the whole gradient after backward (``bucket_cap_mb=0``);
2. with ``compute`` set to that communication time (or ``--compute``): no overlap (``bucket_cap_mb=0``),
   and the default buckets (``bucket_cap_mb=25``, first bucket 1 MiB), and 1 MiB buckets;
3. the same with ``stragglers=0`` (gloo's ring all-reduce, bucket by bucket as DDP's; where
   ``stragglers="auto"`` starts), without and with the default buckets;
4. ``strategy="ddp"`` at the same compute, for reference.

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
    p.add_argument("--compute", type=float, default=None, help="backward compute per step (default: communication)")
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)  # set in the ranks
    p.add_argument("--bucket", type=float, default=25.0, help=argparse.SUPPRESS)
    p.add_argument("--stragglers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.setting:
        return worker(a)
    out = Path(tempfile.mkdtemp(prefix="codedreduce-overlap-"))
    comm = measure(a, out, "communication", 0.0, 0.0)["step_s"]
    ring = measure(a, out, "s0_communication", 0.0, 0.0, stragglers=0)["step_s"]  # gloo's all-reduce, as DDP's
    compute = comm if a.compute is None else a.compute
    rows = {"communication": comm, "s0_communication": ring}
    print(f"W={a.world}, {a.layers} x Linear({a.width}, {a.width}) "
          f"({a.layers * (a.width + 1) * a.width * 4 / 1e6:.1f} MB of gradients), loopback; "
          f"communication alone {comm:.3f} s/step (s=1), {ring:.3f} (s=0, gloo's ring); "
          f"backward compute {compute:.3f} s/step", flush=True)
    for setting, bucket, stragglers in (("no_overlap", 0.0, 1), ("buckets_25", 25.0, 1), ("buckets_1", 1.0, 1),
                                        ("s0_no_overlap", 0.0, 0), ("s0_buckets_25", 25.0, 0), ("ddp", 25.0, 1)):
        r = measure(a, out, setting, compute, bucket, stragglers)
        rows[setting] = r["step_s"]
        bound = max(compute, ring if stragglers == 0 or setting == "ddp" else comm)  # DDP runs gloo's ring too
        early = "" if r["early_buckets"] is None else f", {r['early_buckets']:.0f} bucket(s) handed in during backward"
        print(f"  {setting:14s} {r['step_s']:.3f} s/step = {r['step_s'] / bound:.2f} x max(compute, communication)"
              f"{early}", flush=True)
    path = ROOT / "runs" / "bench" / "overlap.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"world": a.world, "compute_s": compute, **rows}, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
