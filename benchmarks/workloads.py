"""What every scheme of the benchmark shares: data, models, global batches, straggler models, replay.

Pure functions of the configuration, imported by the harness (planning, replay) and by every worker
process, so all ranks of all schemes see the same samples, initial weights and straggler delays.

Schemes (``kind``):

* ``coded``   CodedReduce via ``CodedReducer`` (``stragglers=0``: the uncoded tree, redundancy 1);
* ``gc``      master-worker gradient coding (Tandon et al.): rank 0 is a master that does not compute;
              ranks 1..W-1 hold fractional-repetition coded data (redundancy s+1) and the master
              decodes from the first decodable set (at most W-1-s workers). Built from the plan
              machinery: a flat ``CodedReducePlan(W, W-1, s)`` whose root keeps no data;
* ``allreduce`` DDP-style: ``torch.distributed.all_reduce`` of the flat gradient (gloo);
* ``horovod`` Horovod ring all-reduce: the Horovod training script ``hvd_script.py`` with ``horovod.torch``
              under ``horovodrun --gloo`` (or the environment it sets, inside network namespaces);
* ``hvd_api`` the same script with ``lightning_codedreduce.horovod`` (its plan from the scheme's
              ``CODEDREDUCE_*`` settings): the coded share of the same global batch, in units of the
              per-rank batch (``hvd.DistributedSampler``).

``horovod`` and ``hvd_api`` (``SCRIPT_KINDS``) run one launch of the script per cell; the others run in the
harness's own worker processes (``bench_worker.py``), every cell in one launch.

Batch (``--batch``): ``global`` (default) gives every scheme the same global batch, ``W x per_rank_batch``
(DDP's), so every scheme computes the same updates and time to any loss is the step-time ratio; a coded
rank then computes about ``R x per_rank_batch`` samples. ``per-rank`` gives every computing rank
``per_rank_batch`` samples in every scheme (the busiest exactly): the coded schemes' global batch is then
``capacity x per_rank_batch`` (= computing ranks / R), so equal compute per rank compares the layouts on
communication alone.

``auto`` is ``stragglers="auto"`` (``AdaptiveReducer``) as the strategy runs it: it starts uncoded in the balanced
layout and switches plans (either layout, s = 0 with or without speeds, 1, 2) every ``ADAPT_EVERY`` steps by the
advisor's prediction (``lightning_codedreduce/adapt.py``).

``prop_s0`` is the uncoded tree with speed-proportional loads: the straggler model's persistently slow
ranks (``slow``, ``slowroot``, ``paper``) get ``speeds=`` as a user who measured them would pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_codedreduce.plan import CodedReducePlan
from lightning_codedreduce.sim import (STRAGGLER_MODELS, MasterWorkerPlan, StragglerSpec, Stragglers,  # noqa: F401
                                       persistent_speeds)

BATCH_MODES = ("global", "per-rank")
SCRIPT_KINDS = ("horovod", "hvd_api")  # schemes run by benchmarks/hvd_script.py, one launch per cell
ON_REQUEST = ("hvd_api_bal", "crr_n3_s1")  # run only when --schemes names them (each costs a launch per cell)
ADAPT_EVERY = 5  # the auto scheme's steps between decisions (short cells: 25 steps)

# ---------------------------------------------------------------------------- workloads
WORKLOADS = {
    # the paper's: logistic regression, 5000 features (6552 samples as in the paper's EC2 runs)
    "logreg": dict(features=5000, samples=6552, classes=1, per_rank_batch=64, lr=0.25, compute_s=0.05,
                   target_loss=0.35),
    # a small NN: 3-layer MLP, ~265k parameters (about 1 MB of float32 gradient per message)
    "mlp": dict(features=256, samples=8192, classes=10, hidden=(512, 256), per_rank_batch=32, lr=0.5,
                compute_s=0.06, target_loss=2.0),
    # real model sizes (issue 11): a linear classifier plus a dense "bank" of parameters, 25 MB and 100 MB
    # of float32 gradient; cheap to compute (O(bank) per step), so the CPU is left to the communication
    "wide25": dict(features=64, samples=8192, classes=10, bank=25 * 2 ** 18, per_rank_batch=32, lr=0.5,
                   compute_s=0.1, target_loss=2.2),
    "wide100": dict(features=64, samples=8192, classes=10, bank=100 * 2 ** 18, per_rank_batch=32, lr=0.5,
                    compute_s=0.1, target_loss=2.2),
}


def data_paths(data_dir: Path, name: str) -> tuple[Path, Path]:
    return data_dir / f"{name}_x.npy", data_dir / f"{name}_y.npy"


def make_data(name: str, data_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the workload's synthetic data set once (workers memory-map it)."""
    spec = WORKLOADS[name]
    xp, yp = data_paths(data_dir, name)
    if xp.exists() and yp.exists():
        return xp, yp
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n, d = spec["samples"], spec["features"]
    x = rng.standard_normal((n, d), dtype=np.float32)
    if name == "logreg":
        w = rng.standard_normal(d).astype(np.float32) / math.sqrt(d)
        logits = 3.0 * (x @ w)
        y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    else:
        w1 = rng.standard_normal((d, 64)).astype(np.float32) / math.sqrt(d)
        w2 = rng.standard_normal((64, spec["classes"])).astype(np.float32) / 4.0
        logits = np.tanh(x @ w1) @ w2 * 4.0 + 0.5 * rng.standard_normal((n, spec["classes"])).astype(np.float32)
        y = logits.argmax(1).astype(np.int64)
    tmp_x, tmp_y = xp.with_suffix(".tmp.npy"), yp.with_suffix(".tmp.npy")
    np.save(tmp_x, x)
    np.save(tmp_y, y)
    tmp_x.rename(xp)
    tmp_y.rename(yp)
    return xp, yp


def _wide_model(spec: dict):
    """``logits = W x + b + z d`` with ``z = (P . u) / sqrt(len(P))``: P's gradient is dense and depends on every
    sample (``sum_i (dL_i/dlogits_i . d) u / sqrt(len(P))``), at O(len(P)) cost per step."""
    import torch
    from torch import nn

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(spec["features"], spec["classes"])
            self.bank = nn.Parameter(torch.zeros(spec["bank"]))
            self.register_buffer("u", torch.randn(spec["bank"]) / spec["bank"] ** 0.5)
            self.register_buffer("d", torch.randn(spec["classes"]))

        def forward(self, x):
            return self.head(x) + (self.bank @ self.u) * self.d

    return Wide()


def build_model(name: str):
    """The workload's model with seeded (identical everywhere) initial weights."""
    import torch
    from torch import nn

    spec = WORKLOADS[name]
    torch.manual_seed(1234)
    if "bank" in spec:
        return _wide_model(spec)
    if name == "logreg":
        model = nn.Linear(spec["features"], 1)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model
    h1, h2 = spec["hidden"]
    return nn.Sequential(nn.Linear(spec["features"], h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                         nn.Linear(h2, spec["classes"]))


def per_sample_loss(name: str, model, x, y):
    import torch.nn.functional as F

    out = model(x)
    if name == "logreg":
        return F.binary_cross_entropy_with_logits(out.squeeze(1), y, reduction="none")
    return F.cross_entropy(out, y, reduction="none")


def message_floats(name: str) -> int:
    return sum(p.numel() for p in build_model(name).parameters())


# ---------------------------------------------------------------------------- schemes
@dataclass(frozen=True)
class Scheme:
    name: str
    kind: str  # coded | gc | allreduce | horovod | hvd_api
    branching: int = 0
    stragglers: int = 0
    layout: str = "tree"  # coded: the plan's layout (tree | balanced)
    speeds: tuple[float, ...] | None = None  # coded: speed-proportional loads (CodedReducePlan(speeds=))
    adaptive: bool = False  # coded: stragglers="auto" (AdaptiveReducer; starts at this plan)
    coded_self: str = "none"  # coded tree: whose own compute is a slot of its code (CodedReducePlan(coded_self=))

    @property
    def label(self) -> str:
        if self.adaptive:
            return f"auto ({self.layout}, n={self.branching})"
        if self.kind == "hvd_api":
            return f"Horovod script, coded API ({self.layout}, n={self.branching}, s={self.stragglers})"
        if self.kind == "coded" and self.speeds is not None:
            return f"speed-proportional tree n={self.branching} s={self.stragglers}"
        if self.kind == "coded" and self.layout == "balanced":
            return f"CodedReduce balanced s={self.stragglers}"
        if self.kind == "coded" and self.coded_self != "none":
            return f"CodedReduce n={self.branching} s={self.stragglers}, coded {self.coded_self}"
        if self.kind == "coded":
            return f"CodedReduce n={self.branching} s={self.stragglers}" if self.stragglers else \
                f"uncoded tree n={self.branching} (s=0)"
        return {"gc": f"GC master-worker s={self.stragglers}", "allreduce": "DDP all_reduce (gloo)",
                "horovod": "Horovod script (horovod.torch, gloo ring)"}[self.kind]

    def script_env(self) -> dict[str, str]:
        """``hvd_api``: the ``CODEDREDUCE_*`` variables that give ``lightning_codedreduce.horovod`` this plan."""
        if self.kind != "hvd_api":
            return {}
        return {"CODEDREDUCE_STRAGGLERS": str(self.stragglers), "CODEDREDUCE_BRANCHING": str(self.branching),
                "CODEDREDUCE_LAYOUT": self.layout, "CODEDREDUCE_CODED_SELF": self.coded_self}


def default_schemes(world: int, straggler: StragglerSpec | None = None, seed: int = 0) -> list[Scheme]:
    """Every scheme; ``prop_s0``'s speeds are those the straggler model makes persistently slow (see
    ``persistent_speeds``; the worker seeds its straggler model with the same ``seed``). Where no rank is
    persistently slow ``prop_s0`` is ``tree_n3_s0`` and is left out."""
    flat = world - 1
    out = [Scheme("cr_n3_s1", "coded", 3, 1), Scheme("crr_n3_s1", "coded", 3, 1, coded_self="root"),
           Scheme("crb_s1", "coded", 3, 1, "balanced"),
           Scheme("crb_s2", "coded", 3, 2, "balanced")]
    if flat != 3:
        out.append(Scheme(f"cr_flat_n{flat}_s1", "coded", flat, 1))
    speeds = persistent_speeds(straggler or StragglerSpec("none"), world, seed)
    out.append(Scheme("tree_n3_s0", "coded", 3, 0))
    if set(speeds) != {1.0}:
        out.append(Scheme("prop_s0", "coded", 3, 0, speeds=tuple(speeds)))
    out += [Scheme("auto", "coded", 3, 0, "balanced", adaptive=True),
            Scheme("ddp", "allreduce"), Scheme("gc_s1", "gc", flat, 1), Scheme("horovod", "horovod"),
            Scheme("hvd_api", "hvd_api", 3, 1), Scheme("hvd_api_bal", "hvd_api", 3, 1, "balanced")]
    return out


def scheme_plan(scheme: Scheme, world: int):
    if scheme.kind in ("coded", "hvd_api"):
        return CodedReducePlan(world, scheme.branching, scheme.stragglers, layout=scheme.layout, speeds=scheme.speeds,
                               coded_self=scheme.coded_self)
    if scheme.kind == "gc":
        return MasterWorkerPlan(world, scheme.stragglers)
    return None


@dataclass
class Layout:
    """One scheme's data layout: global batch, and per rank the positions and weights it processes."""

    global_batch: int
    redundancy: float
    positions: list[list[int]]
    weights: list[list[float]]
    computing: list[int]  # ranks that compute

    def samples(self, rank: int) -> int:
        return len(self.positions[rank])


def layout(scheme: Scheme, world: int, per_rank_batch: int, batch: str = "global") -> Layout:
    """``batch="global"``: every scheme's global batch is ``world x per_rank_batch``; ``"per-rank"``: every
    computing rank gets ``per_rank_batch`` samples (see the module docstring)."""
    if batch not in BATCH_MODES:
        raise ValueError(f"unknown batch mode {batch!r}; use one of {BATCH_MODES}")
    plan = scheme_plan(scheme, world)
    if scheme.kind == "hvd_api":
        return unit_layout(plan, per_rank_batch)
    if plan is None:
        b = per_rank_batch
        pos = [list(range(r * b, (r + 1) * b)) for r in range(world)]
        return Layout(world * b, 1.0, pos, [[1.0] * b for _ in range(world)], list(range(world)))
    B = world * per_rank_batch if batch == "global" else plan.global_batch_for(per_rank_batch)
    pos, wts = [], []
    for r in range(world):
        shards = plan.shards(r, B)
        pos.append([p for sh in shards for p in range(sh.start, sh.stop)])
        wts.append([sh.weight for sh in shards for _ in range(len(sh))])
    return Layout(B, plan.redundancy, pos, wts, [r for r in range(world) if pos[r]])


def unit_layout(plan, per_rank_batch: int) -> Layout:
    """What ``hvd.DistributedSampler`` gives each rank: Horovod's global batch (``W x per_rank_batch``) cut into
    ``W`` units of ``per_rank_batch`` samples, allocated as ``plan.allocation(W)``. Always DDP's global batch:
    that is the API's promise (``--batch per-rank`` does not apply)."""
    W, b = plan.world_size, per_rank_batch
    pos, wts = [], []
    for shards in plan.allocation(W):
        pos.append([u * b + i for sh in shards for u in range(sh.start, sh.stop) for i in range(b)])
        wts.append([sh.weight for sh in shards for _ in range(len(sh) * b)])
    total = sum(len(p) for p in pos)
    return Layout(W * b, total / (W * b), pos, wts, [r for r in range(W) if pos[r]])


def global_batch(n: int, B: int, seed: int, step: int, _cache: dict = {}) -> np.ndarray:  # noqa: B006
    """Dataset indices of global batch ``step``: the convention of ``CodedReduceBatchSampler``
    (shuffle with ``seed + epoch``, ``ceil(n/B)`` steps per epoch, the last batch wraps around)."""
    import torch

    per_epoch = math.ceil(n / B)
    epoch, j = divmod(step, per_epoch)
    key = (n, seed, epoch)
    if key not in _cache:
        if len(_cache) > 8:
            _cache.clear()
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        _cache[key] = torch.randperm(n, generator=g).numpy()
    order = _cache[key]
    return order[(j * B + np.arange(B)) % n]


# ---------------------------------------------------------------------------- replay
def replay_losses(name: str, data_dir: Path, B: int, steps: int, seed: int = 0, eval_n: int = 2048,
                  target: float | None = None, max_steps: int | None = None) -> dict:
    """Loss after every step of exact minibatch SGD with global batch ``B`` (what every scheme
    computes, up to float32 rounding), on a fixed evaluation subset. Stops after ``steps`` or, with
    ``target``, once the target is reached (up to ``max_steps``)."""
    import torch

    spec = WORKLOADS[name]
    xp, yp = data_paths(data_dir, name)
    X = torch.from_numpy(np.load(xp))
    Y = torch.from_numpy(np.load(yp))
    n = X.shape[0]
    g = torch.Generator().manual_seed(99)
    ev = torch.randperm(n, generator=g)[: min(eval_n, n)]
    Xe, Ye = X[ev], Y[ev]
    model = build_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    with torch.no_grad():
        losses = [float(per_sample_loss(name, model, Xe, Ye).mean())]
    limit = max(steps, max_steps or steps)
    reached = None
    checksum = None
    k = 0
    while k < limit:
        idx = torch.from_numpy(global_batch(n, B, seed, k))
        opt.zero_grad()
        per_sample_loss(name, model, X[idx], Y[idx]).sum().div(B).backward()
        opt.step()
        k += 1
        with torch.no_grad():
            losses.append(float(per_sample_loss(name, model, Xe, Ye).mean()))
        if k == steps:
            checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        if target is not None and reached is None and losses[-1] <= target:
            reached = k
        if k >= steps and (target is None or reached is not None):
            break
    return {"losses": losses, "steps_to_target": reached, "checksum": checksum}
