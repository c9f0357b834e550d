"""Evaluation: a device-resident split's loss and accuracy, and a checkpoint's test-set
evaluation logged into the run that trained it."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from . import checkpoint, plots
from .config import ConfigError, resolve_device
from .data import DeviceData, load_splits
from .models import build_model
from .tracking import RunLogger


@torch.no_grad()
def evaluate_split(model, data: DeviceData, batch_size: int = 1000, autocast=contextlib.nullcontext):
    """(mean loss, accuracy, predictions) over a device-resident split; one host copy at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=data.device)
    preds = []
    for x, y in data.batches(batch_size):
        with autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        preds.append(logits.argmax(1))
    model.train(was_training)
    pred = torch.cat(preds)
    acc = (pred == data.y).float().mean()
    return float(loss_sum / len(data)), float(acc), pred


def test_result(model, test: DeviceData, out_dir: Path, batch_size: int = 1000) -> Tuple[dict, Path]:
    """A model's test-set loss and accuracy (fp32, whatever the training precision) and its
    confusion plot: what ``evaluate`` records from a checkpoint, and what a matrix run records
    from its model in memory before its run is closed (``Trainer(test=True)``)."""
    loss, acc, pred = evaluate_split(model, test, batch_size)
    matrix = torch.bincount(test.y.cpu() * 10 + pred.cpu(), minlength=100).view(10, 10).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    image = plots.confusion_matrix(matrix, out_dir / "confusion_matrix.png", f"test confusion matrix (accuracy {acc:.4f})")
    return {"test/accuracy": acc, "test/loss": loss}, image


def log_test(run: RunLogger, metrics: dict, image: Path, step: int) -> None:
    loss = metrics["test/loss"]
    run.log_metrics({"test/accuracy": metrics["test/accuracy"], "test/loss": loss if np.isfinite(loss) else float("nan")},
                    step=step, timestamp_ms=int(time.time() * 1000))
    run.log_artifact(image, "plots")


def store_of(state: dict, uri: Optional[str], path) -> str:
    """The store holding the run that wrote the checkpoint (``uri``, else the one it was trained in)."""
    from mlflow.exceptions import MlflowException

    from .tracking import ensure_store

    uri = uri or state["tracking_uri"]
    try:
        ensure_store(uri).get_run(state["run_id"])
    except MlflowException:
        raise ConfigError("tracking_uri", f"run {state['run_id']} of {path} is not in {uri}: pass the store it was "
                                          "trained in as tracking_uri=...") from None
    return uri


def evaluate(checkpoint_path: str | Path, metrics_file: Optional[str | Path] = None, batch_size: int = 1000,
             device: str = "auto", tracking_uri: Optional[str] = None, out_dir: Optional[Path] = None) -> dict:
    dev = resolve_device(device)
    state = checkpoint.load(checkpoint_path, dev, "checkpoint")
    cfg = OmegaConf.create(state["config"])
    splits = load_splits(cfg.data)
    if splits["checksum"] != state["data_checksum"]:
        raise ConfigError("checkpoint", f"trained on data {state['data_checksum']}, but the data here is {splits['checksum']}")
    model = build_model(cfg.model, cfg.data).to(dev)
    model.load_state_dict(state["engine"]["model"])
    out_dir = Path(out_dir or (Path(metrics_file).parent if metrics_file else Path(checkpoint_path).parent))
    steps = state["step"]
    metrics, image = test_result(model, DeviceData(splits["test_x"], splits["test_y"], dev), out_dir, batch_size)
    run = RunLogger.start(store_of(state, tracking_uri, checkpoint_path), "", "", {}, run_id=state["run_id"])
    log_test(run, metrics, image, steps)
    run.close("FINISHED")
    acc, loss = metrics["test/accuracy"], metrics["test/loss"]
    result = {"test/accuracy": acc, "test/loss": loss, "diverged": state.get("diverged_at_step") is not None,
              "run_id": state["run_id"], "steps": steps}
    if metrics_file:
        Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
        finite = lambda v: v if np.isfinite(v) else None  # noqa: E731 - strict JSON has no NaN
        Path(metrics_file).write_text(json.dumps({"test": {"accuracy": acc, "loss": finite(loss)}, "run_id": state["run_id"],
                                                  "diverged": result["diverged"], "steps": steps}, indent=2) + "\n")
    return result
