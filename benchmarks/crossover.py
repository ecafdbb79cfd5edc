"""The crossover map: for each straggler regime and world size, which scheme trains fastest.

Simulated (``lightning_codedreduce/sim.py``, validated against the emulated network by the harness) at
the **same global batch** for every scheme (``W x per-rank batch``, DDP's), so every scheme computes the
same updates and the fastest step is the fastest time to any loss. Every computing rank may straggle,
rank 0 included. Schemes: DDP (ring all-reduce), and in both layouts (the paper's tree, n=3, and the
balanced chunk owners) s=0, s=0 with speed-proportional loads for the regime's persistently slow ranks
(``prop s=0``, as a user who measured them would pass ``speeds=``), s=1 and s=2.

    python benchmarks/crossover.py                       # default grid, writes runs/crossover/
    python benchmarks/crossover.py --worlds 7 13 --msg-mb 1 --out runs/crossover-small

Writes ``crossover.json``, ``crossover.md`` (every cell's step time and R) and, per gradient size,
``crossover_<size>MiB.png`` (the map: best scheme per cell, its speed-up over DDP written in the cell).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_codedreduce import sim  # noqa: E402
from lightning_codedreduce.plan import CodedReducePlan  # noqa: E402

REGIMES = ("none", "slow", "slowroot", "paper", "heavy", "blog", "shiftexp")
WORLDS = (7, 13, 40, 157)


def candidates(world: int, spec: sim.StragglerSpec, seed: int) -> dict[str, object]:
    """Scheme name -> plan (``None``: DDP's ring all-reduce)."""
    speeds = sim.persistent_speeds(spec, world, seed)
    out: dict[str, object] = {"ddp": None}
    for layout in ("tree", "balanced"):
        out[f"{layout} s=0"] = CodedReducePlan(world, 3, 0, layout=layout)
        if set(speeds) != {1.0}:
            out[f"{layout} prop s=0"] = CodedReducePlan(world, 3, 0, layout=layout, speeds=speeds)
        for s in (1, 2):
            out[f"{layout} s={s}"] = CodedReducePlan(world, 3, s, layout=layout)
    return out


def crossover(worlds=WORLDS, regimes=REGIMES, *, msg_bytes: float = 2 ** 20, per_rank_batch: int = 32,
              compute_s: float = 0.06, net: sim.NetworkModel | None = None, steps: int = 40,
              seed: int = 0) -> list[dict]:
    """One row per (regime, W): every scheme's simulated mean step (s) and R, and the best scheme."""
    net = net or sim.NetworkModel()
    rows = []
    for model in regimes:
        spec = sim.StragglerSpec.default(model)
        for world in worlds:
            batch = world * per_rank_batch
            kw = dict(msg_bytes=msg_bytes, compute_s=compute_s, stragglers=spec, net=net, steps=steps, seed=seed,
                      global_batch_samples=batch, sample_s=compute_s / per_rank_batch)
            step, R = {}, {}
            for name, plan in candidates(world, spec, seed).items():
                r = sim.simulate("rar" if plan is None else "cr", world, plan=plan, **kw)
                step[name], R[name] = r.mean_step, r.redundancy
            best = min(step, key=step.get)
            rows.append({"stragglers": model, "W": world, "step_s": step, "R": R, "best": best,
                         "best_vs_ddp": step["ddp"] / step[best]})
    return rows


def markdown(rows: list[dict], msg_bytes: float) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r["step_s"]))
    lines = [f"### {msg_bytes / 2 ** 20:g} MiB gradient", "",
             "Simulated, same global batch (W x 32), 60 ms per 32 samples; step ms (R); **best** in bold", "",
             "| regime | W | " + " | ".join(names) + " | best vs DDP |", "|---|---|" + "---|" * (len(names) + 1)]
    for r in rows:
        cells = []
        for n in names:
            if n not in r["step_s"]:
                cells.append("–")
                continue
            text = f"{r['step_s'][n] * 1e3:.0f} (R{r['R'][n]:.2f})"
            cells.append(f"**{text}**" if n == r["best"] else text)
        lines.append(f"| {r['stragglers']} | {r['W']} | " + " | ".join(cells) + f" | {r['best_vs_ddp']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, msg_bytes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r["stragglers"] for r in rows))
    worlds = sorted({r["W"] for r in rows})
    names = sorted({r["best"] for r in rows})
    grid = np.zeros((len(regimes), len(worlds)))
    fig, ax = plt.subplots(figsize=(1.6 * len(worlds) + 3, 0.55 * len(regimes) + 1.8))
    for r in rows:
        i, j = regimes.index(r["stragglers"]), worlds.index(r["W"])
        grid[i, j] = names.index(r["best"])
        ax.text(j, i, f"{r['best']}\n{r['best_vs_ddp']:.2f}x DDP", ha="center", va="center", fontsize=8)
    cmap = plt.get_cmap("Pastel1", max(len(names), 2))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=max(len(names), 2) - 0.5, aspect="auto")
    ax.set_xticks(range(len(worlds)), [f"W={w}" for w in worlds])
    ax.set_yticks(range(len(regimes)), regimes)
    ax.set_title(f"Fastest scheme at the same global batch, {msg_bytes / 2 ** 20:g} MiB gradient (simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS))
    p.add_argument("--regimes", nargs="+", choices=sim.STRAGGLER_MODELS, default=list(REGIMES))
    p.add_argument("--msg-mb", type=float, nargs="+", default=[0.02, 1.0, 25.0], help="gradient MiB per step")
    p.add_argument("--bandwidth", type=float, default=1e9, help="bits/s per host and direction")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="runs/crossover")
    a = p.parse_args(argv)
    if min(a.worlds) < 4:
        p.error("world sizes must be >= 4")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    every, tables = {}, []
    for mb in a.msg_mb:
        msg = mb * 2 ** 20
        rows = crossover(a.worlds, a.regimes, msg_bytes=msg, net=sim.NetworkModel(a.bandwidth), steps=a.steps)
        every[f"{mb:g}MiB"] = rows
        tables.append(markdown(rows, msg))
        plot(rows, out / f"crossover_{mb:g}MiB.png", msg)
        print(tables[-1] + "\n", flush=True)
    (out / "crossover.json").write_text(json.dumps(every, indent=1))
    (out / "crossover.md").write_text("\n\n".join(tables) + "\n")
    print(f"wrote {out}/crossover.json, crossover.md and crossover_<size>MiB.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
