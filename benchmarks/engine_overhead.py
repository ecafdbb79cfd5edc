"""Coded tree reduce vs ``torch.distributed.all_reduce``: same tensors, same processes, same run.

    python benchmarks/engine_overhead.py [--worlds 4 7] [--sizes 1000000 25000000] [--reps 5]

No stragglers, loopback gloo. Prints the ratio of the CodedReducer's time per step (s=0: uncoded
tree; s=1: coded tree; balanced: the balanced layout, s=1, in place) to all_reduce's, the balanced
layout's CPU per step (all ranks together) over all_reduce's, and writes ``runs/bench/engine_overhead.json``.
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

import torch
import torch.distributed as dist

from lightning_codedreduce._procs import run
from lightning_codedreduce._util import free_port
from lightning_codedreduce.engine import CodedReducer
from lightning_codedreduce.engine.transport import TAG
from lightning_codedreduce.plan import CodedReducePlan


def _timed(fn, reps: int) -> tuple[float, float]:
    """Median seconds per call, and CPU seconds per call summed over every rank (every thread of each process:
    on a machine with fewer cores than ranks, CPU is what bounds the step)."""
    times, cpu = [], 0.0
    for _ in range(reps):
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    total = torch.tensor([cpu / reps], dtype=torch.float64)
    dist.all_reduce(total)
    return statistics.median(times), float(total)


def _worker(rank: int, world: int, port: int, sizes: list[int], reps: int, branching: int, rows_path: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reducers = {s: CodedReducer(CodedReducePlan(world, branching, s), tag=TAG + s) for s in (0, 1)}
    reducers["b"] = CodedReducer(CodedReducePlan(world, stragglers=1, layout="balanced"), tag=TAG + 2)
    steps = {0: 0, 1: 0, "b": 0}
    rows = []
    for numel in sizes:
        grad = torch.randn(numel)

        def coded(s):
            if s == "b":
                reducers[s].reduce(steps[s], grad.clone(), in_place=True)
            else:
                reducers[s].reduce(steps[s], grad)
            steps[s] += 1

        for fn in (lambda: dist.all_reduce(grad.clone()), lambda: coded(0), lambda: coded(1), lambda: coded("b")):
            fn()  # warm-up
        row = {"world": world, "numel": numel}
        for name, fn in (("all_reduce", lambda: dist.all_reduce(grad.clone())), ("coded_s0", lambda: coded(0)),
                         ("coded_s1", lambda: coded(1)), ("balanced", lambda: coded("b"))):
            row[f"{name}_s"], row[f"{name}_cpu_s"] = _timed(fn, reps)
        rows.append(row)
    for r in reducers.values():
        r.close()
    if rank == 0:
        rows_path.write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[4, 7])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 25_000_000])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--branching", type=int, default=3)
    p.add_argument("--out", default="runs/bench/engine_overhead.json")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per world size before its ranks are stopped")
    p.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "PORT", "ROWS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:  # one rank, started below
        rank, world, port = map(int, a.worker[:3])
        return _worker(rank, world, port, a.sizes, a.reps, a.branching, Path(a.worker[3]))
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    tmp = tempfile.TemporaryDirectory(prefix="codedreduce-overhead-")
    results = []
    print(f"{'W':>3} {'floats':>11} {'all_reduce':>11} {'coded s=0':>10} {'coded s=1':>10} {'balanced':>10} "
          f"{'s=0 ratio':>9} {'s=1 ratio':>9} {'bal ratio':>9} {'bal CPU':>8} {'R(s=1)':>7} {'R(bal)':>7}")
    for world in a.worlds:
        rows_path, port = Path(tmp.name) / f"W{world}.json", free_port()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--sizes", *map(str, a.sizes), "--reps", str(a.reps),
               "--branching", str(a.branching), "--worker"]
        res = run([(cmd + [str(r), str(world), str(port), str(rows_path)], env) for r in range(world)], tmp.name,
                  a.timeout, stop_on_failure=True, label=f"W={world}",
                  log_names=[f"W{world}.rank{r}.log" for r in range(world)])
        if res.failed:
            sys.exit(f"W={world}: ranks {res.failed} failed:\n{res.tails(res.failed)}")
        rows = json.loads(rows_path.read_text())
        redundancy = CodedReducePlan(world, a.branching, 1).redundancy
        balanced_r = CodedReducePlan(world, stragglers=1, layout="balanced").redundancy
        for row in rows:
            row["ratio_s0"] = row["coded_s0_s"] / row["all_reduce_s"]
            row["ratio_s1"] = row["coded_s1_s"] / row["all_reduce_s"]
            row["ratio_balanced"] = row["balanced_s"] / row["all_reduce_s"]
            row["cpu_ratio_balanced"] = row["balanced_cpu_s"] / row["all_reduce_cpu_s"]
            row["redundancy_s1"], row["redundancy_balanced"] = redundancy, balanced_r
            results.append(row)
            print(f"{world:>3} {row['numel']:>11,} {row['all_reduce_s'] * 1e3:>9.1f}ms {row['coded_s0_s'] * 1e3:>8.1f}ms "
                  f"{row['coded_s1_s'] * 1e3:>8.1f}ms {row['balanced_s'] * 1e3:>8.1f}ms {row['ratio_s0']:>9.2f} "
                  f"{row['ratio_s1']:>9.2f} {row['ratio_balanced']:>9.2f} {row['cpu_ratio_balanced']:>8.2f} "
                  f"{redundancy:>7.2f} {balanced_r:>7.2f}",
                  flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}. Ratios are per-step times against all_reduce measured in the same processes; 'bal CPU' "
          "is the balanced layout's CPU per step, all ranks together, over all_reduce's; redundancy R is compute, "
          "which this benchmark does not include.")


if __name__ == "__main__":
    main()
