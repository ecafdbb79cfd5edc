"""One rank of ``tests/test_horovod_api.py``: every call of ``lightning_codedreduce.horovod`` next to the same
call of ``horovod.torch``, in one process started by ``horovodrun --gloo`` (both APIs initialised).

Writes ``api.rank<r>.json``: per check, the largest absolute difference between the two results (or a
value the test compares). Training checks run in float64 so that the two agree to rounding.
"""
import argparse
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import horovod.torch as ref
import lightning_codedreduce.horovod as hvd

torch.set_default_dtype(torch.float64)
EARLY_BUCKETS: list[int] = []  # per training run with our optimizer: buckets handed in while its last backward ran
torch.set_num_threads(1)


def diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max([diff(x, y) for x, y in zip(a, b)] + [0.0 if len(a) == len(b) else float("inf")])
    if isinstance(a, dict):
        return max([diff(a[k], b[k]) for k in a] + [0.0 if a.keys() == b.keys() else float("inf")])
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")
    return 0.0 if a == b else float("inf")


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(hvd.size() * 8 * 6, 10, generator=g)
    return TensorDataset(x, (x[:, :3] * 2).argmax(1))


def train(api, loop: str, slow_rank: int = -1, **options) -> list[torch.Tensor]:
    """One epoch (6 steps at 8 samples per rank) with ``api``'s optimizer and sampler; the parameters after it.
    ``loop="edit"``: ours registers the clipping with ``edit_gradients`` and steps plainly (Horovod's runs "clip").
    ``slow_rank`` sleeps 0.2 s after each of its backward passes."""
    net = model(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = api.DistributedOptimizer(opt, named_parameters=net.named_parameters(), **options)
    if loop == "edit":
        if api is hvd:
            opt.edit_gradients(lambda: nn.utils.clip_grad_norm_(net.parameters(), 0.05))
        else:
            loop = "clip"
    dataset = data()
    if api is hvd:
        sampler = hvd.DistributedSampler(dataset, batch_size=8)
    else:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=ref.size(), rank=ref.rank())
    passes = options.get("backward_passes_per_step", 1)
    for i, (x, y) in enumerate(DataLoader(dataset, batch_size=8, sampler=sampler)):
        if i % passes == 0:
            opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if api.rank() == slow_rank:
            time.sleep(0.2)
        if (i + 1) % passes:
            continue
        if loop == "clip":  # Horovod's pattern for clipping the averaged gradient
            opt.synchronize()
            nn.utils.clip_grad_norm_(net.parameters(), 0.05)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
    if api is hvd:
        EARLY_BUCKETS.append(opt.early_buckets)
    return [p.detach().clone() for p in net.parameters()]


def sparse_embedding(api, sparse_as_dense: bool = True) -> list[torch.Tensor]:
    """Three steps of a sparse embedding (sparse gradients) with plain SGD, which takes sparse gradients."""
    torch.manual_seed(5)
    net = nn.EmbeddingBag(20, 4, mode="sum", sparse=True)
    opt = api.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.5), named_parameters=net.named_parameters(),
                                   sparse_as_dense=sparse_as_dense)
    ids = torch.arange(api.size() * 2 * 3 * 2).remainder(20).reshape(-1, 2)  # 2 bags per rank and step, 3 steps
    dataset = TensorDataset(ids, torch.randn(len(ids), 4, generator=torch.Generator().manual_seed(6)))
    sampler = (hvd.DistributedSampler(dataset, shuffle=False, batch_size=2) if api is hvd else
               torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=ref.size(), rank=ref.rank(),
                                                               shuffle=False))
    for x, y in DataLoader(dataset, batch_size=2, sampler=sampler):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out_dir = p.parse_args().out
    ref.init()
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    res: dict = {"rank": rank}
    res["identity"] = {name: [getattr(hvd, name)(), getattr(ref, name)()] for name in
                       ("rank", "size", "local_rank", "local_size", "cross_rank", "cross_size")}

    t = torch.arange(6.0).reshape(2, 3) * (rank + 1) - 4.0
    ops = ["Average", "Sum", "Min", "Max", "Product"]
    for name in ops:
        res[f"allreduce_{name}"] = diff(hvd.allreduce(t, op=getattr(hvd, name)), ref.allreduce(t, op=getattr(ref, name)))
    res["allreduce_default"] = diff(hvd.allreduce(t, name="m"), ref.allreduce(t, name="m"))
    res["allreduce_average_false"] = diff(hvd.allreduce(t, average=False), ref.allreduce(t, average=False))
    res["allreduce_scaled"] = diff(hvd.allreduce(t, prescale_factor=0.5, postscale_factor=3.0),
                                   ref.allreduce(t, prescale_factor=0.5, postscale_factor=3.0))
    res["allreduce_scalar_metric"] = diff(hvd.allreduce(torch.tensor(0.25 * rank)), ref.allreduce(torch.tensor(0.25 * rank)))
    mine, theirs = t.clone(), t.clone()
    hvd.allreduce_(mine, op=hvd.Sum)
    ref.allreduce_(theirs, op=ref.Sum)
    res["allreduce_"] = diff(mine, theirs)

    ragged = torch.full((rank + 1, 2), float(rank))
    res["allgather"] = diff(hvd.allgather(ragged), ref.allgather(ragged))
    res["allgather_object"] = diff(hvd.allgather_object({"r": rank}), ref.allgather_object({"r": rank}))
    res["broadcast"] = diff(hvd.broadcast(t, root_rank=1), ref.broadcast(t, root_rank=1))
    mine, theirs = t.clone(), t.clone()
    hvd.broadcast_(mine, root_rank=2)
    ref.broadcast_(theirs, root_rank=2)
    res["broadcast_"] = diff(mine, theirs)
    res["broadcast_object"] = diff(hvd.broadcast_object({"from": rank, "x": [rank]}, root_rank=world - 1),
                                   ref.broadcast_object({"from": rank, "x": [rank]}, root_rank=world - 1))

    a, b = model(100 + rank), model(100 + rank)  # different weights per rank
    hvd.broadcast_parameters(a.state_dict(), root_rank=1)
    ref.broadcast_parameters(b.state_dict(), root_rank=1)
    res["broadcast_parameters_state_dict"] = diff(a.state_dict(), b.state_dict())
    a, b = model(200 + rank), model(200 + rank)
    hvd.broadcast_parameters(list(a.named_parameters()), root_rank=0)
    ref.broadcast_parameters(list(b.named_parameters()), root_rank=0)
    res["broadcast_parameters_named"] = diff(a.state_dict(), b.state_dict())

    # optimizer state: a stepped Adam whose state differs per rank, and a fresh SGD (Horovod steps it once on zeros)
    def stepped_adam(net):
        opt = torch.optim.Adam(net.parameters(), lr=0.01 * (rank + 1))
        net(torch.randn(4, 10, generator=torch.Generator().manual_seed(rank))).sum().backward()
        opt.step()
        return opt
    a, b = model(3), model(3)
    oa, ob = stepped_adam(a), stepped_adam(b)
    hvd.broadcast_optimizer_state(oa, root_rank=0)
    ref.broadcast_optimizer_state(ob, root_rank=0)
    res["broadcast_optimizer_state_adam"] = diff(oa.state_dict(), ob.state_dict())
    a, b = model(4), model(4)
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    hvd.broadcast_optimizer_state(oa, root_rank=0)
    ref.broadcast_optimizer_state(ob, root_rank=0)
    res["broadcast_optimizer_state_fresh_sgd"] = diff([oa.state_dict(), list(a.parameters())],
                                                      [ob.state_dict(), list(b.parameters())])

    # the DistributedOptimizer: the same epoch under both APIs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, loop, options in [("optimizer_average", "plain", {}),
                                     ("optimizer_sum", "plain", {"op": "Sum"}),
                                     ("optimizer_clip_synchronize", "clip", {}),
                                     ("optimizer_backward_passes_2", "plain", {"backward_passes_per_step": 2}),
                                     ("optimizer_predivide_groups", "plain", {"gradient_predivide_factor": 2.0, "groups": 2})]:
            mine = train(hvd, loop, **{k: getattr(hvd, v) if k == "op" else v for k, v in options.items()})
            theirs = train(ref, loop, **{k: getattr(ref, v) if k == "op" else v for k, v in options.items()})
            res[label] = diff(mine, theirs) / max(float(q.abs().max()) for q in theirs)
        # a slow rank skips steps (catch-up) and still applies the clipped update, registered with edit_gradients
        skipped = hvd.skipped_steps()
        mine, theirs = train(hvd, "edit", slow_rank=2), train(ref, "edit")
        res["optimizer_clip_edit_slow_rank"] = diff(mine, theirs) / max(float(q.abs().max()) for q in theirs)
        res["skipped_by_slow_rank"] = hvd.skipped_steps() - skipped
    res["optimizer_sparse_as_dense"] = diff(sparse_embedding(hvd), sparse_embedding(ref))
    try:
        sparse_embedding(hvd, sparse_as_dense=False)
        res["sparse_refused"] = ""
    except ValueError as err:  # raised in the hook, during backward
        res["sparse_refused"] = str(err)
    res["early_buckets"] = EARLY_BUCKETS
    hvd.barrier()
    ref.barrier()
    res["join"] = [hvd.join(), ref.join()]
    with open(os.path.join(out_dir, f"api.rank{rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
