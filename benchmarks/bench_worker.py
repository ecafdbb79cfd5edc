"""One rank of the benchmark: runs the cells the harness planned, as plain PyTorch training loops.

    python benchmarks/bench_worker.py --config CONFIG.json     (started by benchmarks/harness.py)

One launch runs these schemes in the same processes, cell after cell (so ratios come from one run):
torch.distributed (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, gloo) for CodedReduce, the uncoded
tree, GC and DDP. Horovod and the Horovod-API port run as a real Horovod script (``hvd_script.py``),
launched by the harness once per cell.

Per step a computing rank: waits out its emulated compute time (the workload's per-step compute on
a dedicated machine, scaled by its sample count, plus straggler delays; ``emulation.py``), then runs
the real forward and backward pass, then aggregates. A CodedReduce/GC rank that lags applies results it missed
without computing (``reducer.ready``). Each rank writes one JSON per cell with per-step times.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.emulation import EmulatedCompute, net_bytes, sleep_until  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    ADAPT_EVERY, SCRIPT_KINDS, WORKLOADS, Scheme, StragglerSpec, Stragglers, build_model, global_batch, layout,
    per_sample_loss, scheme_plan)
from lightning_codedreduce.adapt import PlanAdvisor  # noqa: E402
from lightning_codedreduce.engine import AdaptiveReducer, CodedReducer  # noqa: E402
from lightning_codedreduce.engine.transport import TAG  # noqa: E402


class TorchComm:
    def __init__(self):
        dist.init_process_group("gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def barrier(self):
        dist.barrier()

    def bcast(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, 0)
        return float(t)

    def close(self):
        dist.destroy_process_group()


def adaptive_reducer(plan, global_batch: int, message_bytes: int, timeout: float, tag: int) -> AdaptiveReducer:
    """The auto scheme's reducer: each plan's on a private gloo group (opened collectively at a switch)."""
    advisor = PlanAdvisor(plan.world_size, branching=plan.branching, layouts=("tree", "balanced"),
                          chunk_bytes=plan.chunk_bytes, message_bytes=message_bytes, global_batch=global_batch)
    return AdaptiveReducer(plan, advisor, lambda p, start: CodedReducer(
        p, timeout=timeout, start_step=start, tag=tag, group=dist.new_group(backend="gloo"), owns_group=True),
        every=ADAPT_EVERY)


def shares(plan, rank: int, global_batch: int) -> tuple[np.ndarray, torch.Tensor]:
    """This rank's positions of the global batch under ``plan`` and their code weights."""
    shards = plan.shards(rank, global_batch) if any(plan.allocation(global_batch)[rank]) else []
    pos = np.array([p for sh in shards for p in range(sh.start, sh.stop)], dtype=np.int64)
    return pos, torch.tensor([sh.weight for sh in shards for _ in range(len(sh))], dtype=torch.float32)


def run_cell(cell: dict, comm, data: dict, cfg: dict, index: int) -> dict:
    rank, world = comm.rank, comm.world
    name = cell["workload"]
    wl = WORKLOADS[name]
    scheme = Scheme(**cell["scheme"])
    spec = StragglerSpec(**cell["straggler"])
    lay = layout(scheme, world, wl["per_rank_batch"], cell.get("batch", "per-rank"))
    B = lay.global_batch
    compute_s = {r: cfg["compute_s"][name] * lay.samples(r) / wl["per_rank_batch"] for r in range(world)}
    X, Y = data[name]
    n = X.shape[0]
    seed = cfg["seed"]
    steps = cell["steps"]
    model = build_model(name)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    opt = torch.optim.SGD(params, lr=wl["lr"])
    coded = scheme.kind in ("coded", "gc")
    reducer = None
    if scheme.kind in SCRIPT_KINDS:
        raise ValueError(f"{cell['id']}: {scheme.kind} cells run benchmarks/hvd_script.py, not this worker")
    if scheme.adaptive:
        reducer = adaptive_reducer(scheme_plan(scheme, world), B, numel * 4, cfg["engine_timeout"], TAG + 1 + index)
    elif coded:
        reducer = CodedReducer(scheme_plan(scheme, world), timeout=cfg["engine_timeout"], tag=TAG + 1 + index)
    pos = np.asarray(lay.positions[rank], dtype=np.int64)
    weights = torch.tensor(lay.weights[rank], dtype=torch.float32)
    zeros = [torch.zeros_like(p) for p in params]
    comm.barrier()
    t0 = comm.bcast(time.monotonic() + 0.3)
    strag = Stragglers(spec, world, compute_s, seed=seed + 1000 * cell.get("rep", 0), t0=t0)
    emu = EmulatedCompute(strag, rank, compute_s[rank])
    sleep_until(t0)
    cpu0 = time.process_time()
    rx0, tx0 = net_bytes()
    recs = []
    for step in range(steps):
        rec = {"step": step}
        base = None
        if scheme.adaptive:  # this step's plan: its shares, and compute in proportion
            reducer.begin(step)
            pos, weights = shares(reducer.plan, rank, B)
            base = cfg["compute_s"][name] * pos.size / wl["per_rank_batch"]
            rec["R"] = reducer.plan.redundancy
        if reducer is not None and reducer.ready(step):  # reduced without us: apply, don't compute
            rec["t_in"] = time.monotonic()
            grads = torch.split(reducer.result(step), [p.numel() for p in params])
            rec["skipped"] = True
            rec["t_out"] = time.monotonic()
        else:
            rec.update(emu.wait(step, base))
            c0 = time.monotonic()
            opt.zero_grad()
            if pos.size:
                idx = global_batch(n, B, seed, step)[pos]
                x = torch.from_numpy(np.ascontiguousarray(X[idx]))
                y = torch.from_numpy(np.ascontiguousarray(Y[idx]))
                per = per_sample_loss(name, model, x, y)
                loss = (per * weights).sum() if coded else per.mean()
                loss.backward()
            c1 = time.monotonic()
            emu.ran(rec, c1 - c0, c1)
            rec["t_in"] = time.monotonic()
            if coded:
                grads = reducer.reduce(step, [p.grad for p in params] if pos.size else zeros)
            else:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                grads = torch.split(flat, [p.numel() for p in params])
            rec["t_out"] = time.monotonic()
        if scheme.adaptive:
            reducer.end(step, rec["c1"] - rec["start"] if "c1" in rec else None, int(pos.size))
        scale = B if coded else world
        for p, g in zip(params, grads):
            p.grad = g.view_as(p) / scale
        opt.step()
        rec["t_done"] = time.monotonic()
        recs.append(rec)
    rx1, tx1 = net_bytes()
    engine = []
    drained = 0
    decisions: list[dict] = []  # the auto scheme's plan switches
    if reducer is not None:
        reducer.close()
        reducer.wait_for_peers(cfg["engine_timeout"])  # (its process groups go once every neighbour closed too)
        decisions = reducer.decisions if scheme.adaptive else []
        reducer = reducer.reducer if scheme.adaptive else reducer  # (its stats: the last plan's steps)
        drained = reducer.drained
        stats = reducer.stats()
        for s in stats:
            engine.append({"step": s.step, "local_ready": s.local_ready, "sent": s.sent, "result": s.result,
                           "used": list(s.used), "arrivals": {str(k): v for k, v in s.arrivals.items()}})
    checksum = sum(float(p.detach().double().sum()) for p in params)
    out = {"rank": rank, "world": world, "cell": cell["id"], "t0": t0, "global_batch": B, "samples": int(pos.size),
           "compute_s": compute_s[rank], "numel": numel, "records": recs, "engine": engine, "drained": drained,
           "checksum": checksum, "cpu_s": time.process_time() - cpu0,
           "rx_bytes": rx1 - rx0, "tx_bytes": tx1 - tx0, "decisions": decisions,
           "heavy_episodes": [list(e) for e in strag.episodes(recs[-1]["t_done"])] if spec.name == "heavy" and rank == 0 else []}
    comm.barrier()  # everyone finished (lagging ranks caught up) before the next cell starts
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    a = p.parse_args()
    cfg = json.loads(Path(a.config).read_text())
    out_dir = Path(cfg["out_dir"])
    torch.set_num_threads(1)
    comm = TorchComm()
    data = {}
    for name in {c["workload"] for c in cfg["cells"]}:
        data[name] = (np.load(cfg["data"][name][0], mmap_mode="r"), np.load(cfg["data"][name][1], mmap_mode="r"))
    for index, cell in enumerate(cfg["cells"]):
        t = time.monotonic()
        result = run_cell(cell, comm, data, cfg, cell.get("tag", index))
        cell_dir = out_dir / "cells" / cell["id"]
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / f"rank{comm.rank}.json").write_text(json.dumps(result))
        if comm.rank == 0:
            print(f"cell {index + 1}/{len(cfg['cells'])} {cell['id']}: "
                  f"{time.monotonic() - t:.1f} s", flush=True)
    comm.barrier()
    comm.close()


if __name__ == "__main__":
    main()
