"""Horovod's ``examples/pytorch/pytorch_mnist.py``, structure kept, on generated MNIST-shaped data.

Runs with either API::

    horovodrun -np 4 -H localhost:4 --gloo python examples/horovod_mnist.py --api horovod
    horovodrun -np 4 -H localhost:4 --gloo python examples/horovod_mnist.py --api codedreduce
    torchrun --standalone --nproc_per_node=4 examples/horovod_mnist.py          # codedreduce (default)
    mpirun -np 4 python examples/horovod_mnist.py

The only differences between the two are the import and the training sampler (``hvd.DistributedSampler``
with the loader's ``batch_size``, where ``horovod.torch`` has none and the script uses torch's). With no
stragglers both train on the same global batches and end with the same parameters (dropout off, the
default here, so that the two draw no different masks). ``--slow-rank R --slow-factor 3`` makes rank R's
compute 3x slower (it sleeps twice each batch's compute time), to see what a straggler costs each API.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed
from torch.utils.data import TensorDataset

# Training settings
parser = argparse.ArgumentParser(description="PyTorch MNIST Example (generated data)")
parser.add_argument("--api", choices=["codedreduce", "horovod"], default="codedreduce",
                    help="lightning_codedreduce.horovod (default) or horovod.torch")
parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="input batch size for training (default: 64)")
parser.add_argument("--test-batch-size", type=int, default=1000, metavar="N", help="input batch size for testing")
parser.add_argument("--epochs", type=int, default=2, metavar="N", help="number of epochs to train (default: 2)")
parser.add_argument("--lr", type=float, default=0.01, metavar="LR", help="learning rate (default: 0.01)")
parser.add_argument("--momentum", type=float, default=0.5, metavar="M", help="SGD momentum (default: 0.5)")
parser.add_argument("--dropout", type=float, default=0.0, help="dropout (Horovod's example: 0.5; 0 keeps runs comparable)")
parser.add_argument("--seed", type=int, default=42, metavar="S", help="random seed (default: 42)")
parser.add_argument("--log-interval", type=int, default=10, metavar="N", help="batches between logging training status")
parser.add_argument("--train-size", type=int, default=4096, help="generated training samples")
parser.add_argument("--test-size", type=int, default=1024, help="generated test samples")
parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="model and data precision (float64: the two APIs agree to rounding, whatever the code)")
parser.add_argument("--torch-sampler", action="store_true",
                    help="train with torch's DistributedSampler even under codedreduce (the script changed by its import "
                         "alone: needs CODEDREDUCE_STRAGGLERS=0, an uncoded sum)")
parser.add_argument("--slow-rank", type=int, default=-1, help="this rank's compute is --slow-factor times slower")
parser.add_argument("--slow-factor", type=float, default=3.0)
parser.add_argument("--out", default=None, help="write this rank's results (parameters, timings) as JSON here")


class Net(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        self.dropout = dropout

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def generated_mnist(n: int, seed: int, dtype: torch.dtype = torch.float32) -> TensorDataset:
    """MNIST-shaped data (1x28x28, 10 classes) with a learnable class signal, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = 0.5 * prototypes[labels] + torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(images.to(dtype), labels)


def main() -> None:
    args = parser.parse_args()
    hvd = importlib.import_module("horovod.torch" if args.api == "horovod" else "lightning_codedreduce.horovod")

    # Horovod: initialize library.
    hvd.init()
    torch.manual_seed(args.seed)
    # Horovod: limit # of CPU threads to be used per worker.
    torch.set_num_threads(1)

    dtype = getattr(torch, args.dtype)
    train_dataset = generated_mnist(args.train_size, seed=1, dtype=dtype)
    # Horovod: use DistributedSampler to partition the training data (CodedReduce: its coded share of it).
    if hasattr(hvd, "DistributedSampler") and not args.torch_sampler:
        train_sampler = hvd.DistributedSampler(train_dataset, num_replicas=hvd.size(), rank=hvd.rank(),
                                               batch_size=args.batch_size)
    else:
        train_sampler = torch.utils.data.distributed.DistributedSampler(
            train_dataset, num_replicas=hvd.size(), rank=hvd.rank())
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler)

    test_dataset = generated_mnist(args.test_size, seed=2, dtype=dtype)
    # Horovod: use DistributedSampler to partition the test data (evaluation is not coded: torch's sampler).
    test_sampler = torch.utils.data.distributed.DistributedSampler(test_dataset, num_replicas=hvd.size(),
                                                                   rank=hvd.rank())
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=args.test_batch_size, sampler=test_sampler)

    model = Net(args.dropout).to(dtype)
    # By default, Adasum doesn't need scaling up learning rate.
    lr_scaler = hvd.size()
    optimizer = optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)

    # Horovod: broadcast parameters & optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    # Horovod: wrap optimizer with DistributedOptimizer.
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=hvd.Compression.none, op=hvd.Average)

    def train(epoch):
        model.train()
        # Horovod: set epoch to sampler for shuffling.
        train_sampler.set_epoch(epoch)
        for batch_idx, (data, target) in enumerate(train_loader):
            started = time.perf_counter()
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            if hvd.rank() == args.slow_rank:  # a straggler: its compute takes slow-factor times as long
                time.sleep((args.slow_factor - 1) * (time.perf_counter() - started))
            optimizer.step()
            if batch_idx % args.log_interval == 0 and hvd.rank() == 0:
                # Horovod: use train_sampler to determine the number of examples in this worker's partition.
                print("Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}".format(
                    epoch, batch_idx * len(data), len(train_sampler), 100. * batch_idx / len(train_loader),
                    loss.item()), flush=True)

    def metric_average(val, name):
        tensor = torch.tensor(val)
        avg_tensor = hvd.allreduce(tensor, name=name)
        return avg_tensor.item()

    def test():
        model.eval()
        test_loss = 0.
        test_accuracy = 0.
        with torch.no_grad():
            for data, target in test_loader:
                output = model(data)
                # sum up batch loss
                test_loss += F.nll_loss(output, target, reduction="sum").item()
                # get the index of the max log-probability
                pred = output.data.max(1, keepdim=True)[1]
                test_accuracy += pred.eq(target.data.view_as(pred)).cpu().float().sum().item()

        # Horovod: use test_sampler to determine the number of examples in this worker's partition.
        test_loss /= len(test_sampler)
        test_accuracy /= len(test_sampler)

        # Horovod: average metric values across workers.
        test_loss = metric_average(test_loss, "avg_loss")
        test_accuracy = metric_average(test_accuracy, "avg_accuracy")

        # Horovod: print output only on first rank.
        if hvd.rank() == 0:
            print("\nTest set: Average loss: {:.4f}, Accuracy: {:.2f}%\n".format(test_loss, 100. * test_accuracy),
                  flush=True)
        return test_loss, test_accuracy

    started = time.perf_counter()
    metrics = []
    for epoch in range(1, args.epochs + 1):
        train(epoch)
        metrics.append(test())
    train_s = time.perf_counter() - started
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.api}.rank{hvd.rank()}.json"), "w") as f:
            json.dump({"rank": hvd.rank(), "size": hvd.size(), "api": args.api, "seconds": train_s,
                       "skipped_steps": getattr(hvd, "skipped_steps", lambda: 0)(),
                       "metrics": metrics, "params": [p.detach().double().flatten().tolist() for p in model.parameters()]},
                      f)
    if hvd.rank() == 0:
        print(f"{args.api}: {args.epochs} epoch(s) in {train_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
