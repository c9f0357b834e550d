"""gradlab in a plain PyTorch loop: a small residual CNN (not one of gradlab's models) trained with
SGD at a learning rate that makes it explode, watched and (with --stabilizers) rescued.

    python examples/pytorch_loop.py                       # explodes: see the explosion record
    python examples/pytorch_loop.py --stabilizers clip    # the same run, clipped
    python examples/pytorch_loop.py --stabilizers warmup clip --steps 1000

The loop is an ordinary one; the three gradlab lines are marked.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import accuracy, mnist, report

import gradlab


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ResNetLite(nn.Module):
    """stem (stride 2) -> two residual blocks -> global average pool -> linear; no normalization."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.classifier = nn.Linear(channels, 10)

    def forward(self, x):
        return self.classifier(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stabilizers", nargs="*", default=[], help="gradlab stabilizer names, e.g. clip, warmup clip")
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experiment", default="gradlab-examples")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    data = mnist()
    x_train, y_train = data["train"]
    model = ResNetLite()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    name = f"resnetlite-{'+'.join(args.stabilizers) or 'none'}-lr{args.lr:g}-s{args.seed}"
    monitor = gradlab.GradientMonitor(model, optimizer, args.stabilizers,  # gradlab (1/3)
                                      tracking={"experiment": args.experiment, "run_name": name},
                                      out_dir=Path("outputs") / "examples" / name)
    step = 0
    while step < args.steps:
        for idx in torch.randperm(len(y_train)).split(args.batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            monitor.step(loss)  # gradlab (2/3): stabilizers + telemetry, where clip_grad_norm_ would go
            optimizer.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step}", flush=True)
            if step >= args.steps or monitor.diverged is not None:
                break
        if monitor.diverged is not None:
            break
    model.eval()
    test_accuracy = accuracy(model, *data["test"])
    result = monitor.finish(metrics={"test/accuracy": test_accuracy})  # gradlab (3/3): the end-of-run record
    report(data["name"], result, test_accuracy)


if __name__ == "__main__":
    main()
