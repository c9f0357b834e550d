"""The run loop: device-resident data, the step engine, MLflow, and the end-of-run record.

Read ``Trainer.fit`` top to bottom: batches -> ``StepEngine.step`` -> flush the telemetry
every ``telemetry.log_every`` steps -> validate once per epoch -> stop at a divergence;
then ``finish`` writes the summary, tags, plots and checkpoint.

Divergence is a result, not an error: a non-finite loss or gradient that was applied
stops training, tags the run ``diverged=true`` with metric ``diverged_at_step``, keeps
everything logged up to that step, and returns normally.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from . import checkpoint, plots
from .config import check, resolve_device
from .data import DeviceData, EpochOrder, load_splits
from .engine import StepEngine
from .evaluation import evaluate_split
from .models import build_model
from .stabilizers import stabilizer_label
from .telemetry import DivergenceWatch, Explosion, detect_explosion
from .tracking import RunLogger, flatten, run_name, run_tags, tracking_uri

MAX_CONSECUTIVE_SKIPS = 100  # a run that skips this many steps in a row has diverged too


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    checkpoint: Path
    steps: int
    diverged: bool
    diverged_at_step: Optional[int]
    explosion_step: Optional[int]
    explosion_first_layer: Optional[str]
    val_accuracy: float
    seconds_per_step: float


class Trainer:
    """One run: the data on the device, the step engine, and the loop that drives it."""

    def __init__(self, cfg, output_dir: Path):
        check(cfg)
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.device = resolve_device(cfg.trainer.device)
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        splits = load_splits(cfg.data, log=log)
        self.data_checksum = splits["checksum"]
        self.train_data = DeviceData(splits["train_x"], splits["train_y"], self.device)
        self.val_data = DeviceData(splits["val_x"], splits["val_y"], self.device)
        self.order = EpochOrder(cfg.seed, len(self.train_data), cfg.trainer.batch_size)
        per_epoch = self.order.batches_per_epoch
        self.total_steps = min(cfg.trainer.epochs * per_epoch, cfg.trainer.max_steps or math.inf)
        model = build_model(cfg.model, cfg.data).to(self.device)
        self.engine = StepEngine(cfg, model, self.device, self.total_steps, per_epoch)
        self.divergence = DivergenceWatch(MAX_CONSECUTIVE_SKIPS)
        self.train_seconds = 0.0
        self.run_id: Optional[str] = None
        self.last_val = (math.nan, math.nan)  # (loss, accuracy) of the latest validation
        self.bar = None
        if cfg.trainer.resume:
            self.load(cfg.trainer.resume)

    @property
    def history(self):
        return self.engine.recorder.history

    @property
    def done(self) -> bool:
        return self.engine.step_count >= self.total_steps or self.divergence.step is not None

    # ------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        run = self.start_run()
        try:
            t0 = time.perf_counter()
            while not self.done:
                for x, y in self.order.batches(self.train_data):
                    self.engine.step(x, y)
                    if self.engine.recorder.full:
                        self.flush(run)
                    if self.done:
                        break
                self.flush(run)
                if self.order.epoch_done and self.divergence.step is None:
                    self.end_epoch(run)
            self.train_seconds += time.perf_counter() - t0
            return self.finish(run)
        except BaseException:
            run.close("FAILED")
            raise
        finally:
            self.bar.close()

    def start_run(self) -> RunLogger:
        cfg = self.cfg
        tags = run_tags(cfg, device=self.device, data_checksum=self.data_checksum)
        run = RunLogger.start(tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, run_name(cfg), tags,
                              cfg.tracking.parent_run_id, self.run_id)
        self.run_id = run.run_id
        if self.engine.step_count == 0:
            run.log_params(flatten(cfg))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        interactive = cfg.trainer.progress and sys.stderr.isatty()
        self.bar = tqdm(total=self.total_steps, initial=self.engine.step_count, disable=not interactive,
                        dynamic_ncols=True)
        return run

    def flush(self, run: RunLogger) -> None:
        """One device->host copy of the pending rows; the new rows are checked for divergence, and
        their points go to MLflow up to and including a divergence step, nothing after it."""
        h = self.history
        known = len(h.steps)
        points = self.engine.recorder.flush()
        if len(h.steps) > known:
            at = self.divergence.update(h.steps[known:], h.rows[-1])
            if at is not None:
                points = [p for p in points if p[2] <= at]
                h.truncate(at)
        run.log_points(points, now_ms())
        if h.steps:
            self.bar.update(h.steps[-1] + 1 - self.bar.n)
            self.bar.set_postfix(epoch=self.order.epoch, loss=f"{h.column('train/loss')[-1]:.4g}",
                                 grad=f"{h.column('grad/norm')[-1]:.3g}")

    def validate(self, run: RunLogger) -> float:
        val_loss, val_acc, _ = evaluate_split(self.engine.model, self.val_data, autocast=self.engine.autocast)
        run.log_metrics({"train/accuracy": self.engine.reset_epoch_accuracy(), "val/accuracy": val_acc,
                         "val/loss": val_loss}, step=self.engine.step_count, timestamp_ms=now_ms())
        self.last_val = (val_loss, val_acc)
        return val_loss

    def end_epoch(self, run: RunLogger) -> None:
        self.engine.schedule.epoch_end(self.validate(run))
        self.order.next_epoch()

    # ------------------------------------------------------------ the end-of-run record
    def finish(self, run: RunLogger) -> TrainResult:
        """Last validation, summary metrics and tags, checkpoint, artifacts; then the run is closed."""
        cfg, h, at = self.cfg, self.history, self.divergence.step
        if at is not None:  # the weights of the diverged step: evaluated, not logged as a validation point
            self.last_val = evaluate_split(self.engine.model, self.val_data, autocast=self.engine.autocast)[:2]
        elif self.order.batch:  # a partial epoch (max_steps): still report val
            self.validate(run)
        explosion = detect_explosion(h, self.engine.recorder.layers, cfg.telemetry.explosion_factor,
                                     cfg.telemetry.explosion_window)
        summary, tags = self.summary(explosion)
        run.log_metrics(summary, step=h.steps[-1] if h.steps else 0, timestamp_ms=now_ms())
        run.set_tags(tags)
        ckpt = Path(cfg.trainer.checkpoint) if cfg.trainer.checkpoint else self.output_dir / "model.pt"
        self.save(ckpt)
        run.log_artifact(self.output_dir / "config.yaml")
        run.log_artifact(ckpt, "checkpoint")
        if cfg.telemetry.plots and h.steps:
            for path in self.plot(run.run_id, explosion):
                run.log_artifact(path, "plots")
        run.close("FINISHED")
        return TrainResult(run.run_id, run.client.tracking_uri, ckpt, len(h.steps), at is not None, at,
                           explosion.step, explosion.first_layer, self.last_val[1], summary["time/step_ms"] / 1000)

    def summary(self, explosion: Explosion) -> tuple[dict, dict]:
        h, at = self.history, self.divergence.step
        steps = len(h.steps)
        norm = h.column("grad/norm")
        finite = norm[np.isfinite(norm)]
        metrics = {"clip_rate": float((h.column("grad/clip_coef") < 1.0).mean()) if steps else 0.0,
                   "skip_count": float((h.column("grad/skipped") > 0.5).sum()), "steps": float(steps),
                   "time/step_ms": 1000 * self.train_seconds / max(steps, 1),
                   "grad/norm_max": float(finite.max()) if finite.size else (math.nan if steps else 0.0),
                   "final/val_accuracy": self.last_val[1], "final/val_loss": self.last_val[0],
                   "model/parameters": float(sum(p.numel() for p in self.engine.model.parameters()))}
        tags = {"diverged": str(at is not None).lower(), "exploding": str(explosion.step is not None).lower()}
        if at is not None:
            metrics["diverged_at_step"] = float(at)
        if explosion.step is not None:
            metrics["explosion/step"] = float(explosion.step)
            tags["explosion/step"] = explosion.step
            tags["explosion/first_layer"] = explosion.first_layer or "n/a"
        return metrics, tags

    def plot(self, run_id: str, explosion: Explosion) -> list:
        cfg, h = self.cfg, self.history
        layers = self.engine.recorder.layers
        title = f"{run_id[:8]} {cfg.model.name} {stabilizer_label(cfg.stabilizer)} seed {cfg.seed}"
        clip = cfg.stabilizer.get("clip")
        return [plots.layer_heatmap(h.steps, layers, h.layer_grid(len(layers)),
                                    self.output_dir / "grad_layer_heatmap.png", explosion.step, title),
                plots.norm_history(h.steps, h.column("grad/norm"), h.column("grad/norm_after"),
                                   h.column("grad/clip_coef"), h.column("grad/skipped"), h.column("grad/threshold"),
                                   self.output_dir / "grad_norm.png", clip.max_norm if clip is not None else None,
                                   explosion.step, self.divergence.step, title)]

    # ------------------------------------------------------------ checkpoints
    def save(self, path: Path) -> Path:
        return checkpoint.save(path, {
            "config": OmegaConf.to_container(self.cfg, resolve=True), "engine": self.engine.state_dict(),
            "order": self.order.state_dict(), "history": self.history.state_dict(), "step": len(self.history.steps),
            "train_seconds": self.train_seconds, "run_id": self.run_id, "tracking_uri": tracking_uri(self.cfg.tracking.uri),
            "data_checksum": self.data_checksum, "diverged_at_step": self.divergence.step})

    def load(self, path: str) -> None:
        state = checkpoint.load(path, self.device, "trainer.resume")
        self.engine.load_state_dict(state["engine"])
        self.order.load_state_dict(state["order"])
        self.history.load_state_dict(state["history"])
        self.train_seconds, self.run_id = state["train_seconds"], state["run_id"]


def train(cfg, output_dir: Path) -> TrainResult:
    return Trainer(cfg, output_dir).fit()
