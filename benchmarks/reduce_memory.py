"""Peak memory of one reduce per rank, above parameters and gradients: tree, balanced, gloo all_reduce.

    python benchmarks/reduce_memory.py                 # W=4, a 400 MB gradient, every layout
    python benchmarks/reduce_memory.py --mb 100 --world 4 --steps 3

Each layout runs in fresh processes (peak RSS is per process): every rank allocates its parameters and
gradient (``--mb`` each), measures its RSS, runs ``--steps`` reduces of the gradient, and reports its
peak RSS (``ru_maxrss``) minus that baseline, in units of the gradient size. DDP's buckets cost about
1x; ``balanced`` with ``in_place=True`` assembles the result in the gradient itself.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_codedreduce._procs import run  # noqa: E402
from lightning_codedreduce._util import free_port  # noqa: E402

LAYOUTS = ("allreduce", "tree", "balanced")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(layout: str, mb: int, steps: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from lightning_codedreduce.engine import CodedReducer
    from lightning_codedreduce.plan import CodedReducePlan

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = mb * 2 ** 20 // 4
    params = torch.zeros(n).add_(1.0)  # touched: resident
    # a value every scheme sums to the same total: all-reduce ranks hand in 1 each (sum W); a coded rank,
    # its weighted share of a W-sample batch (the plan decodes the sum of the batch's weights: W)
    value = 1.0
    reducer = None
    if layout != "allreduce":
        plan = CodedReducePlan(world, 3, 1, layout=layout)
        value = sum(sh.weight * len(sh) for sh in plan.shards(rank, world))
        reducer = CodedReducer(plan, timeout=120)
    grad = torch.full((n,), value)
    dist.barrier()
    base = rss_bytes()
    t0 = time.monotonic()
    for step in range(steps):
        grad.fill_(value)
        if reducer is None:
            dist.all_reduce(grad)
        else:
            reducer.reduce(step, grad, in_place=True)
        params.add_(grad, alpha=-1e-9)
    seconds = (time.monotonic() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if reducer is not None:
        reducer.close()
    (out / f"rank{rank}.json").write_text(json.dumps({"base": base, "peak": peak, "step_s": seconds,
                                                      "grad_bytes": n * 4, "check": float(grad[0])}))
    dist.barrier()
    os._exit(0)


def measure(layout: str, world: int, mb: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        port = str(free_port())
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmds = [([sys.executable, __file__, "--worker", layout, "--mb", str(mb), "--steps", str(steps), "--out", tmp],
                 {**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
        res = run(cmds, out / "logs", timeout=600, stop_on_failure=True, failure_grace=2.0)
        if res.failed:
            raise RuntimeError(f"{layout}: ranks {res.failed} failed:\n{res.tails()}")
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    grad = ranks[0]["grad_bytes"]
    excess = [(d["peak"] - d["base"]) / grad for d in ranks]
    expected = float(world)
    return {"layout": layout, "world": world, "grad_mb": grad / 2 ** 20, "max_excess_x_grad": max(excess),
            "mean_excess_x_grad": sum(excess) / world, "step_s": max(d["step_s"] for d in ranks),
            "exact": all(abs(d["check"] - expected) < 1e-4 * expected for d in ranks)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--mb", type=int, default=400, help="gradient size in MiB (float32)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--worker", choices=LAYOUTS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.mb, a.steps, Path(a.out))
        return
    print(f"W={a.world}, {a.mb} MiB float32 gradient, {a.steps} reduces, loopback: peak RSS above parameters + "
          "gradient, per rank, in gradient sizes")
    print(f"{'layout':10} {'max x grad':>10} {'mean x grad':>11} {'s/reduce':>9} exact")
    for layout in a.layouts:
        r = measure(layout, a.world, a.mb, a.steps)
        print(f"{r['layout']:10} {r['max_excess_x_grad']:10.2f} {r['mean_excess_x_grad']:11.2f} {r['step_s']:9.2f} "
              f"{r['exact']}", flush=True)


if __name__ == "__main__":
    main()
