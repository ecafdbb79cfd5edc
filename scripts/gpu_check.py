#!/usr/bin/env python
"""End-to-end check of the GPU path of lightning_codedreduce, in under 5 minutes on one GPU.

    .venv/bin/python scripts/gpu_check.py [--out DIR] [--world 3]
    .venv/bin/python scripts/gpu_check.py --cpu        # the same checks on CPU (tests this script anywhere)

Every check starts ``--world`` processes (ranks share the GPUs round-robin: all on GPU 0 on a one-GPU
machine) and compares against a single-process reference:

1. ``engine-gloo``: ``CodedReducer`` with CUDA tensors, staged through host memory (transport="gloo"),
   a (3,1) block code when W=4 or FRC pairs when W=3: every rank gets the exact global sum (float64
   reference, relative error < 1e-6), identical bytes on every rank, on the caller's device and
   dtype (a bf16 tensor in the list comes back as bf16); then one control collective over the same
   links (``all_gather_object``: every rank's value, no dead rank).
2. ``engine-nccl``: the same over transport="nccl" (two 2-rank communicators per tree link). NCCL
   refuses two ranks of one communicator on the same GPU ("Duplicate GPU detected"), so with fewer
   GPUs than ranks this check is tried and reported as SKIP with that reason.
3. ``lightning-gpu``: ``Trainer(accelerator="gpu", strategy=CodedReduceStrategy(...))``, 6 steps from
   different initial weights per rank: identical parameters on every rank, equal to a float32
   single-process CPU reference (rtol 1e-4). Ranks that share a GPU use a gloo default process group.
4. ``lightning-gpu-bf16``: the same with ``precision="bf16-mixed"`` (rtol 1e-2: GPU vs CPU bf16 autocast).
5. ``lightning-gpu-nccl``: transport="nccl" and an NCCL default group, one GPU per rank (SKIP with
   fewer GPUs than ranks).

Prints one line per check (PASS/FAIL/SKIP, seconds, details) and writes ``<out>/gpu_check.json``.
Exit status: 0 if nothing failed, 1 if a check failed, 2 if CUDA is not available (without --cpu).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightning_codedreduce._util import free_port  # noqa: E402

# ======================================================================== worker side (one rank)


def _device(cpu: bool) -> torch.device:
    if cpu:
        return torch.device("cpu")
    index = int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def worker_engine(a) -> dict:
    import torch.distributed as dist

    from lightning_codedreduce import CodedReducePlan
    from lightning_codedreduce.engine import CodedReducer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device(a.cpu)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    plan = CodedReducePlan(world, a.branching, a.stragglers)
    B = plan.global_batch_for(4)
    D = 1 << 16

    def sample_grad(j: int) -> torch.Tensor:
        return torch.randn(D, generator=torch.Generator().manual_seed(1000 + j), dtype=torch.float64)

    local = torch.zeros(D, dtype=torch.float64)
    for sh in plan.shards(rank, B):
        for j in range(sh.start, sh.stop):
            local += sh.weight * sample_grad(j)
    expected = sum(sample_grad(j) for j in range(B))
    reducer = CodedReducer(plan, timeout=30.0, transport=a.transport)
    errors, hashes, times, devices = [], [], [], []
    small_bf16 = torch.arange(8, dtype=torch.bfloat16, device=device)
    for step in range(a.steps):
        scale = float(step + 1)
        t0 = time.perf_counter()
        out, out_bf16 = reducer.reduce(step, [(local * scale).float().to(device), small_bf16])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        devices.append([str(out.device), str(out_bf16.device), str(out_bf16.dtype)])
        exact = expected * scale
        errors.append(float((out.double().cpu() - exact).norm() / exact.norm()))
        hashes.append(hashlib.sha256(out.cpu().numpy().tobytes()).hexdigest()[:16])
    # a control collective over the same links (Lightning's barriers and broadcasts travel these during fit)
    values, dead = reducer.all_gather_object({"rank": rank, "token": f"r{rank}"})
    collective_ok = values == {r: {"rank": r, "token": f"r{r}"} for r in range(world)} and not dead
    reducer.close()
    dist.destroy_process_group()
    return {"rank": rank, "errors": errors, "hashes": hashes, "times": times, "devices": devices,
            "expected_device": str(device), "transport": a.transport, "plan": repr(plan), "collective": collective_ok}


def worker_lightning(a) -> dict:
    import pytorch_lightning as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from lightning_codedreduce import CodedReduceStrategy
    from lightning_codedreduce.testing import flat_params, make_dataset, make_net, param_hash

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(1000 * rank)  # different per rank: the strategy broadcasts rank 0's
            self.batches, self.init, self.grad_devices = [], None, set()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x).float(), y)

        def on_train_start(self):
            self.init = flat_params(self).tolist()

        def on_train_batch_start(self, batch, batch_idx):
            self.batches.append(self.trainer.strategy.sampler.global_batch(batch_idx))

        def on_before_optimizer_step(self, optimizer):
            self.grad_devices |= {str(p.grad.device) for p in self.parameters() if p.grad is not None}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    shared = a.cpu or torch.cuda.device_count() < world
    kw = dict(branching=a.branching, stragglers=a.stragglers, timeout=30.0, transport=a.transport)
    if a.cpu:
        kw.update(parallel_devices=[torch.device("cpu")] * world)
    elif shared:  # ranks share GPUs: Lightning would refuse devices=world, and NCCL two ranks on one GPU
        kw.update(parallel_devices=[torch.device("cuda", r % torch.cuda.device_count()) for r in range(world)],
                  process_group_backend="gloo")
    trainer_kw = dict(accelerator="cpu" if a.cpu else "gpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, max_steps=a.steps,
                      precision=a.precision, default_root_dir=tempfile.mkdtemp())
    if not shared:
        trainer_kw["devices"] = world
    model = Net()
    trainer = pl.Trainer(strategy=CodedReduceStrategy(**kw), **trainer_kw)
    trainer.fit(model, DataLoader(make_dataset(40), batch_size=4, shuffle=True))
    return {"rank": trainer.global_rank, "params": flat_params(model).cpu().tolist(), "hash": param_hash(model),
            "init": model.init, "batches": model.batches, "root_device": str(trainer.strategy.root_device),
            "grad_devices": sorted(model.grad_devices), "global_step": trainer.global_step,
            "backend": trainer.strategy._process_group_backend}


# ======================================================================== orchestrator


def _launch(kind: str, world: int, out: Path, extra: list[str], timeout: float) -> tuple[list[int], list[str]]:
    from lightning_codedreduce._procs import LaunchTimeout, run

    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "HOROVOD_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    env.setdefault("NCCL_DEBUG", "WARN")  # NCCL's reason (e.g. "Duplicate GPU detected") in the logs
    commands = [([sys.executable, __file__, "--worker", kind, "--out", str(out), *extra],
                 dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(world)]
    try:
        res = run(commands, out, timeout, log_names=[f"{kind}.rank{r}.log" for r in range(world)])
    except LaunchTimeout as err:  # the ranks were stopped: report them as failed, with their logs
        res = err.result
    return [-9 if rc is None else rc for rc in res.returncodes], res.outputs


def _results(out: Path, kind: str, world: int) -> list[dict]:
    return [json.loads((out / f"{kind}.rank{r}.json").read_text()) for r in range(world)]


def _tail(texts: list[str]) -> str:
    lines = [line for t in texts for line in t.strip().splitlines()[-3:]]
    return " | ".join(lines)[-600:]


def check_engine(a, out: Path, transport: str) -> tuple[str, str]:
    world = a.world
    extra = ["--transport", transport, "--branching", str(a.branching), "--stragglers", "1", "--steps", "5"]
    if a.cpu:
        extra.append("--cpu")
    kind = f"engine-{transport}"
    rcs, texts = _launch("engine", world, out / kind, extra, a.check_timeout)
    if any(rc != 0 for rc in rcs):
        joined = "\n".join(texts)
        if transport == "nccl" and ("Duplicate GPU" in joined or "invalid usage" in joined):
            return "SKIP", f"NCCL refuses two ranks of one communicator on one GPU ({torch.cuda.device_count()} GPU(s), " \
                           f"{world} ranks): needs one GPU per rank"
        return "FAIL", f"exit codes {rcs}: {_tail(texts)}"
    res = _results(out / kind, "engine", world)
    worst = max(max(d["errors"]) for d in res)
    same = all(d["hashes"] == res[0]["hashes"] for d in res)
    placed = all(dev == [d["expected_device"], d["expected_device"], "torch.bfloat16"] for d in res for dev in d["devices"])
    step_ms = 1e3 * sum(sum(d["times"][1:]) for d in res) / sum(len(d["times"][1:]) for d in res)
    collective = all(d["collective"] for d in res)
    detail = f"{res[0]['plan']}; max rel. error {worst:.1e}; identical on all ranks: {same}; results on " \
             f"{res[0]['expected_device']}: {placed}; tree collective: {collective}; {step_ms:.1f} ms per reduce of 64k floats"
    return ("PASS" if worst < 1e-6 and same and placed and collective else "FAIL"), detail


def check_lightning(a, out: Path, kind: str, transport: str, precision: str) -> tuple[str, str]:
    from lightning_codedreduce.testing import reference_train

    world = a.world
    if transport == "nccl" and not a.cpu and torch.cuda.device_count() < world:
        return "SKIP", f"transport='nccl' needs one GPU per rank ({torch.cuda.device_count()} GPU(s), {world} ranks)"
    extra = ["--transport", transport, "--precision", precision, "--branching", str(a.branching),
             "--stragglers", "1", "--steps", "6"]
    if a.cpu:
        extra.append("--cpu")
    rcs, texts = _launch("lightning", world, out / kind, extra, a.check_timeout)
    if any(rc != 0 for rc in rcs):
        return "FAIL", f"exit codes {rcs}: {_tail(texts)}"
    res = _results(out / kind, "lightning", world)
    same = len({d["hash"] for d in res}) == 1 and all(d["init"] == res[0]["init"] for d in res)
    bf16 = precision.startswith("bf16")
    ref = reference_train(res[0]["init"], [[b] for b in res[0]["batches"]], lr=0.1, bf16=bf16)
    got = torch.tensor(res[0]["params"])
    rtol, atol = (1e-2, 2e-3) if bf16 else (1e-4, 1e-5)
    close = bool(torch.allclose(got, ref, rtol=rtol, atol=atol))
    err = float((got - ref).abs().max())
    devices = sorted({d["root_device"] for d in res})
    grads = sorted({g for d in res for g in d["grad_devices"]})
    on_gpu = a.cpu or all(dv.startswith("cuda") for dv in devices + grads)
    detail = (f"{world} ranks on {devices}, grads on {grads}, default group {res[0]['backend']}; identical: {same}; "
              f"max |param - reference| {err:.1e} (rtol {rtol}); steps {res[0]['global_step']}")
    return ("PASS" if same and close and on_gpu and res[0]["global_step"] == 6 else "FAIL"), detail


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="where logs and gpu_check.json go (default: a temporary folder)")
    p.add_argument("--world", type=int, default=3, help="processes per check (2-4)")
    p.add_argument("--branching", type=int, default=2)
    p.add_argument("--cpu", action="store_true", help="run the same checks on CPU (a dry run of this script)")
    p.add_argument("--check-timeout", type=float, default=55.0, help="seconds per check (5 checks: under 5 min)")
    # worker mode (internal)
    p.add_argument("--worker", choices=["engine", "lightning"])
    p.add_argument("--transport", default="gloo")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--stragglers", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    if a.worker:
        fn = worker_engine if a.worker == "engine" else worker_lightning
        try:
            data = fn(a)
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        with open(Path(a.out) / f"{a.worker}.rank{os.environ['RANK']}.json", "w") as f:
            json.dump(data, f)
        sys.stdout.flush()
        os._exit(0)

    if not a.cpu and not torch.cuda.is_available():
        print(f"gpu_check: FAIL: CUDA is not available (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False); nothing to check. Use --cpu for a dry run of the script.")
        return 2
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    if a.cpu:
        env = f"CPU dry run (torch {torch.__version__})"
    else:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env = f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL " \
              f"{'.'.join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else '-'}, " \
              f"{len(names)} GPU(s): {', '.join(sorted(set(names)))}"
    print(f"gpu_check: {env}; {a.world} ranks per check", flush=True)
    checks = [
        ("engine-gloo", lambda: check_engine(a, out, "gloo")),
        ("engine-nccl", lambda: ("SKIP", "no CUDA (--cpu)") if a.cpu else check_engine(a, out, "nccl")),
        ("lightning-gpu", lambda: check_lightning(a, out, "lightning-gpu", "gloo", "32-true")),
        ("lightning-gpu-bf16", lambda: check_lightning(a, out, "lightning-gpu-bf16", "gloo", "bf16-mixed")),
        ("lightning-gpu-nccl", lambda: ("SKIP", "no CUDA (--cpu)") if a.cpu
         else check_lightning(a, out, "lightning-gpu-nccl", "nccl", "32-true")),
    ]
    report, t_all = [], time.monotonic()
    for name, fn in checks:
        t0 = time.monotonic()
        try:
            status, detail = fn()
        except Exception as err:  # a bug in a check must not hide the others
            status, detail = "FAIL", f"{type(err).__name__}: {err}"
        seconds = time.monotonic() - t0
        report.append({"check": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"{status:4s} {name:20s} {seconds:6.1f} s  {detail}", flush=True)
    failed = [r["check"] for r in report if r["status"] == "FAIL"]
    total = time.monotonic() - t_all
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed or skipped'} "
          f"({total:.0f} s); logs in {out}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "world": a.world, "checks": report,
                                                    "seconds": round(total, 1)}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
