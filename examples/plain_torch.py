"""A complete plain-PyTorch training loop (no Lightning) on CodedReduce.

    torchrun --standalone --nproc_per_node=7 examples/plain_torch.py --steps 30

Each rank trains a small MLP on its share of every global batch (CodedReduceBatchSampler), hands
its weighted gradient to the CodedReducer and applies the exact global mean. A rank that fell
behind applies the results it missed without computing them.
"""
import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_codedreduce.engine import CodedReducer
from lightning_codedreduce.plan import CodedReducePlan
from lightning_codedreduce.sampler import CodedReduceBatchSampler


def make_data(n: int = 4096, dim: int = 20, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 3, generator=g)
    return TensorDataset(x, (x @ w + 0.5 * torch.randn(n, 3, generator=g)).argmax(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--per-rank-batch", type=int, default=32)
    p.add_argument("--branching", type=int, default=3)
    p.add_argument("--stragglers", type=int, default=1)
    p.add_argument("--slow-rank", type=int, default=-1, help="this rank sleeps --delay s every step")
    p.add_argument("--delay", type=float, default=0.2)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere
    plan = CodedReducePlan(world, a.branching, a.stragglers)
    batch = plan.global_batch_for(a.per_rank_batch)
    data = make_data()
    sampler = CodedReduceBatchSampler(len(data), plan, rank, batch, seed=0)
    loader = DataLoader(data, batch_sampler=sampler)
    weights = sampler.sample_weights.float()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    params = list(model.parameters())
    reducer = CodedReducer(plan)
    if rank == 0:
        print(plan.describe(), f"\nglobal batch {batch}", flush=True)
    step, epoch, start = 0, 0, time.time()
    try:
        while step < a.steps:
            sampler.set_epoch(epoch)
            for x, y in loader:
                if step >= a.steps:
                    break
                if reducer.ready(step):  # reduced without us while we were slow: apply, don't compute
                    flat = reducer.result(step)
                    grads = torch.split(flat, [q.numel() for q in params])
                    loss = None
                else:
                    opt.zero_grad()
                    per_sample = nn.functional.cross_entropy(model(x), y, reduction="none")
                    loss = (weights * per_sample).sum()  # this rank's coded share of the global sum
                    loss.backward()
                    if rank == a.slow_rank:
                        time.sleep(a.delay)
                    grads = reducer.reduce(step, [q.grad for q in params])
                for q, g in zip(params, grads):
                    q.grad = g.view_as(q) / batch  # the global mean, as DDP would have it
                opt.step()
                if rank == 0 and loss is not None:
                    print(f"step {step:4d}  loss/sample {loss.item() / weights.sum().item():.4f}  "
                          f"{(step + 1) / (time.time() - start):.1f} steps/s", flush=True)
                step += 1
            epoch += 1
    finally:
        reducer.close()
    digest = sum(float(q.detach().double().sum()) for q in params)
    print(f"rank {rank} done: {step} steps, parameter checksum {digest:.10f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
