"""Turns the workers' per-step records into metrics, ratios, goals, simulator validation, tables, plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from benchmarks.workloads import WORKLOADS, Scheme, replay_losses, scheme_plan
from lightning_codedreduce import sim

WARMUP = 2  # steps excluded from step-time statistics (start-up)
CODED_KINDS = ("coded", "hvd_api")  # schemes whose ratios against the baselines are reported
GOALS = {"heavy_vs_rar": 3.0, "heavy_vs_gc": 5.0, "heavy_vs_own": 1.2, "none_s0_vs_rar": 1.3}


def cell_budget(cell: dict, compute: dict) -> float:
    """Generous upper bound on a cell's wall time (launch timeout)."""
    spec = cell["straggler"]
    slow = 1 + max(spec.get("factor", 0.0), 6 * spec.get("scale", 0.0))
    return 30 + cell["steps"] * (compute[cell["workload"]] * slow * 2 + 1.0)


# ---------------------------------------------------------------------------- per-cell metrics
def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def settled_step(done: np.ndarray, decisions: list[dict], warmup: int) -> float | None:
    """Mean step from the last applied switch on (``done[t]``: when step t was done), what a run long enough
    to make the learning steps negligible would see; None without a switch, or one too late to measure."""
    applied = [d["effective_step"] for d in decisions if d.get("applied", True)]
    if not applied or not warmup <= applied[-1] < len(done) - 2:
        return None
    return float((done[-1] - done[applied[-1] - 1]) / (len(done) - applied[-1]))


def cell_metrics(ranks: list[dict], cfg: dict) -> dict:
    scheme = Scheme(**cfg["scheme"])
    r0 = ranks[0]
    recs = r0["records"]
    S = len(recs)
    w = max(1, min(WARMUP, S - 2))
    t0 = r0["t0"]
    done = np.array([r["t_done"] for r in recs])
    per_step = np.diff(np.concatenate([[t0], done]))
    mean_step = float((done[-1] - done[w - 1]) / (S - w))
    B = r0["global_batch"]
    comp = [rec for rk in ranks if rk["compute_s"] > 0 for rec in rk["records"][w:] if not rec.get("skipped")]
    skipped = sum(1 for rk in ranks for rec in rk["records"][w:] if rec.get("skipped"))
    total = sum(len(rk["records"][w:]) for rk in ranks)
    m = {
        "id": cfg["id"], "W": cfg["world"], "workload": cfg["workload"], "stragglers": cfg["straggler"]["name"],
        "scheme": scheme.name, "kind": scheme.kind, "label": scheme.label, "scheme_cfg": dict(cfg["scheme"]),
        "R": None, "global_batch": B, "batch": cfg.get("batch", "per-rank"),
        "steps": S, "numel": r0["numel"], "msg_bytes": r0["numel"] * 4,
        "step_s": mean_step, "step_p50_s": float(np.median(per_step[w:])),
        "step_p90_s": float(np.percentile(per_step[w:], 90)), "step_times_s": per_step.tolist(),
        "done_s": (done - t0).tolist(), "samples_per_s": B / mean_step,
        "compute_s": _mean(rec["target_end"] - rec["start"] for rec in comp),
        "stall_s": _mean(rec["stall"] for rec in comp),
        "real_compute_s": _mean(rec["real"] for rec in comp),
        "overrun_frac": (sum(1 for rec in comp if rec["c1"] > rec["target_end"] + 0.005) / len(comp)) if comp else 0.0,
        "skipped_frac": skipped / max(1, total),
        "local_overhead_s": _mean([(rec["t_done"] - rec["t_out"]) + max(0.0, rec["t_in"] - rec["target_end"])
                                   for rec in comp]),
        "cpu_s_per_step": _mean(rk["cpu_s"] / S for rk in ranks),
        "agg_s_rank0": _mean(rec["t_out"] - rec["t_in"] for rec in recs[w:]),
        "checksums_agree": (max(rk["checksum"] for rk in ranks) - min(rk["checksum"] for rk in ranks))
        <= 1e-6 * max(1.0, abs(r0["checksum"])),
        "checksum": r0["checksum"], "drained": sum(rk["drained"] for rk in ranks),
        # per rank per step, through the rank's own network namespace (0 on loopback): the busiest rank
        "rx_mb_per_step_max": max(rk.get("rx_bytes", 0) for rk in ranks) / S / 1e6,
        "tx_mb_per_step_max": max(rk.get("tx_bytes", 0) for rk in ranks) / S / 1e6,
        "rx_mb_per_step_mean": _mean(rk.get("rx_bytes", 0) / S / 1e6 for rk in ranks),
    }
    # gaps between a rank's steps (loop overhead between t_done and the next compute start)
    gaps = [rk["records"][i + 1].get("start", rk["records"][i + 1]["t_in"]) - rk["records"][i]["t_done"]
            for rk in ranks for i in range(w, S - 1)]
    m["loop_gap_s"] = _mean(gaps)
    if scheme.kind in ("coded", "gc"):
        plan = scheme_plan(scheme, cfg["world"])
        m["R"] = plan.redundancy
        if scheme.adaptive:  # the plan changed: the mean R over the measured steps, and what was decided
            m["R"] = _mean(rec["R"] for rec in r0["records"][w:] if "R" in rec)
            m["decisions"] = r0.get("decisions", [])
            m["settled_step_s"] = settled_step(done, m["decisions"], w)
        stats = {rk["rank"]: {e["step"]: e for e in rk["engine"]} for rk in ranks}
        hops, decode, root_wait, down = [], [], [], []
        for step in range(w, S):
            root = stats[0].get(step)
            if root is None or root.get("sent") is None:
                continue
            if root.get("local_ready") is not None:
                root_wait.append(root["sent"] - root["local_ready"])
            for r in range(1, cfg["world"]):
                st, ps = stats[r].get(step), stats[plan.parent(r)].get(step)
                if st and st.get("sent") and ps and str(r) in ps["arrivals"]:
                    hops.append(ps["arrivals"][str(r)] - st["sent"])
            for p in range(cfg["world"]):
                ps = stats[p].get(step)
                if ps and ps.get("sent") and ps["used"] and ps.get("local_ready") is not None:
                    last = max(ps["arrivals"][str(c)] for c in ps["used"])
                    decode.append(ps["sent"] - max(last, ps["local_ready"]))
            res = [stats[r][step]["result"] for r in stats if step in stats[r] and stats[r][step].get("result")]
            if root.get("result") and res:
                down.append(max(res) - root["result"])
        m.update(root_wait_s=_mean(root_wait), hop_transfer_s=_mean(hops), hop_transfer_p90_s=(
            float(np.percentile(hops, 90)) if hops else None), decode_s=_mean(decode), down_s=_mean(down))
    else:
        # hvd_api: the samples the ranks compute per step over the global batch (units of the per-rank batch)
        m["R"] = sum(rk["samples"] for rk in ranks) / B if scheme.kind == "hvd_api" else 1.0
        waits, xfers = [], []
        for i in range(w, S):
            rows = [rk["records"][i] for rk in ranks]
            t_in = np.array([r["t_in"] for r in rows])
            t_out = np.array([r["t_out"] for r in rows])
            waits.append(float(t_in.max() - np.median(t_in)))
            xfers.append(float(np.median(t_out) - t_in.max()))
        if scheme.kind == "hvd_api":  # no ring: a lagging rank's t_in/t_out are its catch-up, not a wait
            waits = xfers = []
        m.update(root_wait_s=_mean(waits), hop_transfer_s=_mean(xfers), decode_s=None, down_s=None)
    return m


# ---------------------------------------------------------------------------- analysis
def load_raw(raw: Path) -> list[tuple[dict, list[dict]]]:
    cfgs = {}
    for cfg_path in sorted(raw.glob("W*/config*.json")):
        for c in json.loads(cfg_path.read_text())["cells"]:
            cfgs[c["id"]] = c
    out = []
    for cid, cfg in cfgs.items():
        files = sorted((raw / f"W{cfg['world']}" / "cells" / cid).glob("rank*.json"))
        if len(files) != cfg["world"]:
            continue
        ranks = sorted((json.loads(f.read_text()) for f in files), key=lambda d: d["rank"])
        out.append((cfg, ranks))
    return out


def _replay(name: str, B: int, steps: int, data_dir: Path, seed: int, cache: dict) -> dict:
    key = (name, B, steps)
    if key in cache:
        return cache[key]
    spec = WORKLOADS[name]
    path = data_dir / f"replay_{name}_B{B}_S{steps}_seed{seed}_lr{spec['lr']}_t{spec['target_loss']}.json"
    if path.exists():
        cache[key] = json.loads(path.read_text())
        return cache[key]
    r = replay_losses(name, data_dir, B, steps, seed=seed, target=spec["target_loss"], max_steps=300)
    path.write_text(json.dumps(r))
    cache[key] = r
    return r


def analyse(raw: Path, meta: dict, data_dir: Path, with_sim: bool = True) -> dict:
    import torch

    torch.set_num_threads(2)
    cells = []
    cache: dict = {}
    for cfg, ranks in load_raw(raw):
        m = cell_metrics(ranks, cfg)
        m["network"] = meta["network"]["mode"]
        m["rate"] = meta["network"]["rate"]
        rep = _replay(cfg["workload"], m["global_batch"], m["steps"], data_dir, meta["seed"], cache)
        k = rep["steps_to_target"]
        m["target_loss"] = WORKLOADS[cfg["workload"]]["target_loss"]
        m["steps_to_target"] = k
        m["loss_curve"] = rep["losses"][: m["steps"] + 1]
        if k is None:
            m["time_to_target_s"], m["ttt_extrapolated"] = None, False
        elif k <= m["steps"]:
            m["time_to_target_s"], m["ttt_extrapolated"] = m["done_s"][k - 1], False
        else:
            m["time_to_target_s"] = m["done_s"][-1] + (k - m["steps"]) * m["step_s"]
            m["ttt_extrapolated"] = True
        m["replay_checksum"] = rep["checksum"]
        m["matches_replay"] = (rep["checksum"] is not None
                               and abs(m["checksum"] - rep["checksum"]) <= 1e-3 * max(1.0, abs(rep["checksum"])))
        cells.append(m)
    results = {"meta": meta, "cells": cells}
    results["ratios"], results["own"] = ratios(cells)
    results["goals"] = goals(cells, results["ratios"], results["own"])
    if with_sim and cells:
        results["sim"] = simulate_all(cells, meta)
    return results


def _is_cr_s1(name: str) -> bool:
    return name in ("cr_n3_s1", "crr_n3_s1", "crb_s1") or name.startswith("cr_flat")


def ratios(cells: list[dict]) -> tuple[list[dict], list[dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for m in cells:
        groups.setdefault((m["W"], m["workload"], m["stragglers"]), {})[m["scheme"]] = m
    out, own = [], []
    for (W, wl, model), by in sorted(groups.items()):
        for cr in [c for c in by.values() if c["kind"] in CODED_KINDS]:
            for base in by.values():
                earlier_layout = cr["scheme"] == "crb_s1" and base["scheme"] == "cr_n3_s1"  # balanced vs the tree
                if base is cr or (base["kind"] in CODED_KINDS and not earlier_layout and not (
                        cr["kind"] == "coded" and cr["scheme"] != base["scheme"] and base["scheme"].startswith("tree"))):
                    continue
                ttt = (base["time_to_target_s"] / cr["time_to_target_s"]
                       if base["time_to_target_s"] and cr["time_to_target_s"] else None)
                out.append({"W": W, "workload": wl, "stragglers": model, "scheme": cr["scheme"], "R": cr["R"],
                            "vs": base["scheme"], "R_vs": base["R"], "step_speedup": base["step_s"] / cr["step_s"],
                            "throughput_ratio": cr["samples_per_s"] / base["samples_per_s"], "ttt_speedup": ttt,
                            "network": cr["network"]})
            none = groups.get((W, wl, "none"), {}).get(cr["scheme"])
            if none is not None:
                own.append({"W": W, "workload": wl, "stragglers": model, "scheme": cr["scheme"], "R": cr["R"],
                            "step_vs_own_none": cr["step_s"] / none["step_s"], "network": cr["network"]})
    return out, own


def _ratio(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def goals(cells, rat, own) -> list[dict]:
    out = []
    for W in sorted({m["W"] for m in cells}):
        for wl in sorted({m["workload"] for m in cells}):
            names = sorted({m["scheme"] for m in cells if m["W"] == W and m["workload"] == wl and _is_cr_s1(m["scheme"])})
            for cr in names:
                for key, vs, thr in (("heavy_vs_rar", "horovod", GOALS["heavy_vs_rar"]),
                                     ("heavy_vs_gc", "gc_s1", GOALS["heavy_vs_gc"])):
                    r = _ratio(rat, W=W, workload=wl, stragglers="heavy", scheme=cr, vs=vs)
                    if r is None and vs == "horovod":
                        r = _ratio(rat, W=W, workload=wl, stragglers="heavy", scheme=cr, vs="ddp")
                    if r is not None:
                        out.append({"W": W, "workload": wl, "scheme": cr, "R": r["R"], "goal": f"heavy: >= {thr:g}x vs {r['vs']}",
                                    "value": r["step_speedup"], "met": r["step_speedup"] >= thr})
                o = _ratio(own, W=W, workload=wl, stragglers="heavy", scheme=cr)
                if o is not None:
                    out.append({"W": W, "workload": wl, "scheme": cr, "R": o["R"],
                                "goal": f"heavy: within {GOALS['heavy_vs_own']:g}x of own straggler-free",
                                "value": o["step_vs_own_none"], "met": o["step_vs_own_none"] <= GOALS["heavy_vs_own"]})
            for vs in ("horovod", "ddp"):
                r = _ratio(rat, W=W, workload=wl, stragglers="none", scheme="tree_n3_s0", vs=vs)
                if r is not None:
                    out.append({"W": W, "workload": wl, "scheme": "tree_n3_s0", "R": 1.0,
                                "goal": f"none: s=0 within {GOALS['none_s0_vs_rar']:g}x of {vs}",
                                "value": 1 / r["step_speedup"], "met": 1 / r["step_speedup"] <= GOALS["none_s0_vs_rar"]})
                    break
    return out


# ---------------------------------------------------------------------------- simulator validation
def _sim_cell(m: dict, alpha: dict, meta: dict, overhead: float) -> float:
    from benchmarks.netns import parse_rate

    wl = meta["workloads"][m["workload"]]
    bw = parse_rate(m["rate"]) if m["rate"] else 20e9
    scheme = Scheme(**m["scheme_cfg"])
    kind = {"coded": "cr", "gc": "gc", "allreduce": "rar", "horovod": "rar"}[scheme.kind]
    net = sim.NetworkModel(bw, alpha["tree"], alpha["ddp"],
                           ring_fixed_s=alpha["hvd_fixed"] if scheme.kind == "horovod" else 0.0)
    spec = sim.StragglerSpec.default(m["stragglers"])
    compute_s = wl["compute_s"] + overhead
    same_global = dict(global_batch_samples=m["global_batch"], sample_s=compute_s / wl["per_rank_batch"]) \
        if m.get("batch") == "global" else {}
    r = sim.simulate(kind, m["W"], msg_bytes=m["msg_bytes"], compute_s=compute_s, stragglers=spec, net=net,
                     steps=m["steps"], warmup=WARMUP, seed=meta["seed"], plan=scheme_plan(scheme, m["W"]), **same_global)
    return r.mean_step


def _fit(loss, lo: float, hi: float) -> float:
    grid = np.geomspace(lo, hi, 36)
    errs = [loss(a) for a in grid]
    best = int(np.argmin(errs))
    a, b = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    for _ in range(12):  # golden-section refinement
        a1, a2 = a + 0.382 * (b - a), a + 0.618 * (b - a)
        if loss(a1) < loss(a2):
            b = a2
        else:
            a = a1
    return (a + b) / 2


def simulate_all(cells: list[dict], meta: dict) -> dict:
    """Calibrate on the straggler-free cells of the smallest W (one latency per message for the
    tree/GC engine, one per ring step for gloo's all_reduce, one fixed per-all-reduce overhead for
    Horovod on top of the gloo ring), then predict every other cell; paper-scale table and sweep."""
    from benchmarks.netns import parse_rate

    cells = [m for m in cells if m["kind"] != "hvd_api"]  # not modelled: unit shares, the API's own loop
    if not cells:
        return {}
    wmin = min(m["W"] for m in cells)
    calib = [m for m in cells if m["W"] == wmin and m["stragglers"] == "none"]
    overhead = {}
    for m in cells:  # local per-step cost outside compute and aggregation, from the calibration cell
        c = next((x for x in calib if x["workload"] == m["workload"] and x["scheme"] == m["scheme"]), None)
        overhead[m["id"]] = ((c or m)["local_overhead_s"] or 0.0) + ((c or m)["loop_gap_s"] or 0.0)
    alpha = {"tree": 3e-4, "ddp": 3e-4, "hvd_fixed": 0.0}
    fits = {}
    for key, kinds, lo, hi in (("tree", ("coded", "gc"), 2e-5, 5e-2), ("ddp", ("allreduce",), 2e-5, 5e-2),
                               ("hvd_fixed", ("horovod",), 1e-4, 1.0)):
        rows = [m for m in calib if m["kind"] in kinds]
        if not rows:
            continue

        def loss(a, key=key, rows=rows):
            al = dict(alpha, **{key: a})
            return sum(math.log(_sim_cell(m, al, meta, overhead[m["id"]]) / m["step_s"]) ** 2 for m in rows)

        alpha[key] = _fit(loss, lo, hi)
        fits[key] = {"value_s": alpha[key], "calibration_cells": [m["id"] for m in rows]}
    preds = []
    for m in cells:
        p = _sim_cell(m, alpha, meta, overhead[m["id"]])
        preds.append({"id": m["id"], "W": m["W"], "workload": m["workload"], "stragglers": m["stragglers"],
                      "scheme": m["scheme"], "measured_s": m["step_s"], "predicted_s": p,
                      "error": p / m["step_s"] - 1, "calibration": m in calib})
    summary = {}
    for W in sorted({p["W"] for p in preds}):
        for label, sel in (("", lambda p: True), ("_no_horovod", lambda p: p["scheme"] != "horovod")):
            val = [abs(p["error"]) for p in preds if p["W"] == W and not p["calibration"] and sel(p)]
            summary[f"W{W}{label}"] = {"mean_abs_error": float(np.mean(val)) if val else None,
                                       "median_abs_error": float(np.median(val)) if val else None,
                                       "max_abs_error": float(np.max(val)) if val else None, "cells": len(val)}
    by_scheme = {}
    for name in sorted({p["scheme"] for p in preds}):
        val = [abs(p["error"]) for p in preds if p["scheme"] == name and not p["calibration"]]
        by_scheme[name] = float(np.mean(val)) if val else None
    bw = parse_rate(meta["network"]["rate"]) if meta["network"]["rate"] else sim.NetworkModel().bandwidth_bps
    here = sim.NetworkModel(bw, alpha["tree"], alpha["ddp"])
    per_sample = meta["workloads"].get("logreg", {"compute_s": 0.05, "per_rank_batch": 64})
    slow_sample = per_sample["compute_s"] / per_sample["per_rank_batch"]
    # the paper's scale under three network assumptions: this machine's calibrated latencies (gloo
    # ring for RAR); one datacenter-like latency for every scheme; and the same plus a serialized
    # per-message CPU cost (a Python/MPI master handles one message at a time)
    nets = (("calibrated here", here), ("100 us/message, all schemes", sim.NetworkModel(bw, 100e-6, 100e-6)),
            ("100 us/message + 0.5 ms CPU per message", sim.NetworkModel(bw, 100e-6, 100e-6, msg_cpu_s=5e-4)))
    paper = []
    for nlabel, nm in nets:
        for label, sample_s in (("emulated compute", slow_sample), ("fast compute (20 us/sample)", 20e-6)):
            for row in sim.paper_table(nm, sample_s=sample_s):
                paper.append(dict(row, compute=label, network=nlabel, sample_s=sample_s,
                                  latency_tree_s=nm.latency_s, latency_ring_s=nm.ring_latency, msg_cpu_s=nm.msg_cpu_s))
    # sweep: every scheme with the engine's calibrated per-message latency (same software cost per message)
    fair = sim.NetworkModel(bw, alpha["tree"], alpha["tree"])
    sweep = []
    sizes = sorted({m["msg_bytes"] for m in cells})
    for size in sizes:
        for model in ("none", "heavy"):
            sweep += sim.sweep(net=fair, model=model, compute_s=per_sample["compute_s"], msg_bytes=size,
                               worlds=(13, 40, 157, 400, 1000, 1885, 4000, 10000) if size == sizes[0] else
                               (13, 40, 157, 400, 1000, 1885))
    return {"network": {"bandwidth_bps": bw, "latency_tree_s": alpha["tree"], "latency_ddp_s": alpha["ddp"],
                        "horovod_fixed_s": alpha["hvd_fixed"] if "hvd_fixed" in fits else None},
            "fits": fits, "predictions": preds, "validation": summary, "validation_by_scheme": by_scheme,
            "paper_table": paper, "sweep": sweep}


# ---------------------------------------------------------------------------- output
def _ms(x) -> str:
    return "–" if x is None else f"{x * 1e3:.1f}"


def _x(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def markdown(results: dict) -> str:
    meta = results["meta"]
    net = meta["network"]
    lines = ["# CodedReduce benchmark", "",
             f"- network: **{net['mode']}**{' ' + net['rate'] if net['rate'] else ''} ({net['note']})",
             f"- Horovod: {'yes, launcher ' + meta['horovod']['launcher'] if meta['horovod']['available'] else 'skipped: ' + meta['horovod']['reason']}",
             f"- {meta['emulation']}; host CPUs: {meta['host_cpus']}",
             f"- straggler models: " + "; ".join(f"**{k}**: {v}" for k, v in meta["stragglers"].items()),
             f"- workloads: " + "; ".join(f"**{k}**: per-rank batch {v['per_rank_batch']}, compute {v['compute_s'] * 1e3:.0f} ms/step, "
                                         f"lr {v['lr']}, target loss {v['target_loss']}" for k, v in meta["workloads"].items()),
             "- step time: rank 0's mean time per step after 2 warm-up steps; samples/s: global batch / step time; "
             "time to target: wall time until the loss of the exact minibatch SGD trajectory (replayed) reaches the target "
             "(* = extrapolated beyond the measured steps)", ""]
    cells = results["cells"]
    for W in sorted({m["W"] for m in cells}):
        for wl in sorted({m["workload"] for m in cells}):
            for model in sim.STRAGGLER_MODELS:
                rows = [m for m in cells if m["W"] == W and m["workload"] == wl and m["stragglers"] == model]
                if not rows:
                    continue
                lines += [f"## W={W}, {wl}, stragglers: {model}", "",
                          "| scheme | R | global batch | step ms | p50 / p90 ms | samples/s | time to target s | compute ms (stall) | wait ms | transfer ms | decode ms | skipped | exact |",
                          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
                for m in rows:
                    ttt = "–" if m["time_to_target_s"] is None else f"{m['time_to_target_s']:.2f}{'*' if m['ttt_extrapolated'] else ''}"
                    lines.append(
                        f"| {m['label']} | {m['R']:.2f} | {m['global_batch']} | {_ms(m['step_s'])} | {_ms(m['step_p50_s'])} / {_ms(m['step_p90_s'])} | "
                        f"{m['samples_per_s']:.0f} | {ttt} | {_ms(m['compute_s'])} ({_ms(m['stall_s'])}) | {_ms(m['root_wait_s'])} | "
                        f"{_ms(m['hop_transfer_s'])} | {_ms(m.get('decode_s'))} | {m['skipped_frac'] * 100:.0f}% | "
                        f"{'yes' if m['checksums_agree'] and m['matches_replay'] else 'NO'} |")
                rat = [r for r in results["ratios"] if r["W"] == W and r["workload"] == wl and r["stragglers"] == model]
                if rat:
                    lines += ["", "| CodedReduce scheme (R) | vs | step speed-up | samples/s ratio | time-to-target speed-up |",
                              "|---|---|---|---|---|"]
                    for r in rat:
                        lines.append(f"| {r['scheme']} (R={r['R']:.2f}) | {r['vs']} (R={r['R_vs']:.2f}) | {_x(r['step_speedup'])} | "
                                     f"{_x(r['throughput_ratio'])} | {_x(r['ttt_speedup'])} |")
                own = [o for o in results["own"] if o["W"] == W and o["workload"] == wl and o["stragglers"] == model]
                if own and model != "none":
                    lines += ["", "Against its own straggler-free step: " + ", ".join(
                        f"{o['scheme']} {o['step_vs_own_none']:.2f}x" for o in own)]
                lines.append("")
    if results["goals"]:
        lines += ["## Goals", "", "| W | workload | scheme | R | goal | value | met |", "|---|---|---|---|---|---|---|"]
        for g in results["goals"]:
            lines.append(f"| {g['W']} | {g['workload']} | {g['scheme']} | {g['R']:.2f} | {g['goal']} | {g['value']:.2f}x | "
                         f"{'yes' if g['met'] else '**no**'} |")
        lines.append("")
    s = results.get("sim")
    if s:
        lines += ["## Simulator", "",
                  f"Calibrated on the straggler-free cells of the smallest W: per-message latency (tree/GC) "
                  f"{s['network']['latency_tree_s'] * 1e6:.0f} us, gloo ring step (DDP) {s['network']['latency_ddp_s'] * 1e6:.0f} us"
                  + (f", Horovod's fixed cost per all-reduce on top of the ring {s['network']['horovod_fixed_s'] * 1e3:.0f} ms"
                     if s['network'].get('horovod_fixed_s') is not None else "")
                  + "; every other cell is a prediction.", "",
                  "| W | validation cells | mean abs error | median | max |", "|---|---|---|---|---|"]
        for k, v in s["validation"].items():
            if v["cells"]:
                lines.append(f"| {k[1:].replace('_no_horovod', ' without Horovod')} | {v['cells']} | {v['mean_abs_error'] * 100:.0f}% | {v['median_abs_error'] * 100:.0f}% | "
                             f"{v['max_abs_error'] * 100:.0f}% |")
        lines += ["", "Per scheme (mean abs error): " + ", ".join(
            f"{k} {v * 100:.0f}%" for k, v in s["validation_by_scheme"].items() if v is not None), ""]
        lines += ["### Paper scale (N=156 workers + computing root, n=12, L=2, s=1; 5000 features, 6552 samples, full GD)", "",
                  "| network | compute | stragglers | R (CR) | CR | uncoded tree | GC s=1 | RAR | CR vs GC (paper 27.2x) | CR vs RAR (paper 7.0x) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["paper_table"]:
            lines.append(f"| {r['network']} | {r['compute']} | {r['stragglers']} | {r['R_cr']:.2f} | {_ms(r['cr_s'])} ms | {_ms(r['tree_s0_s'])} ms | "
                         f"{_ms(r['gc_s'])} ms | {_ms(r['rar_s'])} ms | {r['cr_vs_gc']:.1f}x | {r['cr_vs_rar']:.1f}x |")
        lines += ["", "### Sweep (fixed per-rank batch, n=12; every scheme pays the engine's calibrated latency per message or ring step)", "",
                  "| message | stragglers | W | CR s=1 (R) | tree s=0 | GC s=1 | RAR | CR vs RAR step | CR vs RAR samples/s | CR vs GC step |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["sweep"]:
            lines.append(f"| {r['msg_bytes'] / 1e3:.0f} KB | {r['stragglers']} | {r['W']} | {_ms(r['cr_s1'])} ms ({r['R_cr_s1']:.2f}) | {_ms(r['tree_s0'])} ms | "
                         f"{_ms(r['gc_s1'])} ms | {_ms(r['rar'])} ms | {r['rar'] / r['cr_s1']:.2f}x | "
                         f"{r['rar'] / r['cr_s1'] / r['R_cr_s1']:.2f}x | {r['gc_s1'] / r['cr_s1']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def size_table(results: dict) -> str:
    """Issue 11's model-size table: per W, gradient size and straggler model, step time of every scheme,
    the balanced layout's ratios against each (same per-rank batch), and the busiest rank's MB per step."""
    cells = results["cells"]
    schemes = ("crb_s1", "cr_n3_s1", "ddp", "horovod")
    out = [f"{'W':>3} {'grad MB':>7} {'stragglers':10} " + " ".join(f"{s + ' ms':>12}" for s in schemes)
           + f" {'bal vs tree':>11} {'bal vs DDP':>10} {'bal vs Hvd':>10} {'bal/DDP samples/s':>17} "
           + " ".join(f"{s + ' MB in/out':>18}" for s in schemes)]
    for key in sorted({(m["W"], m["msg_bytes"], m["workload"], m["stragglers"]) for m in cells}):
        W, size, wl, model = key
        by = {m["scheme"]: m for m in cells if (m["W"], m["msg_bytes"], m["workload"], m["stragglers"]) == key}
        if "crb_s1" not in by:
            continue
        bal = by["crb_s1"]

        def ratio(name, field="step_s", inverse=False):
            if name not in by:
                return "–"
            v = by[name][field] / bal[field] if not inverse else bal[field] / by[name][field]
            return f"{v:.2f}x"

        out.append(f"{W:>3} {size / 1e6:7.1f} {model:10} "
                   + " ".join(f"{by[s]['step_s'] * 1e3:12.0f}" if s in by else f"{'–':>12}" for s in schemes)
                   + f" {ratio('cr_n3_s1'):>11} {ratio('ddp'):>10} {ratio('horovod'):>10} "
                   + f"{ratio('ddp', 'samples_per_s', inverse=True):>17} "
                   + " ".join(f"{by[s]['rx_mb_per_step_max']:8.1f}/{by[s]['tx_mb_per_step_max']:<8.1f} " if s in by
                              else f"{'–':>18}" for s in schemes))
    out.append(f"R: crb_s1 {next((m['R'] for m in cells if m['scheme'] == 'crb_s1'), 0):.2f} (balanced groups), "
               f"cr_n3_s1 {next((m['R'] for m in cells if m['scheme'] == 'cr_n3_s1'), 0):.2f}, DDP/Horovod 1.00 "
               + ("(same per-rank batch: the coded global batch is W/R x per-rank)"
                  if results["meta"].get("batch", "per-rank") == "per-rank" else "(same global batch: W x per-rank)"))
    return "\n".join(out)


def regime_table(results: dict) -> str:
    """Straggler regimes x schemes per W and workload: step ms and DDP's step / the scheme's (x faster than DDP),
    with each scheme's R in the header; the batch mode says whether every scheme had the same global batch.
    ``auto``: also its step from its last switch on (settled), and a last column with its step over the best
    fixed scheme's (whole run / settled)."""
    cells, batch = results["cells"], results["meta"].get("batch", "per-rank")
    out = []
    for W, wl in sorted({(m["W"], m["workload"]) for m in cells}):
        rows = [m for m in cells if m["W"] == W and m["workload"] == wl]
        schemes = list(dict.fromkeys(m["scheme"] for m in rows))
        R = {m["scheme"]: m["R"] if m["R"] is not None else 1.0 for m in rows}
        configs = {m["scheme"]: m["scheme_cfg"] for m in rows}
        adaptive = [s for s in schemes if configs[s].get("adaptive")]
        extra = [f"{a} ÷ best fixed" for a in adaptive]
        out += [f"W={W}, {wl}, {batch} batch: step ms (DDP's step / the scheme's)"
                + ("; auto [from its last switch on]" if adaptive else ""), "",
                "| regime | " + " | ".join([f"{s} (R per plan)" if s in adaptive else f"{s} R{R[s]:.2f}" for s in schemes]
                                         + extra) + " |",
                "|---|" + "---|" * (len(schemes) + len(extra))]
        for model in dict.fromkeys(m["stragglers"] for m in rows):
            by = {m["scheme"]: m for m in rows if m["stragglers"] == model}
            ddp = by.get("ddp")

            def cell(s: str) -> str:
                if s not in by:
                    return "–"
                m = by[s]
                text = f"{m['step_s'] * 1e3:.0f}" + (f" ({ddp['step_s'] / m['step_s']:.2f}x)" if ddp and s != "ddp" else "")
                if m.get("settled_step_s"):
                    text += f" [{m['settled_step_s'] * 1e3:.0f}" + (
                        f", {ddp['step_s'] / m['settled_step_s']:.2f}x]" if ddp else "]")
                return text

            fixed = [m["step_s"] for s, m in by.items() if s not in adaptive]

            def versus_best(a: str) -> str:
                if a not in by or not fixed:
                    return "–"
                m = by[a]
                return f"{m['step_s'] / min(fixed):.2f}x" + (
                    f" [{m['settled_step_s'] / min(fixed):.2f}x]" if m.get("settled_step_s") else "")

            out.append(f"| {model} | " + " | ".join([cell(s) for s in schemes] + [versus_best(a) for a in adaptive]) + " |")
        out.append("")
    return "\n".join(out)


def script_table(results: dict) -> str:
    """The Horovod script under ``horovod.torch`` against the same script under ``lightning_codedreduce.horovod``:
    step ms, and Horovod's step / the coded API's (x faster), with the coded API's R next to every ratio."""
    cells = [m for m in results["cells"] if m["kind"] in ("horovod", "hvd_api")]
    out = []
    for W, wl in sorted({(m["W"], m["workload"]) for m in cells}):
        rows = [m for m in cells if m["W"] == W and m["workload"] == wl]
        ports = list(dict.fromkeys(m["scheme"] for m in rows if m["kind"] == "hvd_api"))
        out += [f"W={W}, {wl}, network {rows[0]['network']}: Horovod script step ms, coded API step ms "
                "(Horovod's step / the coded API's, R)", "",
                "| stragglers | Horovod (R 1.00) | " + " | ".join(ports) + " |", "|---|---|" + "---|" * len(ports)]
        for model in dict.fromkeys(m["stragglers"] for m in rows):
            by = {m["scheme"]: m for m in rows if m["stragglers"] == model}
            hvd = by.get("horovod")
            cols = []
            for s in ports:
                m = by.get(s)
                if m is None:
                    cols.append("–")
                    continue
                ratio = f"{hvd['step_s'] / m['step_s']:.2f}x, " if hvd else ""
                cols.append(f"{m['step_s'] * 1e3:.0f} ({ratio}R {m['R']:.2f})")
            out.append(f"| {model} | {hvd['step_s'] * 1e3:.0f} | " if hvd else f"| {model} | – | ")
            out[-1] += " | ".join(cols) + " |"
        out.append("")
    return "\n".join(out)


def headline(results: dict) -> str:
    """The issue's table: largest W, CodedReduce s=1 vs Horovod, DDP, GC and its own straggler-free step."""
    cells = results["cells"]
    if not cells:
        return "no results"
    W = max(m["W"] for m in cells)
    out = [f"\nW={W} ({results['meta']['network']['mode']}"
           f"{' ' + results['meta']['network']['rate'] if results['meta']['network']['rate'] else ''}): "
           "CodedReduce step-time speed-up (x faster) against each baseline"]
    out.append(f"{'workload':8} {'stragglers':10} {'scheme':16} {'R':>5} {'step ms':>8} {'vs Horovod':>10} {'vs DDP':>8} "
               f"{'vs GC':>7} {'vs s=0':>7} {'/ own none':>10}")
    for wl in sorted({m["workload"] for m in cells}):
        for model in sim.STRAGGLER_MODELS:
            for m in cells:
                if m["W"] != W or m["workload"] != wl or m["stragglers"] != model or not _is_cr_s1(m["scheme"]):
                    continue
                def sp(vs):
                    r = _ratio(results["ratios"], W=W, workload=wl, stragglers=model, scheme=m["scheme"], vs=vs)
                    return f"{r['step_speedup']:.2f}x" if r else "–"
                o = _ratio(results["own"], W=W, workload=wl, stragglers=model, scheme=m["scheme"])
                out.append(f"{wl:8} {model:10} {m['scheme']:16} {m['R']:5.2f} {m['step_s'] * 1e3:8.1f} {sp('horovod'):>10} "
                           f"{sp('ddp'):>8} {sp('gc_s1'):>7} {sp('tree_n3_s0'):>7} "
                           f"{(str(round(o['step_vs_own_none'], 2)) + 'x') if o else '–':>10}")
    if results["goals"]:
        out.append("goals: " + "; ".join(f"W={g['W']} {g['workload']} {g['scheme']}: {g['goal']} -> {g['value']:.2f}x "
                                         f"{'MET' if g['met'] else 'not met'}" for g in results["goals"] if g["W"] == W))
    s = results.get("sim")
    if s:
        out.append("simulator validation (mean abs error of predicted step time): " + ", ".join(
            f"{k.replace('_no_horovod', ' w/o Horovod')}: {v['mean_abs_error'] * 100:.0f}% over {v['cells']} cells"
            for k, v in s["validation"].items() if v["cells"]))
        for r in s["paper_table"]:
            if r["stragglers"] == "paper":
                out.append(f"paper scale ({r['network']}, {r['compute']}): CR vs GC {r['cr_vs_gc']:.1f}x (paper 27.2x), "
                           f"CR vs RAR {r['cr_vs_rar']:.1f}x (paper 7.0x), R={r['R_cr']:.2f}")
    return "\n".join(out)


def write(results: dict, out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    scripts = script_table(results)
    (out / "results.md").write_text(markdown(results) + "\n\n## Regimes x schemes\n\n" + regime_table(results)
                                    + ("\n\n## Horovod script: horovod.torch vs the coded API\n\n" + scripts if scripts else ""))
    if plots:
        make_plots(results, out)


def make_plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    models = [m for m in sim.STRAGGLER_MODELS if any(c["stragglers"] == m for c in cells)]
    for W in sorted({m["W"] for m in cells}):
        for wl in sorted({m["workload"] for m in cells}):
            sel = [m for m in cells if m["W"] == W and m["workload"] == wl]
            if not sel:
                continue
            fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
            for ax, model in zip(axes[0], models):
                rows = [m for m in sel if m["stragglers"] == model]
                ax.boxplot([np.array(m["step_times_s"][WARMUP:]) * 1e3 for m in rows], showfliers=True)
                ax.set_xticks(range(1, len(rows) + 1), [f"{m['scheme']}\nR={m['R']:.2f}" for m in rows],
                              rotation=60, fontsize=7)
                ax.set_yscale("log")
                ax.set_title(f"{model}", fontsize=10)
                ax.set_ylabel("step time (ms)")
            fig.suptitle(f"Per-step time, W={W}, {wl} ({results['meta']['network']['mode']})")
            fig.tight_layout()
            fig.savefig(out / f"step_times_W{W}_{wl}.png", dpi=90)
            plt.close(fig)
            fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.0), squeeze=False)
            for ax, model in zip(axes[0], models):
                for m in [m for m in sel if m["stragglers"] == model]:
                    ax.plot([0.0] + m["done_s"], m["loss_curve"][: len(m["done_s"]) + 1], label=f"{m['scheme']} (R={m['R']:.2f})")
                ax.axhline(sel[0]["target_loss"], color="k", ls=":", lw=1)
                ax.set_title(model, fontsize=10)
                ax.set_xlabel("wall time (s)")
                ax.set_ylabel("loss")
            axes[0][-1].legend(fontsize=6)
            fig.suptitle(f"Time to target loss, W={W}, {wl}")
            fig.tight_layout()
            fig.savefig(out / f"time_to_target_W{W}_{wl}.png", dpi=90)
            plt.close(fig)
    s = results.get("sim")
    if s:
        fig, ax = plt.subplots(figsize=(5, 5))
        for p in s["predictions"]:
            ax.scatter(p["measured_s"] * 1e3, p["predicted_s"] * 1e3, s=12, marker="x" if p["calibration"] else "o",
                       color={"none": "C0", "paper": "C1", "heavy": "C3", "shiftexp": "C2"}.get(p["stragglers"], "C4"))
        lim = [min(p["measured_s"] for p in s["predictions"]) * 800, max(p["measured_s"] for p in s["predictions"]) * 1250]
        ax.plot(lim, lim, "k:", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured step (ms)")
        ax.set_ylabel("simulated step (ms)")
        ax.set_title("Simulator vs emulation (x: calibration)")
        fig.tight_layout()
        fig.savefig(out / "sim_validation.png", dpi=90)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        small = min(r["msg_bytes"] for r in s["sweep"])
        for model, ls in (("none", "--"), ("heavy", "-")):
            rows = [r for r in s["sweep"] if r["stragglers"] == model and r["msg_bytes"] == small]
            Ws = [r["W"] for r in rows]
            for key, color in (("cr_s1", "C0"), ("tree_s0", "C1"), ("gc_s1", "C2"), ("rar", "C3")):
                axes[0].plot(Ws, [r[key] * 1e3 for r in rows], ls, color=color, label=f"{key} ({model})")
                axes[1].plot(Ws, [(r["rar"] / r[key]) / r[f"R_{key}"] for r in rows], ls, color=color, label=f"{key} ({model})")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("workers W")
        axes[0].set_ylabel("step time (ms)")
        axes[1].set_ylabel("global samples/s relative to RAR")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Simulated sweep (n=12, fixed per-rank batch, {small / 1e3:.0f} KB messages)")
        fig.tight_layout()
        fig.savefig(out / "sim_sweep.png", dpi=90)
        plt.close(fig)
