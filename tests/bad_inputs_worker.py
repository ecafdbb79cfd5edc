"""One rank of the multi-process half of the bad-input suite (``tests/test_bad_inputs.py``).

Runs the scenarios one after another in the same processes (one Lightning import, one process
group). Every scenario fails the same way on every rank (or works), so the next one starts in step.
Writes ``<out>/<scenario>.rank<r>.json``: ``{"error_type", "error", "warnings", ...}`` plus, for
scenarios that train, hashes of the final parameters and buffers.

W=4 with the default plan (branching 3, stragglers 1): rank 0's three children use a (3,1) block code,
so ranks 1-3 weight their samples unequally and the strategy calls ``training_step`` per chunk.
"""
import argparse
import hashlib
import json
import os
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler, TensorDataset,  # noqa: E402
                              WeightedRandomSampler)

import pytorch_lightning as pl  # noqa: E402

import lightning_codedreduce  # noqa: E402,F401
from lightning_codedreduce import CodedReduceStrategy  # noqa: E402
from lit_common import DIM, make_dataset, make_net  # noqa: E402

A = None
RANK = int(os.environ.get("RANK", 0))


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.dtype != torch.bool else t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write(name, data):
    path = os.path.join(A.out, f"{name}.rank{RANK}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


class Net(pl.LightningModule):
    def __init__(self, lr=0.1, net=None, manual=False, log_sync=False, optimizer="sgd"):
        super().__init__()
        self.net = net if net is not None else make_net(1000 * RANK)  # rank-dependent: rank 0's is broadcast
        self.lr, self.log_sync, self.optimizer_name = lr, log_sync, optimizer
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x.to(self.dtype_of_input())), y.to(self.dtype_of_input()))

    def dtype_of_input(self):
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.log_sync:
            self.log("loss", loss, sync_dist=True, on_step=True)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(strategy=None, **kw):
    cfg = dict(accelerator="cpu", devices=A.world, strategy=strategy or "codedreduce", logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, max_steps=3, default_root_dir=os.path.join(A.out, "root"))
    cfg.update(kw)
    return pl.Trainer(**cfg)


def loader(n=40, batch_size=4, **kw):
    kw.setdefault("shuffle", True)
    return DataLoader(make_dataset(n), batch_size=batch_size, **kw)


def fit(model, data, strategy=None, **kw):
    t = trainer(strategy, **kw)
    t.fit(model, data)
    return t


def trained(model, t):
    return {"params": digest(list(model.parameters())), "buffers": digest(list(model.buffers())),
            "global_step": t.global_step, "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()
                                                          if p.is_floating_point() or p.is_complex())}


# ---------------------------------------------------------------- data loaders
class _Stream(IterableDataset):
    def __iter__(self):
        d = make_dataset()
        return iter(zip(d.tensors[0], d.tensors[1]))


def sc_iterable(name):
    fit(Net(), DataLoader(_Stream(), batch_size=4))


def sc_batch_sampler(name):
    ds = make_dataset()
    fit(Net(), DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), batch_size=4, drop_last=False)))


def sc_empty(name):
    fit(Net(), DataLoader(TensorDataset(torch.zeros(0, DIM), torch.zeros(0, 1)), batch_size=4))


def sc_smaller_than_batch(name):
    # 5 samples, global batch 10: one step per epoch, padded by wrapping around the epoch's permutation
    model = Net()
    t = fit(model, loader(n=5), max_steps=-1, max_epochs=2)
    return trained(model, t)


def sc_drop_last_too_few(name):
    fit(Net(), loader(n=5, drop_last=True))


def sc_weighted_sampler(name):
    ds = make_dataset()
    fit(Net(), DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler(torch.ones(len(ds)), len(ds))))


def sc_replacement(name):
    ds = make_dataset()
    fit(Net(), DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, replacement=True)))


def sc_length_differs(name):
    fit(Net(), loader(n=44 if RANK == 1 else 40))


def sc_global_batch_too_small(name):
    fit(Net(), loader(), strategy=CodedReduceStrategy(global_batch_size=2))


class _ListBatches(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"id": int(i)}


class _ListNet(Net):
    def training_step(self, batch, batch_idx):
        return self.net(torch.zeros(len(batch), DIM)).pow(2).mean()


def sc_chunk_without_tensors(name):
    # a weighted code splits the batch into chunks, but this batch holds no per-sample tensor
    fit(_ListNet(), DataLoader(_ListBatches(), batch_size=4, collate_fn=lambda items: [d["id"] for d in items]))


# ---------------------------------------------------------------- models
class _Unused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = make_net(1000 * RANK)
        self.unused = torch.nn.Linear(DIM, 3)  # never called in forward

    def forward(self, x):
        return self.used(x)


def sc_unused_parameters(name):
    net = _Unused()
    model = Net(net=net)
    t = fit(model, loader())
    out = trained(model, t)
    out["unused"] = digest(list(net.unused.parameters()))
    return out


def sc_frozen_layers(name):
    net = make_net(1000 * RANK)
    for p in net[0].parameters():
        p.requires_grad_(False)
    model = Net(net=net)
    before = [p.detach().clone() for p in net[0].parameters()]
    t = fit(model, loader())
    out = trained(model, t)
    out["frozen"] = digest(list(net[0].parameters()))
    # frozen layers are rank 0's (broadcast at set-up) and never change afterwards on rank 0
    out["frozen_unchanged_on_rank0"] = RANK != 0 or all(torch.equal(a, b) for a, b in zip(before, net[0].parameters()))
    return out


class _NonFloat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_net(1000 * RANK)
        self.register_buffer("calls", torch.tensor(RANK, dtype=torch.long))  # rank-dependent: rank 0's wins
        self.register_buffer("mask", torch.tensor([RANK % 2 == 0, True, False]))
        self.index = torch.nn.Parameter(torch.arange(3) + RANK, requires_grad=False)  # an integer parameter

    def forward(self, x):
        self.calls += 1
        return self.body(x)


def sc_non_float_parameters(name):
    net = _NonFloat()
    model = Net(net=net)
    t = fit(model, loader())
    out = trained(model, t)
    out.update(calls=int(net.calls), mask=net.mask.tolist(), index=net.index.tolist())
    return out


def sc_float64(name):
    model = Net(net=make_net(1000 * RANK).double())
    t = fit(model, loader())
    out = trained(model, t)
    out["dtype"] = str(next(model.parameters()).dtype)
    return out


class _Complex(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_net()
        self.phase = torch.nn.Parameter(torch.ones(1, dtype=torch.complex64))

    def forward(self, x):
        return self.body(x) * self.phase.abs()


def sc_complex_parameter(name):
    fit(Net(net=_Complex()), loader())


class _Lazy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x)


def sc_lazy_parameters(name):
    fit(Net(net=_Lazy()), loader())


class _LazyMaterialised(Net):
    def setup(self, stage):
        self.net(torch.zeros(1, DIM))  # one dummy forward pass: the lazy layer gets its shape


def sc_lazy_materialised(name):
    torch.manual_seed(RANK)
    model = _LazyMaterialised(net=_Lazy())
    t = fit(model, loader())
    return trained(model, t)


class _NaN(Net):
    def __init__(self, nan_rank, skip_nonfinite=False):
        super().__init__()
        self.nan_rank, self.skip_nonfinite = nan_rank, skip_nonfinite
        self.nonfinite_steps = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_rank == self.nan_rank and self.trainer.global_step == 1:
            loss = loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer):
        # the reduced gradient is the same on every rank, so this decision is too
        if not all(bool(torch.isfinite(p.grad).all()) for p in self.parameters() if p.grad is not None):
            self.nonfinite_steps.append(self.trainer.global_step)
            if self.skip_nonfinite:
                for p in self.parameters():
                    p.grad = None


def sc_nan_gradient(name):
    model = _NaN(nan_rank=0)  # the root's own gradient is always part of the sum
    t = fit(model, loader(), max_steps=4)
    return {**trained(model, t), "nonfinite_steps": model.nonfinite_steps}


def sc_nan_gradient_skipped(name):
    model = _NaN(nan_rank=0, skip_nonfinite=True)
    t = fit(model, loader(), max_steps=4)
    return {**trained(model, t), "nonfinite_steps": model.nonfinite_steps}


# ---------------------------------------------------------------- configuration that differs per rank
def sc_seed_differs(name):
    fit(Net(), loader(), strategy=CodedReduceStrategy(seed=1 if RANK == 1 else 0))


def sc_stragglers_differ(name):
    fit(Net(), loader(), strategy=CodedReduceStrategy(stragglers=0 if RANK == 2 else 1))


def sc_speeds_wrong_length(name):
    fit(Net(), loader(), strategy=CodedReduceStrategy(speeds=[1.0, 0.5, 1.0]))


# ---------------------------------------------------------------- training loop
def sc_sync_dist(name):
    model = Net(log_sync=True)
    t = fit(model, loader(), max_steps=2)
    return trained(model, t)


def sc_manual_default(name):
    # 4 ranks, default options: the plan's default code weights samples unequally; under manual
    # optimization the strategy picks a 0/1 code instead
    model = Net(manual=True)
    t = fit(model, loader(), max_steps=3)
    return {**trained(model, t), "uniform": t.strategy.sampler.uniform_weights}


def sc_lbfgs(name):
    fit(Net(optimizer="lbfgs"), loader())


def main():
    global A
    p = argparse.ArgumentParser()
    p.add_argument("--scenarios", required=True)
    p.add_argument("--out", required=True)
    A = p.parse_args()
    A.world = int(os.environ["WORLD_SIZE"])
    os.makedirs(A.out, exist_ok=True)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    for name in A.scenarios.split(","):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = globals()["sc_" + name](name) or {}
                data = {"error_type": None, "error": None, **out}
            except Exception as err:  # noqa: BLE001 - the test checks type and message
                data = {"error_type": type(err).__name__, "error": str(err), "traceback": traceback.format_exc()}
        data["warnings"] = [str(w.message) for w in caught]
        write(name, data)
    sys.stdout.flush()
    os._exit(0)  # (a scenario that stopped mid-fit may leave a reducer thread behind)


if __name__ == "__main__":
    main()
