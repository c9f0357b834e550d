"""Test-set evaluation of a checkpoint, logged into the run that trained it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from . import plots
from .config import ConfigError
from .data import DeviceData, load_splits
from .models import build_model
from .tracking import RunLogger
from .training import evaluate_split, resolve_device


def load_checkpoint(path: str | Path, device: torch.device) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError("checkpoint", f"no checkpoint at {path} (train first: `dvc repro train`)")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("checkpoint", f"{path} is not a readable checkpoint ({exc}); retrain it") from None


def evaluate(checkpoint: str | Path, metrics_file: Optional[str | Path] = None, batch_size: int = 1000,
             device: str = "auto", tracking_uri: Optional[str] = None, out_dir: Optional[Path] = None) -> dict:
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint, dev)
    cfg = OmegaConf.create(state["config"])
    splits = load_splits(cfg.data)
    if splits["checksum"] != state["data_checksum"]:
        raise ConfigError("checkpoint", f"trained on data {state['data_checksum']}, but the data here is {splits['checksum']}")
    model = build_model(cfg.model, cfg.data).to(dev)
    model.load_state_dict(state["model"])
    test = DeviceData(splits["test_x"], splits["test_y"], dev)
    loss, acc, pred = evaluate_split(model, test, batch_size)
    labels = test.y.cpu()
    matrix = torch.bincount(labels * 10 + pred.cpu(), minlength=100).view(10, 10).numpy()
    result = {"test/accuracy": acc, "test/loss": loss, "diverged": state.get("diverged_at_step") is not None,
              "run_id": state["run_id"], "steps": state["step"]}
    out_dir = Path(out_dir or (Path(metrics_file).parent if metrics_file else Path(checkpoint).parent))
    out_dir.mkdir(parents=True, exist_ok=True)
    image = plots.confusion_matrix(matrix, out_dir / "confusion_matrix.png",
                                   f"test confusion matrix (accuracy {acc:.4f})")
    run = RunLogger.start(tracking_uri or state["tracking_uri"], "", "", {}, run_id=state["run_id"])
    run.log_metrics({"test/accuracy": acc, "test/loss": loss if np.isfinite(loss) else float("nan")},
                    step=state["step"], timestamp_ms=int(time.time() * 1000))
    run.log_artifact(image, "plots")
    run.close("FINISHED")
    if metrics_file:
        Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
        finite = lambda v: v if np.isfinite(v) else None  # noqa: E731 - strict JSON has no NaN
        Path(metrics_file).write_text(json.dumps({"test": {"accuracy": acc, "loss": finite(loss)}, "run_id": state["run_id"],
                                                  "diverged": result["diverged"], "steps": state["step"]}, indent=2) + "\n")
    return result
