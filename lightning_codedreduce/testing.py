"""A small regression task and MLP, and a single-process reference trainer that replays the global
batches a multi-process run used: shared by the tests and ``scripts/gpu_check.py`` (torch only, no
Lightning import).
"""
from __future__ import annotations

import hashlib

import torch
from torch.utils.data import TensorDataset

DIM, HIDDEN = 6, 8


def make_dataset(n: int = 40, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    w = torch.randn(DIM, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y[:, None])


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])


def param_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RecordsTraining:
    """LightningModule mixin: the initial parameters (``init``) and every step's global batch (``batches``,
    ``(epoch, batch_idx, dataset indices)``), which ``reference_train`` replays in a single process."""

    init: list[float] | None = None
    batches: list  # set in the module's __init__

    def on_train_start(self):
        if self.init is None:
            self.init = flat_params(self).tolist()

    def on_train_batch_start(self, batch, batch_idx):
        sampler = self.trainer.strategy.sampler
        self.batches.append((self.trainer.current_epoch, batch_idx, sampler.global_batch(batch_idx)))


def reference_train(init: list[float], steps: list[list[list[int]]], *, lr: float, momentum: float = 0.0,
                    clip: float | None = None, step_lr: tuple[int, float] | None = None,
                    n: int = 40, bf16: bool = False, accumulate: int = 1) -> torch.Tensor:
    """Single-process SGD on the same data: ``steps[k]`` lists the micro-batches (dataset indices of
    whole global batches) of optimizer step k; the gradient is the mean over micro-batches of each
    micro-batch's mean-loss gradient divided by ``accumulate`` (Lightning divides by
    ``accumulate_grad_batches`` also in a shorter last group of an epoch)."""
    data = make_dataset(n)
    net = make_net()
    with torch.no_grad():
        offset = 0
        for p in net.parameters():
            p.copy_(torch.tensor(init[offset:offset + p.numel()]).view_as(p))
            offset += p.numel()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_lr[0], step_lr[1]) if step_lr else None
    for micro in steps:
        opt.zero_grad()
        for idx in micro:
            x, y = data.tensors[0][idx], data.tensors[1][idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(x)
            loss = torch.nn.functional.mse_loss(out.float(), y) / accumulate
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
    return flat_params(net)
