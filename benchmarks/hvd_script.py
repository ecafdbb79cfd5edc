"""A Horovod training script, run by the harness with either API: the Horovod baseline and its coded port.

    horovodrun -np 4 -H localhost:4 --gloo python benchmarks/hvd_script.py --api horovod --workload mlp --out DIR
    horovodrun -np 4 -H localhost:4 --gloo python benchmarks/hvd_script.py --api codedreduce --workload mlp --out DIR
    torchrun --standalone --nproc_per_node=4 benchmarks/hvd_script.py --api codedreduce --out DIR

It is written once against Horovod's PyTorch API (``hvd.init``, ``DistributedOptimizer``,
``broadcast_parameters``, ``broadcast_optimizer_state``, collectives), so the baseline is what a Horovod
user runs, and the port differs only where the migration guide says: the import (``--api``) and the
training sampler (``hvd.DistributedSampler(..., batch_size=b)`` when the API has one; torch's
``DistributedSampler`` under ``horovod.torch``).

What makes it a benchmark, shared with the harness's own loops (``bench_worker.py``):

* the data set is the harness's stream of global batches (``GlobalBatchStream``; samplers with
  ``shuffle=False``), so under Horovod every step trains on exactly the global batch every other scheme
  and the replay use (``W x b``), and the coded sampler hands each rank its coded share of that batch;
* per step a rank waits out its emulated compute (``emulation.EmulatedCompute``: its samples at the
  workload's speed plus the straggler model's delay; every rank may straggle, rank 0 included), then runs
  the real forward/backward of its loader batches (one under Horovod, its units under the coded API);
* it writes ``rank<r>.json`` in the harness's per-rank format (``report.cell_metrics`` reads it): per step
  ``start``/``target_end``/``stall``/``real``/``c1`` (compute), ``t_in``/``t_out`` (around the step's closing
  ``optimizer.step()``: the wait for the reduce, and the update), ``t_done``; a step the coded API applied
  without computing it (catch-up) has ``skipped: true``.

The loop steps plainly (``optimizer.step()``, no ``synchronize()``): the coded API lets a lagging rank skip
steps the others already reduced only for such scripts (one that edits the averaged gradient between
``synchronize()`` and ``step()`` could not repeat that edit on a skipped step).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.emulation import EmulatedCompute, net_bytes, sleep_until  # noqa: E402
from benchmarks.hvd_rendezvous import serve_if_needed  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    STRAGGLER_MODELS, WORKLOADS, StragglerSpec, Stragglers, build_model, global_batch, make_data, per_sample_loss)

APIS = {"horovod": "horovod.torch", "codedreduce": "lightning_codedreduce.horovod"}
EVAL_SAMPLES = 1024  # the final loss is measured on the data set's first samples (the same for both APIs)


class GlobalBatchStream(Dataset):
    """Item ``k`` is sample ``k % B`` of global batch ``k // B`` (``workloads.global_batch``: the harness's
    shuffling), returned as ``(x, y, k)``. With ``shuffle=False`` torch's ``DistributedSampler`` hands rank
    ``r`` items ``r, r+W, ...``, so step ``t``'s ``W`` loader batches are exactly global batch ``t``;
    ``hvd.DistributedSampler`` cuts the same block into the ranks' coded units. ``k`` tells the loop which
    step a batch belongs to (the coded API skips whole steps a lagging rank need not compute)."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, global_batch: int, seed: int, steps: int, dtype: torch.dtype):
        self.X, self.Y, self.B, self.seed, self.steps, self.dtype = X, Y, global_batch, seed, steps, dtype

    def __len__(self) -> int:
        return self.steps * self.B

    def __getitem__(self, k: int):
        i = int(global_batch(self.X.shape[0], self.B, self.seed, k // self.B)[k % self.B])
        x = torch.from_numpy(np.array(self.X[i])).to(self.dtype)
        y = torch.from_numpy(np.array(self.Y[i]))
        return x, (y.to(self.dtype) if y.is_floating_point() else y), k


def training_sampler(hvd: ModuleType, dataset: Dataset, batch_size: int):
    """The migration guide's one change besides the import: the coded API's sampler needs the loader's
    ``batch_size`` (a rank computes several ranks' batches per step); Horovod uses torch's."""
    if hasattr(hvd, "DistributedSampler"):
        return hvd.DistributedSampler(dataset, shuffle=False, batch_size=batch_size)
    return torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=hvd.size(), rank=hvd.rank(),
                                                           shuffle=False)


def skipped(step: int, t_in: float, t_done: float) -> dict:
    """The record of a step this rank applied without computing it (the others had reduced it)."""
    return {"step": step, "skipped": True, "t_in": t_in, "t_out": t_done, "t_done": t_done}


def train(hvd: ModuleType, a: argparse.Namespace) -> dict:
    """Train ``a.steps`` steps with ``hvd``'s API; returns this rank's results (the harness's format)."""
    rank, world = hvd.rank(), hvd.size()
    wl = WORKLOADS[a.workload]
    b, dtype = wl["per_rank_batch"], getattr(torch, a.dtype)
    B = world * b
    data_dir = Path(a.data_dir)
    if rank == 0:
        make_data(a.workload, data_dir, a.seed)  # a no-op when the harness made it
    hvd.barrier()
    xp, yp = make_data(a.workload, data_dir, a.seed)
    X, Y = np.load(xp, mmap_mode="r"), np.load(yp, mmap_mode="r")
    dataset = GlobalBatchStream(X, Y, B, a.seed, a.steps, dtype)
    sampler = training_sampler(hvd, dataset, b)
    loader = DataLoader(dataset, batch_size=b, sampler=sampler)

    model = build_model(a.workload).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=wl["lr"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    samples = len(sampler) // a.steps  # per step: b under Horovod, (its units) x b under the coded API
    batches = samples // b
    shares = hvd.allgather_object(samples)
    compute_s = {r: a.compute_s * shares[r] / b for r in range(world)}  # every rank's, for the straggler model
    t0 = float(hvd.broadcast(torch.tensor([time.monotonic() + 0.3], dtype=torch.float64), root_rank=0, name="t0"))
    strag = Stragglers(StragglerSpec.default(a.stragglers), world, compute_s, seed=a.seed, t0=t0)
    emu = EmulatedCompute(strag, rank, compute_s[rank])
    sleep_until(t0)
    cpu0, (rx0, tx0) = time.process_time(), net_bytes()
    recs: list[dict] = []
    rec: dict | None = None  # the step being computed
    last = t0  # when the last step was done
    for x, y, k in loader:
        fetched = time.monotonic()
        if rec is None:  # a step's first batch; steps between were caught up while the loader fetched it
            step = int(k[0]) // B
            recs += [skipped(s, last, fetched) for s in range(len(recs), step)]
            rec, real, seen = {"step": step, **emu.wait(step)}, 0.0, 0
        c0 = time.monotonic()
        optimizer.zero_grad()
        per_sample_loss(a.workload, model, x, y).mean().backward()
        c1 = time.monotonic()
        real, seen = real + (c1 - c0), seen + 1
        t_in = time.monotonic()
        optimizer.step()  # Horovod: its allreduces, then the update; coded: the step's sum after its last batch
        if seen == batches:
            emu.ran(rec, real, c1)
            t_done = time.monotonic()
            rec.update(t_in=t_in, t_out=t_done, t_done=t_done)
            recs.append(rec)
            last, rec = rec["t_done"], None
    recs += [skipped(s, last, time.monotonic()) for s in range(len(recs), a.steps)]
    rx1, tx1 = net_bytes()
    cpu_s = time.process_time() - cpu0
    params = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        n = min(EVAL_SAMPLES, X.shape[0])
        xe = torch.from_numpy(np.array(X[:n])).to(dtype)
        ye = torch.from_numpy(np.array(Y[:n]))
        final_loss = float(per_sample_loss(a.workload, model, xe, ye.to(dtype) if ye.is_floating_point() else ye).mean())
    if a.save_params and rank == 0:
        np.save(Path(a.out) / "params.npy", params.numpy())
    return {"rank": rank, "world": world, "cell": a.cell, "api": a.api, "t0": t0, "global_batch": B,
            "samples": samples, "compute_s": compute_s[rank], "numel": int(params.numel()), "records": recs,
            "engine": [], "drained": 0, "decisions": [], "checksum": float(params.sum()), "final_loss": final_loss,
            "skipped_steps": sum(1 for r in recs if r.get("skipped")), "cpu_s": cpu_s, "rx_bytes": rx1 - rx0,
            "tx_bytes": tx1 - tx0, "dtype": a.dtype,
            "heavy_episodes": [list(e) for e in strag.episodes(recs[-1]["t_done"])]
            if a.stragglers == "heavy" and rank == 0 else []}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", choices=sorted(APIS), default="horovod",
                   help="horovod: import horovod.torch; codedreduce: import lightning_codedreduce.horovod")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--stragglers", choices=STRAGGLER_MODELS, default="none",
                   help="straggler model (lightning_codedreduce/sim.py); every computing rank may straggle, rank 0 too")
    p.add_argument("--seed", type=int, default=0, help="data, shuffling and straggler draws (the harness's --seed)")
    p.add_argument("--compute-s", type=float, default=None,
                   help="emulated compute seconds per per-rank batch (default: the workload's)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64: the two APIs agree to rounding, whatever the code's coefficients")
    p.add_argument("--data-dir", default=str(ROOT / "runs" / "bench" / "data"))
    p.add_argument("--out", required=True, help="folder for rank<r>.json (and params.npy)")
    p.add_argument("--cell", default="hvd_script", help="the harness's cell id (recorded)")
    p.add_argument("--save-params", action="store_true", help="rank 0 writes its final parameters to params.npy")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    a.compute_s = WORKLOADS[a.workload]["compute_s"] if a.compute_s is None else a.compute_s
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.api == "horovod":
        serve_if_needed(out / "hvd_rendezvous_port")  # only where the harness placed the ranks itself
    hvd = importlib.import_module(APIS[a.api])
    hvd.init()
    torch.set_num_threads(1)  # Horovod: limit the CPU threads per worker
    result = train(hvd, a)
    (out / f"rank{hvd.rank()}.json").write_text(json.dumps(result))
    hvd.barrier()
    if hvd.rank() == 0:
        steps = result["records"]
        mean = (steps[-1]["t_done"] - steps[0]["t_done"]) / max(1, len(steps) - 1)
        print(f"{a.cell}: {a.api}, {len(steps)} steps, {mean * 1e3:.1f} ms/step (rank 0)", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
