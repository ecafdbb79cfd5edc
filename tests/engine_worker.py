"""One rank of a plain-PyTorch training loop on CodedReducer, instrumented for the engine tests.

Linear least squares, ``grad(x) = (theta . x - y) x``, so the float64 full-batch reference is cheap.
Writes ``rank<r>.json`` (result hashes, reference errors, timings, skips, lag, buffers, errors).
"""
import argparse
import datetime
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from lightning_codedreduce.adapt import PlanAdvisor
from lightning_codedreduce.engine import AdaptiveReducer, CodedReduceError, CodedReducer
from lightning_codedreduce.plan import CodedReducePlan


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--s", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--per-rank", type=int, default=8)
    p.add_argument("--compute", type=float, default=0.0, help="seconds of emulated compute per step")
    p.add_argument("--jitter", type=float, default=0.0, help="max random extra delay per step (seeded)")
    p.add_argument("--sleep-once", default="", help="rank:step:seconds")
    p.add_argument("--slow", default="", help="rank:factor (that rank computes factor x longer)")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--gathers", type=int, default=0, help="control collectives after the last step")
    p.add_argument("--gather-victim", type=int, default=-1,
                   help="this rank marks gather_victim and sleeps before its first control collective (to be killed)")
    p.add_argument("--layout", default="tree")
    p.add_argument("--coded-self", default="none", help="CodedReducePlan(coded_self=...)")
    p.add_argument("--jitter-seed", type=int, default=1000)
    p.add_argument("--in-place", action="store_true", help="reduce(..., in_place=True)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--segments", type=int, default=0,
                   help="with --parts: begin() with this many equal segments, last first (the same on every rank)")
    p.add_argument("--parts", type=int, default=0,
                   help="hand the gradient in as it is written: begin(), this many ranges in random order, finish()")
    p.add_argument("--adapt-margin", type=float, default=0.1, help="PlanAdvisor(margin=...); 0.99: never switch")
    p.add_argument("--adaptive", type=int, default=0,
                   help="stragglers='auto' (AdaptiveReducer): a decision round every this many steps")
    p.add_argument("--reopen", type=int, default=0,
                   help="after the last step, open this many more reducers in turn (one step each) and close them")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    plan = CodedReducePlan(world, a.n, a.s, layout=a.layout, chunk_bytes=a.chunk_bytes, coded_self=a.coded_self)
    batch = plan.global_batch_for(a.per_rank)
    data_rng = np.random.default_rng(1234)
    n_data = batch * 3
    X = data_rng.standard_normal((n_data, a.dim))
    Y = X @ data_rng.standard_normal(a.dim) + 0.1 * data_rng.standard_normal(n_data)
    X32, Y32 = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    X, Y = X32.double().numpy(), Y32.double().numpy()  # the reference sees the same (rounded) data
    shards = plan.shards(rank, batch)
    theta = torch.zeros(a.dim, dtype=torch.float32)
    delay_rng = np.random.default_rng(a.jitter_seed + rank)
    sleep_rank, sleep_step, sleep_secs = (a.sleep_once.split(":") + ["", "", ""])[:3] if a.sleep_once else (-1, -1, 0)
    slow_rank, slow_factor = a.slow.split(":") if a.slow else (-1, 1)
    out = {"rank": rank, "hashes": [], "errors": [], "applied_at": [], "skipped": [], "backlog": [],
           "fingerprint": plan.fingerprint(), "error": None, "decision_seen_after": []}
    if a.adaptive:  # the plan follows the advisor; every reducer on a private gloo group, opened collectively
        advisor = PlanAdvisor(world, branching=a.n, layouts=(a.layout,), chunk_bytes=a.chunk_bytes, message_bytes=a.dim * 4,
                              global_batch=batch, patience=1, margin=a.adapt_margin)
        reducer = AdaptiveReducer(plan, advisor, lambda p, start: CodedReducer(
            p, timeout=a.timeout, start_step=start, group=dist.new_group(backend="gloo"), owns_group=True),
            every=a.adaptive)
    else:
        reducer = CodedReducer(plan, timeout=a.timeout)
    path = os.path.join(a.out, f"rank{rank}.json")
    code = 0
    try:
        for step in range(a.steps):
            if step == 5:  # lets the test driver send signals once training really runs
                open(os.path.join(a.out, f"rank{rank}.at5"), "w").close()
            perm = np.random.default_rng(step // 3).permutation(n_data)  # a new "epoch" every 3 steps
            idx = perm[(step % 3) * batch:(step % 3 + 1) * batch]
            compute = None
            if a.adaptive:
                reducer.begin(step)
                shards = reducer.plan.shards(rank, batch)
            if reducer.ready(step):
                result = reducer.result(step)
                out["skipped"].append(step)
            else:
                t0 = time.monotonic()
                delay = a.compute * (float(slow_factor) if rank == int(slow_rank) else 1.0)
                delay += a.jitter * delay_rng.random()
                pause = float(sleep_secs) if rank == int(sleep_rank) and step == int(sleep_step) else 0.0
                if pause and not a.parts:  # (by parts: the pause comes half-way through writing the gradient)
                    out["sleep"] = [time.time(), None]
                    time.sleep(pause)
                    out["sleep"][1] = time.time()
                time.sleep(delay)
                local = torch.zeros(a.dim, dtype=torch.float32)
                for sh in shards:
                    rows = torch.as_tensor(idx[sh.start:sh.stop])
                    xs, ys = X32[rows], Y32[rows]
                    local += sh.weight * ((xs @ theta - ys)[:, None] * xs).sum(0)
                if a.parts:
                    result, paused = handed_in_by_parts(reducer, step, local, a.parts, delay_rng, pause, a.segments)
                    out["sleep"] = paused or out.get("sleep")
                else:
                    compute = time.monotonic() - t0
                    result = reducer.reduce(step, local, in_place=a.in_place)
                out["backlog"].append(engine(reducer).backlog_steps)
            if a.adaptive:
                known = len(reducer.decisions)
                reducer.end(step, compute, sum(map(len, shards)))
                out["decision_seen_after"] += [step] * (len(reducer.decisions) - known)
            th64 = theta.double().numpy()
            xs, ys = X[idx], Y[idx]
            ref = ((xs @ th64 - ys)[:, None] * xs).sum(0)
            # float32 rounding bound of this computation: the residual is rounded relative to |x.theta| + |y|
            scale = ((np.abs(xs) @ np.abs(th64) + np.abs(ys))[:, None] * np.abs(xs)).sum(0)
            out["errors"].append(float((np.abs(result.double().numpy() - ref) / np.maximum(scale, 1e-30)).max()))
            out["hashes"].append(hashlib.sha1(result.numpy().tobytes()).hexdigest()[:16])
            theta -= 0.05 * result / batch
            out["applied_at"].append(time.time())
        out["gathers"] = []
        for k in range(a.gathers):
            if rank == a.gather_victim:
                open(os.path.join(a.out, "gather_victim"), "w").close()
                time.sleep(120)
            values, dead = reducer.all_gather_object({"rank": rank, "k": k})
            out["gathers"].append({"values": {str(r): v for r, v in sorted(values.items())}, "dead": sorted(dead)})
        if a.reopen:
            out["batch"] = batch
            out["reopened"] = reopen(plan, a.reopen, a.timeout, sum(sh.weight * len(sh) for sh in shards))
    except CodedReduceError as err:
        out["error"] = str(err)
        out["error_at"] = time.time()
        code = 3
    out["theta"] = hashlib.sha1(theta.numpy().tobytes()).hexdigest()
    out["decisions"] = reducer.decisions if a.adaptive else []
    inner = engine(reducer)
    out["max_buffered"] = inner.max_buffered
    out["drained"] = inner.drained
    # steps whose message this rank sent up (the root: whose result it decoded) without its own gradient
    out["forwarded_without_own"] = [st.step for st in inner.finished_stats if st.sent is not None and st.local_ready is None]
    out["dead"] = {str(k): v for k, v in inner.dead.items()}
    out["queued_frames"] = inner.queued_frames
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    reducer.close()
    sys.stdout.flush()
    os._exit(code)  # never hang in process-group teardown when a peer is gone


def reopen(plan: CodedReducePlan, times: int, timeout: float, coded_count: float) -> list[dict]:
    """Open, use and close ``times`` reducers in turn (alternately on a group of their own and on the world);
    each one's sum (``coded_count``: this rank's coded count of samples, so the sum is the global batch) and
    this process's thread count once it closed (gloo's threads included)."""
    done = []
    for k in range(times):
        own = k % 2 == 0
        extra = CodedReducer(plan, timeout=timeout, group=dist.new_group(backend="gloo") if own else None,
                             owns_group=own)
        total = float(extra.reduce(0, torch.full((4,), float(coded_count)))[0])
        extra.close()
        late = extra.wait_for_peers(timeout)
        done.append({"sum": total, "late": late, "threads": len(os.listdir(f"/proc/{os.getpid()}/task"))})
    return done


def engine(reducer) -> CodedReducer:
    """The CodedReducer doing the work (an AdaptiveReducer's current one)."""
    return reducer.reducer if isinstance(reducer, AdaptiveReducer) else reducer


def handed_in_by_parts(reducer: CodedReducer, step: int, local: torch.Tensor, parts: int,
                       rng: np.random.Generator, pause: float = 0.0,
                       segments: int = 0) -> tuple[torch.Tensor, list[float] | None]:
    """As gradient hooks do in backward: ranges of the buffer written in random order, each announced;
    ``pause`` seconds half-way (a slow backward: the others' results arrive for chunks still being written);
    ``segments``: the order to reduce in, given to ``begin`` (equal ranges, the last first, as backward
    reaches the last parameters first; the same on every rank, unlike the ranges written).
    Returns the sum and when the pause began and ended."""
    flat = torch.full_like(local, float("nan"))  # anything not written would poison the sum
    bounds = np.linspace(0, local.numel(), segments + 1).astype(int).tolist()
    reducer.begin(step, flat, segments=list(zip(bounds, bounds[1:]))[::-1] if segments else None)
    cuts = np.sort(rng.choice(np.arange(1, local.numel()), size=min(parts, local.numel()) - 1, replace=False))
    ranges = list(zip([0, *cuts.tolist()], [*cuts.tolist(), local.numel()]))
    paused = None
    for k, i in enumerate(rng.permutation(len(ranges))):
        if pause and k == len(ranges) // 2:
            paused = [time.time()]
            time.sleep(pause)
            paused.append(time.time())
        lo, hi = ranges[i]
        flat[lo:hi] = local[lo:hi]
        if i != len(ranges) - 1:  # the last range is left to finish(): it hands in whatever is not announced
            reducer.filled(step, lo, hi)
        time.sleep(0.002 * rng.random())
    return reducer.finish(step).clone(), paused


if __name__ == "__main__":
    main()
