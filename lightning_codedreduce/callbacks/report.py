"""Straggler reports without Lightning: read and merge the per-rank CSVs, summarise, plot."""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence

COLUMNS = ("rank", "step", "time_s", "parent", "compute_s", "step_s", "injected_s", "skipped", "wait_s",
           "children", "used", "dropped", "late", "saved_s", "saved_is_lower_bound", "dead")
DECISIONS_FILE = "plan_decisions.json"  # stragglers="auto"'s plan switches, next to the merged CSV


def _ids(values: Iterable[int]) -> str:
    return ";".join(str(int(v)) for v in values)


def _parse_ids(text: str | None) -> list[int]:
    return [int(x) for x in (text or "").split(";") if x.strip()]


def _num(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        out = float(text)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _fmt(value: float | None, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def read_rows(csv_path: str | os.PathLike) -> list[dict]:
    """Rows of a monitor CSV (a rank's or the merged one); a truncated last line is skipped."""
    rows = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("rank") in (None, "") or row.get("step") in (None, "") or None in row.values():
                continue
            try:
                int(row["rank"]), int(row["step"])
            except ValueError:
                continue
            rows.append(row)
    return rows


def merge_csv(paths: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> int:
    """Merge per-rank CSV files into one, sorted by (step, rank); returns the number of rows."""
    rows = []
    for p in paths:
        try:
            rows.extend(read_rows(p))
        except OSError:
            continue
    rows.sort(key=lambda r: (int(r["step"]), int(r["rank"])))
    tmp = f"{os.fspath(out_path)}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out_path)
    return len(rows)


def summarize(rows: Sequence[dict], world_size: int | None = None) -> list[dict]:
    """Per-rank totals: steps, skipped, mean compute, straggled (times its parent dropped it), waits,
    dropped children and time saved (as a parent), deaths it saw."""
    def new(rank: int) -> dict:
        return {"rank": rank, "steps": 0, "skipped": 0, "compute_s": [], "step_s": [], "injected_s": 0.0,
                "straggled": 0, "wait_s": 0.0, "wait_max_s": 0.0, "dropped": 0, "saved_s": 0.0,
                "saved_lower_bound": 0, "dead_seen": [], "tree": False}

    out = {r: new(r) for r in sorted({int(r["rank"]) for r in rows} | set(range(world_size or 0)))}
    for row in rows:
        s = out[int(row["rank"])]
        s["steps"] += 1
        skipped = int(row["skipped"] or 0)
        s["skipped"] += skipped
        for key in ("compute_s", "step_s"):
            value = _num(row[key])
            if value is not None and not skipped:
                s[key].append(value)
        s["injected_s"] += _num(row["injected_s"]) or 0.0
        wait = _num(row["wait_s"]) or 0.0
        s["wait_s"] += wait
        s["wait_max_s"] = max(s["wait_max_s"], wait)
        dropped = _parse_ids(row["dropped"])
        if row["children"] or row["parent"] != "" or row["used"]:
            s["tree"] = True
        s["dropped"] += len(dropped)
        s["saved_s"] += _num(row["saved_s"]) or 0.0
        s["saved_lower_bound"] += int(row.get("saved_is_lower_bound") or 0)
        s["dead_seen"].extend(_parse_ids(row["dead"]))
        for child in dropped:
            if child not in out:
                out[child] = new(child)
            out[child]["straggled"] += 1
    result = []
    for r in sorted(out):
        s = out[r]
        if "steps" not in s:
            continue
        comp, step = s.pop("compute_s"), s.pop("step_s")
        s["compute_mean_s"] = sum(comp) / len(comp) if comp else None
        s["step_mean_s"] = sum(step) / len(step) if step else None
        s["wait_mean_s"] = s["wait_s"] / s["steps"] if s["steps"] else 0.0
        result.append(s)
    return result


def format_decisions(decisions: Sequence[dict]) -> list[str]:
    """``stragglers="auto"``'s plan switches, one line each (empty when there were none)."""
    return [f"plan switch (stragglers='auto'): decided after step {d['step']}, from step {d['effective_step']}: "
            f"{d['plan']} (R {d['redundancy']:.2f}): {d['reason']}"
            + ("" if d.get("applied", True) else " (not applied: training ended first)") for d in decisions]


def format_summary(summary: Sequence[dict], title: str = "straggler summary", notes: Sequence[str] = (),
                   dead: Sequence[int] = (), decisions: Sequence[dict] = ()) -> str:
    """A plain-text table of :func:`summarize`'s output; ``dead``: ranks known dead besides those in the rows
    (a death found only at the end of training has no row); ``decisions``: ``stragglers="auto"``'s switches."""
    notes = [*format_decisions(decisions), *notes]
    head = ("rank", "steps", "skipped", "compute", "injected", "straggled", "wait total", "wait max", "dropped",
            "saved")
    lines = []
    tree = any(s.get("tree") for s in summary)
    for s in summary:
        t = s.get("tree") or (tree and s["rank"] == 0)  # a rank without children still has a parent
        lines.append((str(s["rank"]), str(s["steps"]), str(s["skipped"]),
                      "-" if s["compute_mean_s"] is None else f"{s['compute_mean_s'] * 1e3:.1f} ms",
                      f"{s['injected_s']:.2f} s", str(s["straggled"]) if tree else "-",
                      f"{s['wait_s']:.2f} s" if t else "-", f"{s['wait_max_s'] * 1e3:.0f} ms" if t else "-",
                      str(s["dropped"]) if t else "-",
                      (f"{s['saved_s']:.2f} s" + ("*" if s["saved_lower_bound"] else "")) if t else "-"))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    rule = "-" * len(fmt(head))
    out = [title, rule, fmt(head), rule, *(fmt(l) for l in lines), rule]
    if not tree:
        out.append("no CodedReduce tree in this run: compute and step times only")
        out.extend(notes)
        return "\n".join(out)
    total_saved = sum(s["saved_s"] for s in summary)
    strag = sorted(((s["straggled"], s["rank"]) for s in summary if s["straggled"]), reverse=True)
    who = ", ".join(f"rank {r} ({n}x)" for n, r in strag[:5]) or "none"
    out.append(f"stragglers (dropped by their parent): {who}")
    out.append(f"time saved against waiting for every child: {total_saved:.2f} s summed over parents and steps"
               + (" (* includes lower bounds: the child never sent)" if any(s["saved_lower_bound"] for s in summary) else ""))
    dead = sorted({d for s in summary for d in s["dead_seen"]} | set(dead))
    if dead:
        out.append(f"dead ranks tolerated: {dead}")
    out.extend(notes)
    return "\n".join(out)


def plot_stragglers(csv_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None,
                    decisions: Sequence[dict] | None = None) -> str:
    """Draw a PNG from a monitor CSV (merged or one rank's) and return its path.

    ``decisions``: ``stragglers="auto"``'s plan switches, drawn as vertical lines at the step each took effect
    (default: ``plan_decisions.json`` next to the CSV, when it exists).

    Top: per-rank compute time per step (grey: the rank skipped the step while catching up).
    Middle: per-rank status per step -- in time, dropped by its parent (a straggler for that step), skipped.
    Bottom: each parent's wait for its children, and its cumulative time saved against waiting for all.
    Uses matplotlib's Agg canvas directly (no pyplot, no display, the global backend is untouched).
    """
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = read_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows to plot")
    if decisions is None:
        saved_decisions = os.path.join(os.path.dirname(os.path.abspath(csv_path)), DECISIONS_FILE)
        decisions = json.loads(open(saved_decisions).read()) if os.path.exists(saved_decisions) else []
    ranks = sorted({int(r["rank"]) for r in rows} | {c for r in rows for c in _parse_ids(r["dropped"])})
    steps = sorted({int(r["step"]) for r in rows})
    ri = {r: i for i, r in enumerate(ranks)}
    si = {s: i for i, s in enumerate(steps)}
    compute = np.full((len(ranks), len(steps)), np.nan)
    status = np.zeros((len(ranks), len(steps)))  # 0 in time / no data, 1 dropped by parent, 2 skipped
    wait, saved = {}, {}
    dropped_n = np.zeros(len(ranks), dtype=int)
    for row in rows:
        r, s = int(row["rank"]), int(row["step"])
        c = _num(row["compute_s"])
        skipped = int(row["skipped"] or 0)
        if c is not None and not skipped:
            compute[ri[r], si[s]] = c * 1e3
        if skipped:
            status[ri[r], si[s]] = 2
        for child in _parse_ids(row["dropped"]):
            dropped_n[ri[child]] += 1
            if status[ri[child], si[s]] == 0:
                status[ri[child], si[s]] = 1
        if row["children"]:
            wait.setdefault(r, []).append((s, (_num(row["wait_s"]) or 0.0) * 1e3))
            saved.setdefault(r, []).append((s, _num(row["saved_s"]) or 0.0))
    labels = [f"rank {r} ({int(n)}x)" if n else f"rank {r}" for r, n in zip(ranks, dropped_n)]
    h = max(1.6, 0.32 * len(ranks))
    fig = Figure(figsize=(11, 2 * h + 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [h, h, 3]})
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(ranks) - 0.5, -0.5)
    finite = compute[np.isfinite(compute)]
    vmax = float(np.percentile(finite, 98)) if finite.size else 1.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#b0b0b0")
    im = ax1.imshow(np.ma.masked_invalid(compute), aspect="auto", interpolation="nearest", cmap=cmap,
                    vmin=0, vmax=max(vmax, 1e-3), extent=extent)
    fig.colorbar(im, ax=ax1, label="compute (ms)", extend="max")
    ax1.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax1.set_title(title or "per-rank compute time (grey: skipped while catching up)")
    colors = ListedColormap(["#e8eef4", "#d62728", "#7f7f7f"])
    ax2.imshow(status, aspect="auto", interpolation="nearest", cmap=colors, vmin=-0.5, vmax=2.5, extent=extent)
    ax2.set_yticks(range(len(ranks)), labels)
    ax2.set_title("who straggled: dropped by its parent (count, skipped steps included), or skipped a step "
                  "to catch up", fontsize=10)
    ax2.legend(handles=[Patch(color="#d62728", label="dropped by parent"), Patch(color="#7f7f7f", label="skipped")],
               loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    for r in sorted(wait):
        pts = sorted(wait[r])
        ax3.plot([s for s, _ in pts], [w for _, w in pts], lw=0.9, label=f"rank {r} wait")
    ax3.set_ylabel("wait for children (ms)")
    ax3.set_xlabel("step")
    ax4 = ax3.twinx()
    for r in sorted(saved):
        pts = sorted(saved[r])
        ax4.plot([s for s, _ in pts], np.cumsum([v for _, v in pts]), lw=1.6, ls="--", label=f"rank {r} saved (cum.)")
    ax4.set_ylabel("time saved, cumulative (s)")
    h3, l3 = ax3.get_legend_handles_labels()
    h4, l4 = ax4.get_legend_handles_labels()
    if h3 or h4:
        ax3.legend(h3 + h4, l3 + l4, loc="upper left", fontsize=8, ncol=2)
    else:
        ax3.text(0.5, 0.5, "no tree reduce in this run (no per-child waits)", ha="center", va="center",
                 transform=ax3.transAxes)
    for d in decisions:
        if not d.get("applied", True) or d["effective_step"] > steps[-1]:
            continue  # training ended before it took effect
        for ax in (ax1, ax2, ax3):
            ax.axvline(d["effective_step"] - 0.5, color="#ff7f0e", lw=1.5, ls=":")
        ax3.text(d["effective_step"] - 0.55, 0.5, f"plan {d['plan']}", transform=ax3.get_xaxis_transform(), fontsize=8,
                 color="#d35400", rotation=90, ha="right", va="center", bbox=dict(fc="white", ec="none", alpha=0.8))
    out_dir = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(png_path)
    return os.fspath(png_path)
