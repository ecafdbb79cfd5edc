"""CodedReduce side by side with Horovod ring all-reduce, DDP, gradient coding and an uncoded tree.

    python benchmarks/harness.py            # default grid: W=7 and W=13, both workloads, 4 straggler models
    python benchmarks/harness.py --quick    # W=7, logistic regression, none/paper/heavy, 12 steps (< 5 min)
    python benchmarks/harness.py --worlds 13 --rate 100mbit --workloads mlp --stragglers heavy

Every scheme runs the same workload on an emulated network: one network namespace per rank, a bridge,
``tbf`` at ``--rate`` per host and direction (benchmarks/netns.py), created and always torn down here.
Where namespaces are not permitted the harness says so, runs on loopback and marks every result
``network: loopback``. The harness's own schemes are plain PyTorch training loops (``bench_worker.py``),
in the same processes one after the other; Horovod (``horovod``) and its coded port (``hvd_api``) are one
Horovod training script (``hvd_script.py``) under ``horovod.torch`` and under
``lightning_codedreduce.horovod``, one launch per cell (``horovodrun --gloo`` on loopback; inside
namespaces the environment horovodrun would set, per rank).

Writes ``<out>/results.json`` (every measurement, ratios, goals, simulator validation),
``<out>/results.md`` and PNG plots, and prints the tables. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_codedreduce._procs import Launcher  # noqa: E402
from lightning_codedreduce._util import free_port  # noqa: E402
from benchmarks import netns, report  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    BATCH_MODES, ON_REQUEST, SCRIPT_KINDS, STRAGGLER_MODELS, WORKLOADS, Scheme, StragglerSpec, default_schemes,
    make_data)

WORKER = ROOT / "benchmarks" / "bench_worker.py"
SCRIPT = ROOT / "benchmarks" / "hvd_script.py"
MASTER_PORT = 29511  # inside fresh namespaces nothing else listens; script launches use the ports after it
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def horovod_status(python: str) -> tuple[bool, str]:
    """Whether ``horovod.torch`` imports in the benchmark's interpreter (checked in a subprocess)."""
    if importlib.util.find_spec("horovod") is None and python == sys.executable:
        return False, "horovod is not installed (run `make horovod` to build and install it)"
    proc = subprocess.run([python, "-c", "import horovod.torch"], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"import horovod.torch failed: {tail} (run `make horovod`)"
    return True, "ok"


def plan_cells(world: int, workloads: list[str], stragglers: list[str], schemes: list[str] | None,
               steps: dict[str, int], horovod: bool, batch: str = "global", seed: int = 0, quick: bool = False) -> list[dict]:
    """Cells in run order: for each workload and straggler model, every scheme back to back."""
    cells = []
    for name in workloads:
        for model in stragglers:
            spec = StragglerSpec.default(model)
            for sc in default_schemes(world, spec, seed):
                if schemes and sc.name not in schemes and sc.kind not in schemes:
                    continue
                if not schemes and sc.name in ("auto", "prop_s0", "crb_s2", "hvd_api") and quick:
                    continue  # quick mode: the paper's schemes and the baselines only
                if sc.name in ON_REQUEST and sc.name not in (schemes or ()):
                    continue
                if sc.kind == "horovod" and not horovod:
                    continue
                cells.append({"id": f"W{world}-{name}-{model}-{sc.name}", "world": world, "workload": name,
                              "straggler": spec.__dict__, "scheme": sc.__dict__, "steps": steps[name], "batch": batch})
    return cells


class Launch(Launcher):
    """W worker processes (or one horovodrun), each in a session of its own; stopped as whole process groups
    on any exit (``lightning_codedreduce._procs``)."""

    def __init__(self, out_dir: Path, label: str):
        super().__init__(out_dir, cwd=ROOT, label=label)

    def wait(self, timeout: float) -> None:  # type: ignore[override]
        # one failure: let the others report for 2 s, then stop them
        res = super().wait(timeout, stop_on_failure=True, failure_grace=2.0)
        if res.failed:
            raise RuntimeError(f"{self.label}: worker(s) failed {[(i, res.returncodes[i]) for i in res.failed]}:\n"
                               + (res.tails(errors_only=True, most=3) or "(no error in the logs)"))


def base_env(args: argparse.Namespace, net: netns.EmulatedNetwork | None) -> dict:
    """The environment every launched process starts from: no other launcher's variables, one thread, gloo on
    the namespace's interface (or loopback)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("HOROVOD_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GLOO_SOCKET_IFNAME=net.iface if net else "lo")
    # Horovod's background thread negotiates every cycle; its 1 ms default costs ~18% of a core per
    # idle rank, which starves 13 ranks on this 2-core host. 20 ms gave Horovod its best step times
    # here (W=13: 163/206 ms logreg/mlp against 204/368 ms at 5 ms); see benchmarks/README.md.
    env["HOROVOD_CYCLE_TIME"] = str(args.horovod_cycle_ms)
    return env


def rank_env(env: dict, rank: int, world: int, net: netns.EmulatedNetwork | None, port: int,
             horovod: bool = False) -> dict:
    """What torchrun sets for ``rank``, and with ``horovod`` also what horovodrun would (one "host" per rank;
    rank 0 of a Horovod script then hosts the rendezvous server: benchmarks/hvd_rendezvous.py)."""
    addr = net.address(0) if net else "127.0.0.1"
    env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR=addr, MASTER_PORT=str(port))
    if not horovod:
        return env
    return dict(env, HOROVOD_HOSTNAME=f"h{rank}", HOROVOD_RANK=str(rank), HOROVOD_SIZE=str(world),
                HOROVOD_LOCAL_RANK="0", HOROVOD_LOCAL_SIZE="1", HOROVOD_CROSS_RANK=str(rank),
                HOROVOD_CROSS_SIZE=str(world), HOROVOD_CONTROLLER="gloo", HOROVOD_CPU_OPERATIONS="gloo",
                HOROVOD_GLOO_RENDEZVOUS_ADDR=addr, HOROVOD_GLOO_IFACE=net.iface if net else "lo")


def run_workers(world: int, cells: list[dict], args: argparse.Namespace, data: dict, out_dir: Path,
                net: netns.EmulatedNetwork | None) -> None:
    """The harness's own schemes: every cell in one launch of ``bench_worker.py`` per rank."""
    cfg = {"out_dir": str(out_dir), "seed": args.seed, "data": data, "engine_timeout": 60.0,
           "compute_s": {k: args.compute[k] for k in data}, "cells": cells}
    cfg_path = out_dir / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    env = base_env(args, net)
    port = MASTER_PORT if net else free_port()
    with Launch(out_dir, f"W={world}") as launch:
        for r in range(world):
            cmd = (net.exec_prefix(r) if net else []) + [args.python, str(WORKER), "--config", str(cfg_path)]
            launch.start(cmd, rank_env(env, r, world, net, port), f"rank{r}.log")
        launch.wait(120 + sum(report.cell_budget(c, args.compute) for c in cells))


def script_argv(cell: dict, args: argparse.Namespace, data: dict, cell_dir: Path) -> list[str]:
    """``hvd_script.py``'s command line for ``cell``: its API, workload, straggler model and emulated compute."""
    name = cell["workload"]
    api = "horovod" if cell["scheme"]["kind"] == "horovod" else "codedreduce"
    argv = [args.python, str(SCRIPT), "--api", api, "--workload", name, "--steps", str(cell["steps"]),
            "--stragglers", cell["straggler"]["name"], "--seed", str(args.seed), "--compute-s", str(args.compute[name]),
            "--dtype", args.script_dtype, "--data-dir", str(Path(data[name][0]).parent), "--out", str(cell_dir),
            "--cell", cell["id"]]
    return argv + (["--save-params"] if args.save_params else [])


def run_script_cell(world: int, cell: dict, index: int, args: argparse.Namespace, data: dict, out_dir: Path,
                    net: netns.EmulatedNetwork | None, launcher: str) -> None:
    """One cell of the Horovod script: ``horovodrun --gloo`` (loopback), or per rank the environment it would set."""
    cell_dir = out_dir / "cells" / cell["id"]
    cell_dir.mkdir(parents=True, exist_ok=True)
    env = dict(base_env(args, net), **Scheme(**cell["scheme"]).script_env())
    argv = script_argv(cell, args, data, cell_dir)
    budget = 60 + report.cell_budget(cell, args.compute)
    with Launch(cell_dir, cell["id"]) as launch:
        if launcher == "horovodrun":
            hvdrun = str(Path(args.python).parent / "horovodrun")
            launch.start([hvdrun, "-np", str(world), "-H", f"localhost:{world}", "--gloo"] + argv, env, "horovodrun.log")
        else:
            port = MASTER_PORT + 1 + index if net else free_port()
            for r in range(world):
                launch.start((net.exec_prefix(r) if net else []) + argv,
                             rank_env(env, r, world, net, port, horovod=True), f"rank{r}.log")
        launch.wait(budget)


def run_world(world: int, cells: list[dict], args, data: dict, out_dir: Path, net_mode: str,
              hvd_launcher: str) -> None:
    """Run one world size's cells on a fresh emulated network (or loopback): the harness's own schemes in one
    launch, then every Horovod-script cell in a launch of its own."""
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = [c for c in cells if c["scheme"]["kind"] not in SCRIPT_KINDS]
    scripts = [c for c in cells if c["scheme"]["kind"] in SCRIPT_KINDS]
    (out_dir / "config_script.json").write_text(json.dumps({"cells": scripts}, indent=1))  # for report.load_raw
    net = netns.EmulatedNetwork(world, rate=args.rate) if net_mode == "netns" else None
    try:
        if net is not None:
            net.__enter__()
        t = time.monotonic()
        print(f"  W={world}: {len(cells)} cells ({'namespaces, ' + args.rate if net else 'loopback'}"
              f"{f', {len(scripts)} Horovod-script launches via ' + hvd_launcher if scripts else ''})", flush=True)
        if workers:
            run_workers(world, workers, args, data, out_dir, net)
        for i, cell in enumerate(scripts):
            t_cell = time.monotonic()
            run_script_cell(world, cell, i, args, data, out_dir, net, hvd_launcher)
            print(f"  {cell['id']}: {time.monotonic() - t_cell:.1f} s", flush=True)
        print(f"  W={world}: done in {time.monotonic() - t:.0f} s", flush=True)
    finally:
        if net is not None:
            net.teardown()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="W=7, logreg, none/paper/heavy, 12 steps (< 5 min)")
    p.add_argument("--worlds", type=int, nargs="+")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS))
    p.add_argument("--stragglers", nargs="+", choices=STRAGGLER_MODELS,
                   help="every computing rank may straggle, rank 0 included (see lightning_codedreduce/sim.py)")
    p.add_argument("--batch", choices=BATCH_MODES, default="global",
                   help="global: every scheme trains on the same global batch (W x per-rank batch), so step-time "
                        "ratios are time-to-loss ratios; per-rank: equal compute per rank (compares communication)")
    p.add_argument("--schemes", nargs="+",
                   help="scheme names or kinds (coded, gc, allreduce, horovod, hvd_api); hvd_api_bal (the coded API "
                        "in the balanced layout) runs only when named")
    p.add_argument("--steps", type=int, help="steps per cell (default 25, quick 12)")
    p.add_argument("--rate", default="1gbit", help="per-host link rate, e.g. 1gbit or 100mbit")
    p.add_argument("--network", choices=["auto", "netns", "loopback"], default="auto")
    p.add_argument("--horovod", choices=["auto", "off"], default="auto", help="off: skip the Horovod baseline")
    p.add_argument("--horovod-launcher", choices=["auto", "horovodrun", "env"], default="auto",
                   help="Horovod-script cells; loopback: horovodrun --gloo; namespaces: the same environment set per "
                        "rank (env)")
    p.add_argument("--script-dtype", choices=["float32", "float64"], default="float32",
                   help="precision of the Horovod-script cells (float64: the two APIs agree to rounding)")
    p.add_argument("--save-params", action="store_true",
                   help="Horovod-script cells: rank 0 writes its final parameters (raw/W*/cells/<id>/params.npy)")
    p.add_argument("--horovod-cycle-ms", type=float, default=20.0,
                   help="HOROVOD_CYCLE_TIME (the 1 ms default busy-polls; see benchmarks/README.md)")
    p.add_argument("--compute-logreg", type=float, default=WORKLOADS["logreg"]["compute_s"],
                   help="emulated compute seconds per step of a rank's batch (logreg)")
    p.add_argument("--compute-mlp", type=float, default=WORKLOADS["mlp"]["compute_s"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default runs/bench, quick: runs/bench/quick)")
    p.add_argument("--no-sim", action="store_true", help="skip the simulator validation and paper-scale sweep")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--analyse-only", action="store_true", help="redo the analysis of the runs already in --out")
    p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.worlds = a.worlds or ([7] if a.quick else [7, 13])
    a.workloads = a.workloads or (["logreg"] if a.quick else ["logreg", "mlp"])
    a.stragglers = a.stragglers or (["none", "paper", "heavy"] if a.quick else ["none", "paper", "heavy", "shiftexp"])
    steps = a.steps or (12 if a.quick else 25)
    a.steps_by = {k: steps for k in WORKLOADS}
    a.compute = {**{k: w["compute_s"] for k, w in WORKLOADS.items()}, "logreg": a.compute_logreg, "mlp": a.compute_mlp}
    a.out = Path(a.out or ("runs/bench/quick" if a.quick else "runs/bench"))
    if any(w < 4 for w in a.worlds):
        p.error("world sizes must be >= 4")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    out = args.out if args.out.is_absolute() else ROOT / args.out
    raw = out / "raw"
    if args.analyse_only:
        return finish(args, raw, json.loads((raw / "meta.json").read_text()), out, t_start)
    if raw.exists():
        shutil.rmtree(raw)
    raw.mkdir(parents=True)
    data_dir = ROOT / "runs" / "bench" / "data"
    data = {name: [str(p) for p in make_data(name, data_dir, args.seed)] for name in args.workloads}

    net_mode, net_note = "loopback", "requested"
    if args.network in ("auto", "netns"):
        ok, why = netns.probe()
        if ok:
            net_mode, net_note = "netns", f"one network namespace per rank, tbf {args.rate} per host and direction"
        elif args.network == "netns":
            print(f"network namespaces are not permitted here: {why}", file=sys.stderr)
            return 2
        else:
            net_note = f"network namespaces not permitted ({why}): loopback, no rate limit"
            print(f"NOTE: {net_note}; results are marked network=loopback", flush=True)
    hvd_ok, hvd_why = (False, "disabled with --horovod off") if args.horovod == "off" else horovod_status(args.python)
    if not hvd_ok:
        print(f"NOTE: Horovod baseline skipped: {hvd_why}", flush=True)
    hvd_launcher = args.horovod_launcher
    if hvd_launcher == "auto":
        hvd_launcher = "env" if net_mode == "netns" or not hvd_ok else "horovodrun"
    if net_mode == "netns" and hvd_launcher == "horovodrun":
        print("NOTE: horovodrun cannot start ranks inside network namespaces; using its environment (env)")
        hvd_launcher = "env"
    if hvd_launcher == "horovodrun" and not hvd_ok:
        print("NOTE: no horovodrun (Horovod not installed); the coded API's script cells get torchrun's environment")
        hvd_launcher = "env"
    meta = {"network": {"mode": net_mode, "rate": args.rate if net_mode == "netns" else None, "note": net_note},
            "horovod": {"available": hvd_ok, "reason": hvd_why, "launcher": hvd_launcher if hvd_ok else None,
                        "cycle_time_ms": args.horovod_cycle_ms},
            "script": {"launcher": hvd_launcher, "dtype": args.script_dtype},
            "worlds": args.worlds, "workloads": {k: dict(WORKLOADS[k], compute_s=args.compute[k]) for k in args.workloads},
            "stragglers": {m: StragglerSpec.default(m).describe() for m in args.stragglers},
            "steps": args.steps_by, "seed": args.seed, "quick": args.quick, "host_cpus": os.cpu_count(),
            "batch": args.batch,
            "emulation": ("compute is emulated: each rank waits out its per-step compute time (the workload's "
                          "compute_s scaled by its sample count, plus straggler delays) and then runs the real "
                          "forward/backward, as if every rank had its own machine")}
    print(f"CodedReduce benchmark: W={args.worlds}, workloads={args.workloads}, stragglers={args.stragglers}, "
          f"network={net_mode}{' ' + args.rate if net_mode == 'netns' else ''}, "
          f"Horovod={'yes (' + hvd_launcher + ')' if hvd_ok else 'no'}", flush=True)
    (raw / "meta.json").write_text(json.dumps(meta))  # lets --analyse-only redo the analysis of these runs
    for world in args.worlds:
        cells = plan_cells(world, args.workloads, args.stragglers, args.schemes, args.steps_by, hvd_ok, args.batch,
                           args.seed, args.quick)
        run_world(world, cells, args, data, raw / f"W{world}", net_mode, hvd_launcher)
    return finish(args, raw, meta, out, t_start)


def finish(args, raw: Path, meta: dict, out: Path, t_start: float) -> int:
    """Analyse the raw measurements (replays, ratios, simulator validation), write and print the results."""
    results = report.analyse(raw, meta, ROOT / "runs" / "bench" / "data", with_sim=not args.no_sim)
    results["meta"]["wall_s"] = time.monotonic() - t_start
    report.write(results, out, plots=not args.no_plots)
    print(report.headline(results))
    print("\nRegimes x schemes:\n" + report.regime_table(results))
    scripts = report.script_table(results)
    if scripts:
        print("\nHorovod script, horovod.torch vs the coded API (lightning_codedreduce.horovod):\n" + scripts)
    if any("bank" in WORKLOADS[m["workload"]] for m in results["cells"]):
        print("\nModel sizes (balanced layout vs the rest, same per-rank batch):\n" + report.size_table(results))
    print(f"\nwrote {args.out}/results.json, results.md and plots in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
