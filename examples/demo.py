"""`make demo`: DDP vs CodedReduce on 7 CPU processes with one worker 3x slower than the rest.

Trains the same MLP (generated 10-class data, no downloads) twice -- ``strategy="ddp"`` and
``strategy="codedreduce"`` -- with the same data, seed, per-rank batch size and optimizer, each run
launched as 7 processes with ``torch.distributed.run``. Rank 4 is made a straggler with
``StragglerInjector.paper(ranks=[4], factor=3)``: it sleeps twice its own forward+backward time every
step. Both train DDP's run (codedreduce's default: the same global batch and samples per step). Prints a side-by-side table (steps/s, time to the same target loss, final loss, the plan's
redundancy R), the straggler summary from ``StragglerMonitor``, and writes plots to ``runs/demo/``.

    python examples/demo.py                  # one 3x straggler (about 2 minutes on 2 cores)
    python examples/demo.py --no-straggler   # the overhead of CodedReduce when nobody straggles
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightning_codedreduce.callbacks.monitor import format_summary, plot_stragglers, read_rows, summarize  # noqa: E402
from lightning_codedreduce._procs import LaunchTimeout, run as run_processes  # noqa: E402
from lightning_codedreduce.plan import CodedReducePlan  # noqa: E402


def run(name: str, args: argparse.Namespace, straggler: int, out_root: str) -> dict:
    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}",
           os.path.join(ROOT, "examples", "train.py"), "--strategy", name, "--out", out,
           "--steps", str(args.steps), "--batch", str(args.batch), "--straggler", str(straggler),
           "--factor", str(args.factor), "--branching", str(args.branching), "--tolerance", str(args.tolerance),
           "--seed", str(args.seed)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    start = time.monotonic()
    print(f"  {name:<12} launching {args.procs} processes ...", flush=True)
    progress = {"printed": start, "step": None}

    def report_progress() -> None:
        now = time.monotonic()
        if now - progress["printed"] < 4.0:
            return
        step = _last_progress(out)
        if step is None:
            print(f"  {name:<12} starting ({args.procs} Python processes importing torch and Lightning on "
                  f"{os.cpu_count()} cores)   {now - start:5.1f} s", flush=True)
        elif step != progress["step"]:
            print(f"  {name:<12} step {step['step']:>4}/{args.steps}   "
                  f"{step['step'] / max(step['t'], 1e-9):6.1f} steps/s   {now - start:5.1f} s", flush=True)
            progress["step"] = step
        progress["printed"] = now

    try:
        res = run_processes([(cmd, env)], out, args.timeout, cwd=ROOT, log_names=["launcher.log"], term_grace=10.0,
                  on_poll=report_progress, label=name)
    except LaunchTimeout as err:
        raise TimeoutError(f"{name} did not finish within {args.timeout:.0f} s (see {out}/launcher.log)") from err
    wall = time.monotonic() - start
    result_path = os.path.join(out, "result.json")
    if res.returncodes[0] != 0 or not os.path.exists(result_path):
        raise RuntimeError(f"{name} run failed (exit {res.returncodes[0]}); last output:\n{res.output(0)[-3000:]}")
    with open(result_path) as f:
        result = json.load(f)
    result["wall_s"] = wall
    result["dir"] = out
    print(f"  {name:<12} done: {result['steps']} steps in {result['train_s']:.1f} s of training "
          f"({wall:.0f} s with start-up)", flush=True)
    return result


def _last_progress(out: str):
    try:
        with open(os.path.join(out, "progress.jsonl")) as f:
            lines = [l for l in f.read().splitlines() if l.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _rank_stats(result: dict, rank: int):
    path = os.path.join(result["dir"], "stragglers", "stragglers.csv")
    if not os.path.exists(path):
        return None
    for s in summarize(read_rows(path), world_size=result["world_size"]):
        if s["rank"] == rank:
            return s
    return None


def time_to(curve, target: float):
    for step, t, loss in curve:
        if loss <= target:
            return t, step
    return None, None


def table(rows, header) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    rule = "-" * len(line(header))
    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])


def plot_losses(results: dict, target: float, png: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, r in results.items():
        ax.plot([t for _, t, _ in r["curve"]], [l for _, _, l in r["curve"]], marker=".",
                label=f"{name} ({r['steps_per_s']:.1f} steps/s, R={r['redundancy']:.2f})")
    ax.axhline(target, color="grey", ls=":", label=f"target {target:.3f}")
    ax.set_xlabel("training time on rank 0 (s)")
    ax.set_ylabel("held-out loss")
    ax.legend()
    fig.savefig(png)


def main() -> None:
    p = argparse.ArgumentParser(description="DDP vs CodedReduce with a straggler, on CPU processes")
    p.add_argument("--no-straggler", action="store_true", help="nobody straggles: measure the overhead ratio")
    p.add_argument("--procs", type=int, default=7)
    p.add_argument("--straggler", type=int, default=4, help="the slow rank (not 0: the root cannot be tolerated)")
    p.add_argument("--factor", type=float, default=3.0, help="the straggler runs this many times slower")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=256, help="samples per rank per step (both runs)")
    p.add_argument("--branching", type=int, default=6, help="CodedReduce tree fan-out n")
    p.add_argument("--tolerance", type=int, default=1, help="CodedReduce stragglers tolerated per parent s")
    p.add_argument("--target", type=float, default=None,
                   help="target held-out loss (default: 1.0, or the best loss both runs reach if higher)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per run before it is killed")
    p.add_argument("--out", default=None, help="default: runs/demo (runs/demo_no_straggler with --no-straggler)")
    args = p.parse_args()
    straggler = -1 if args.no_straggler else args.straggler
    if args.out is None:
        args.out = os.path.join(ROOT, "runs", "demo_no_straggler" if args.no_straggler else "demo")
    os.makedirs(args.out, exist_ok=True)
    plan = CodedReducePlan(args.procs, args.branching, args.tolerance)
    t_start = time.monotonic()
    print(f"CodedReduce demo: {args.procs} CPU processes, MLP 64-512-512-10 on generated data, SGD+momentum, "
          f"{args.steps} steps, {args.batch} samples per rank per step")
    print("straggler: " + ("none injected" if straggler < 0 else f"rank {straggler}, {args.factor:g}x slower "
                           f"(StragglerInjector.paper)"))
    print(plan.describe())
    print()
    results = {}
    for name in ("ddp", "codedreduce"):
        results[name] = run(name, args, straggler, args.out)
    ddp, cr = results["ddp"], results["codedreduce"]

    both_reach = max(min(l for _, _, l in r["curve"]) for r in results.values())
    target = args.target if args.target is not None else max(1.0, both_reach)
    rows = []

    def row(label, f, ratio=None):
        a, b = f(ddp), f(cr)
        rows.append((label, a, b, "" if ratio is None else ratio))

    row("processes", lambda r: r["world_size"])
    row("global batch per step", lambda r: r["global_batch"])
    row("redundancy R of the plan", lambda r: f"{r['redundancy']:.2f}")
    row("steps/s", lambda r: f"{r['steps_per_s']:.2f}", f"{cr['steps_per_s'] / ddp['steps_per_s']:.2f}x")
    usps = lambda r: r["steps_per_s"] * r["global_batch"]  # noqa: E731
    row("unique samples/s", lambda r: f"{usps(r):.0f}", f"{usps(cr) / usps(ddp):.2f}x")
    (td, sd), (tc, sc) = time_to(ddp["curve"], target), time_to(cr["curve"], target)
    fmt_t = lambda t, s: "not reached" if t is None else f"{t:.1f} s (step {s})"  # noqa: E731
    rows.append((f"time to held-out loss <= {target:.3f}", fmt_t(td, sd), fmt_t(tc, sc),
                 f"{td / tc:.2f}x" if td and tc else ""))
    row(f"final held-out loss ({args.steps} steps)", lambda r: f"{r['final_loss']:.4f}")
    row("training time (rank 0)", lambda r: f"{r['train_s']:.1f} s")
    if straggler >= 0:
        for r in results.values():
            r["slow"] = _rank_stats(r, straggler)
        row(f"straggler rank {straggler}: compute/step (incl. sleep)",
            lambda r: "-" if r["slow"] is None else f"{r['slow']['compute_mean_s'] * 1e3:.0f} ms")
        row(f"straggler rank {straggler}: steps skipped (caught up)",
            lambda r: "-" if r["slow"] is None else f"{r['slow']['skipped']}/{r['slow']['steps']}")
    row("wall time incl. start-up", lambda r: f"{r['wall_s']:.0f} s")
    print()
    print(table(rows, ("", "ddp", "codedreduce", "codedreduce/ddp")))

    csv_path = os.path.join(cr["dir"], "stragglers", "stragglers.csv")
    if os.path.exists(csv_path):
        summary = summarize(read_rows(csv_path), world_size=cr["world_size"])
        print()
        print(format_summary(summary, title="straggler summary (codedreduce run, StragglerMonitor)"))
        png = os.path.join(args.out, "stragglers.png")
        who = "no injected straggler" if straggler < 0 else f"rank {straggler} {args.factor:g}x slower"
        plot_stragglers(csv_path, png, title=f"codedreduce run ({who}): per-rank compute time "
                                             "(grey: skipped while catching up)")
        loss_png = os.path.join(args.out, "loss.png")
        plot_losses(results, target, loss_png)
        print(f"\nplots: {os.path.relpath(png, ROOT)}, {os.path.relpath(loss_png, ROOT)}; "
              f"per-rank CSV files under {os.path.relpath(os.path.join(cr['dir'], 'stragglers'), ROOT)}/")
    ratio = cr["steps_per_s"] / ddp["steps_per_s"]
    sample_ratio = usps(cr) / usps(ddp)
    print()
    if straggler >= 0:
        print(f"codedreduce vs ddp under one {args.factor:g}x straggler: {ratio:.2f}x the steps/s, "
              f"{sample_ratio:.2f}x the unique samples/s (R = {cr['redundancy']:.2f}; "
              + ("the same training run: DDP's global batch of " f"{ddp['global_batch']} samples per step)"
                 if cr["global_batch"] == ddp["global_batch"] else
                 f"a step uses {cr['global_batch']} distinct samples vs {ddp['global_batch']})"))
    else:
        print(f"no injected straggler: codedreduce runs at {ratio:.2f}x the steps/s of ddp and {sample_ratio:.2f}x "
              f"its unique samples/s (R = {cr['redundancy']:.2f}); time per step codedreduce/ddp = {1 / ratio:.2f}, "
              f"per sample = {1 / sample_ratio:.2f}")
        print(f"  note: {args.procs} processes share {os.cpu_count()} cores here, so the OS scheduler makes a few ranks "
              "late on every step; ddp waits for them, codedreduce drops them (see the straggler summary)")
    print(f"demo took {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
