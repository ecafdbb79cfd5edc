"""One rank of the benchmark: runs the cells the harness planned, as plain PyTorch training loops.

    python benchmarks/bench_worker.py --config CONFIG.json     (started by benchmarks/harness.py)

One launch runs every scheme in the same processes, cell after cell (so ratios come from one run):
torch.distributed (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, gloo) for CodedReduce, the uncoded
tree, GC and DDP, and, when Horovod cells are planned, Horovod as well (``horovodrun --gloo`` started
the processes, or the harness set the same environment inside network namespaces, where rank 0
hosts Horovod's rendezvous server).

Per step a computing rank: waits out its emulated compute time (the workload's per-step compute on
a dedicated machine, scaled by its sample count, plus straggler delays), then runs the real forward
and backward pass, then aggregates. A CodedReduce/GC rank that lags applies results it missed
without computing (``reducer.ready``). Each rank writes one JSON per cell with per-step times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import (  # noqa: E402
    ADAPT_EVERY, WORKLOADS, Scheme, StragglerSpec, Stragglers, build_model, global_batch, layout, per_sample_loss,
    scheme_plan)
from lightning_codedreduce.adapt import PlanAdvisor  # noqa: E402
from lightning_codedreduce.engine import AdaptiveReducer, CodedReducer  # noqa: E402
from lightning_codedreduce.engine.transport import TAG  # noqa: E402


def net_bytes() -> tuple[int, int]:
    """(received, sent) bytes of this process's network namespace, loopback excluded (0 on loopback runs)."""
    rx = tx = 0
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return 0, 0
    for line in lines:
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            continue
        values = fields.split()
        rx, tx = rx + int(values[0]), tx + int(values[8])
    return rx, tx


def sleep_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


class TorchComm:
    def __init__(self):
        if "RANK" not in os.environ and "HOROVOD_RANK" in os.environ:  # started by horovodrun
            os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ["HOROVOD_RANK"], os.environ["HOROVOD_SIZE"]
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


class HvdComm:
    """Horovod in the same processes: ``horovodrun --gloo`` started them, or the harness set the same
    environment (inside network namespaces, where rank 0 then hosts Horovod's rendezvous server)."""

    def __init__(self, out_dir: Path):
        if "HOROVOD_GLOO_RENDEZVOUS_PORT" not in os.environ:  # launched by the harness, not horovodrun
            port_file = out_dir / "hvd_rendezvous_port"
            if int(os.environ["HOROVOD_RANK"]) == 0:
                from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
                from horovod.runner.http.http_server import RendezvousServer

                size = int(os.environ["HOROVOD_SIZE"])
                hosts = ",".join(f"h{i}:1" for i in range(size))
                self.server = RendezvousServer(0)
                port = self.server.start()
                self.server.init(get_host_assignments(parse_hosts(hosts), size))
                port_file.with_suffix(".tmp").write_text(str(port))
                port_file.with_suffix(".tmp").rename(port_file)
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("Horovod rendezvous port not published by rank 0")
                time.sleep(0.05)
            os.environ["HOROVOD_GLOO_RENDEZVOUS_PORT"] = port_file.read_text().strip()
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.world = hvd.rank(), hvd.size()
        self._n = 0

    def barrier(self):
        self._n += 1
        self.hvd.allreduce(torch.zeros(1), name=f"bench.barrier.{self._n}")

    def bcast(self, value: float) -> float:
        self._n += 1
        return float(self.hvd.broadcast(torch.tensor([value], dtype=torch.float64), 0, name=f"bench.bcast.{self._n}"))

    def close(self):
        self.hvd.shutdown()


def adaptive_reducer(plan, global_batch: int, message_bytes: int, timeout: float, tag: int) -> AdaptiveReducer:
    """The auto scheme's reducer: each plan's on a private gloo group (opened collectively at a switch)."""
    advisor = PlanAdvisor(plan.world_size, branching=plan.branching, layouts=("tree", "balanced"),
                          chunk_bytes=plan.chunk_bytes, message_bytes=message_bytes, global_batch=global_batch)
    return AdaptiveReducer(plan, advisor, lambda p, start: CodedReducer(
        p, timeout=timeout, start_step=start, tag=tag, group=dist.new_group(backend="gloo")), every=ADAPT_EVERY)


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
    if scheme.kind == "horovod":
        hvd = cfg["_hvd"].hvd
        opt = hvd.DistributedOptimizer(opt, named_parameters=[(f"c{index}.{k}", p) for k, p in model.named_parameters()])
    elif scheme.adaptive:
        reducer = adaptive_reducer(scheme_plan(scheme, world), B, numel * 4, cfg["engine_timeout"], TAG + 1 + index)
    elif coded:
        reducer = CodedReducer(scheme_plan(scheme, world), timeout=cfg["engine_timeout"], tag=TAG + 1 + index)
    pos = np.asarray(lay.positions[rank], dtype=np.int64)
    weights = torch.tensor(lay.weights[rank], dtype=torch.float32)
    base0 = compute_s[rank]  # the straggler model's delays are multiples of this (heavy: of wall-clock time)
    zeros = [torch.zeros_like(p) for p in params]
    comm.barrier()
    t0 = comm.bcast(time.monotonic() + 0.3)
    strag = Stragglers(spec, world, compute_s, seed=seed + 1000 * cell.get("rep", 0), t0=t0)
    sleep_until(t0)
    cpu0 = time.process_time()
    rx0, tx0 = net_bytes()
    ema = None
    recs = []
    for step in range(steps):
        rec = {"step": step}
        base = base0
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
            start = time.monotonic()
            _, stall = strag.finish(rank, step, start)
            if strag.scales_with_compute(step) and base0 > 0:
                stall *= base / base0  # a slow rank is slow per sample: a smaller share, a shorter delay
            end = start + base + stall
            sleep_until(end - (ema or 0.0))
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
            ema = (c1 - c0) if ema is None else 0.7 * ema + 0.3 * (c1 - c0)
            rec.update(start=start, target_end=end, stall=stall, real=c1 - c0, c1=c1)
            rec["t_in"] = time.monotonic()
            if coded:
                grads = reducer.reduce(step, [p.grad for p in params] if pos.size else zeros)
            elif scheme.kind == "allreduce":
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                grads = torch.split(flat, [p.numel() for p in params])
            else:
                grads = None
                opt.synchronize()  # Horovod: wait for the allreduces started in backward (averaged)
            rec["t_out"] = time.monotonic()
        if scheme.adaptive:
            reducer.end(step, rec["c1"] - rec["start"] if "c1" in rec else None, int(pos.size))
        if scheme.kind == "horovod":
            with opt.skip_synchronize():
                opt.step()
        else:
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
    cfg["_hvd"] = HvdComm(out_dir) if any(c["scheme"]["kind"] == "horovod" for c in cfg["cells"]) else None
    if cfg["_hvd"] is not None and cfg["_hvd"].rank != comm.rank:
        raise RuntimeError(f"Horovod rank {cfg['_hvd'].rank} != torch.distributed rank {comm.rank}")
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
    if cfg["_hvd"] is not None:
        cfg["_hvd"].close()
    comm.close()


if __name__ == "__main__":
    main()
