"""What the examples share: MNIST as tensors, and one line that reports a monitored run.

Real MNIST when ``GRADLAB_DATA_MIRROR`` is set or ``data/prepared/mnist.pt`` exists (fetched and
prepared into ``data/`` once, as the DVC pipeline does); otherwise gradlab's synthetic stand-in
(templates plus noise), so an example runs anywhere in seconds.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without `pip install -e .`

import torch  # noqa: E402

from gradlab.data import MIRROR_ENV, DataConfig, load_splits, prepared_path, to_device  # noqa: E402


def mnist(device: str = "cpu") -> dict:
    """{"name", "train": (x, y), "test": (x, y)}: normalized float images [N, 1, 28, 28] on ``device``."""
    real = os.environ.get(MIRROR_ENV) or prepared_path("data", "mnist").exists()
    cfg = DataConfig(name="mnist" if real else "synthetic")
    splits = load_splits(cfg, log=lambda msg: print(msg, file=sys.stderr))
    to = torch.device(device)
    return {"name": cfg.name, "train": (to_device(splits["train_x"], to), splits["train_y"].to(to)),
            "test": (to_device(splits["test_x"], to), splits["test_y"].to(to))}


@torch.no_grad()
def accuracy(predict, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    right = sum(int((predict(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return right / len(y)


def report(data: str, result, test_accuracy: float) -> None:
    state = f"diverged at step {result.diverged_at_step}" if result.diverged_at_step is not None else "finished"
    flagged = (f"explosion flagged at step {result.explosion_step} (first layer: {result.explosion_first_layer})"
               if result.explosion_step is not None else "no explosion flagged")
    print(f"{data}: {state} after {result.steps} steps, {flagged}; clip rate {result.metrics['clip_rate']:.2f}, "
          f"max raw grad norm {result.metrics['grad/norm_max']:.3g}; test accuracy {test_accuracy:.4f}")
    print(f"MLflow run {result.run_id}; plots: {', '.join(str(p) for p in result.plots)}")
