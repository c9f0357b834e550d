"""The training loop: device-resident data, stabilizers, telemetry, MLflow, checkpoints.

Divergence is a result, not an error: a non-finite loss or gradient that was applied
stops training, tags the run ``diverged=true`` with metric ``diverged_at_step``, keeps
everything logged up to that step, and returns normally.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from . import plots
from .config import ConfigError, check
from .data import DeviceData, load_splits
from .models import build_model
from .optim import Schedule, build_optimizer
from .stabilizers import StabilizerStack, selected_names
from .telemetry import Recorder, detect_explosion, first_divergence
from .tracking import RunLogger, config_hash, flatten, git_commit, tracking_uri

MAX_CONSECUTIVE_SKIPS = 100  # a run that skips this many steps in a row has diverged too


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", f"'{name}' requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def stabilizer_label(cfg) -> str:
    names = selected_names(cfg.stabilizer)
    return "+".join(names) if names else "none"


def autocast_and_scaler(precision: str, device: torch.device):
    if precision == "32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def l1_penalty(model: torch.nn.Module) -> torch.Tensor:
    return sum(p.abs().sum() for n, p in model.named_parameters() if n.endswith("weight"))


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


class Trainer:
    """Holds one run's state; ``step`` is the hot path (no host sync)."""

    def __init__(self, cfg, output_dir: Path):
        check(cfg)
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.device = resolve_device(cfg.trainer.device)
        if cfg.trainer.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("trainer.precision", "fp16 needs CUDA (use bf16 or 32 on the CPU)")
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        splits = load_splits(cfg.data, log=self.log)
        self.data_checksum = splits["checksum"]
        self.train_data = DeviceData(splits["train_x"], splits["train_y"], self.device)
        self.val_data = DeviceData(splits["val_x"], splits["val_y"], self.device)
        self.test_split = (splits["test_x"], splits["test_y"])
        self.model = build_model(cfg.model, cfg.data).to(self.device)
        self.stack = StabilizerStack(cfg.stabilizer, self.model, self.device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters(), self.device, capturable=self.stack.skips)
        bs = cfg.trainer.batch_size
        self.steps_per_epoch = math.ceil(len(self.train_data) / bs)
        self.total_steps = cfg.trainer.epochs * self.steps_per_epoch
        if cfg.trainer.max_steps:
            self.total_steps = min(self.total_steps, cfg.trainer.max_steps)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warm = cfg.stabilizer.warmup.steps if cfg.stabilizer.warmup is not None else None
        self.schedule = Schedule(self.optimizer, cfg.scheduler, warm, self.total_steps, self.steps_per_epoch)
        self.autocast, self.scaler = autocast_and_scaler(cfg.trainer.precision, self.device)
        self.recorder = Recorder(self.stack.names, self.device, cfg.telemetry.log_every, cfg.telemetry.layer_every)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.step_count, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.perm: Optional[torch.Tensor] = None
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.seen = 0
        self.train_seconds = 0.0
        self.run_id: Optional[str] = None
        if cfg.trainer.resume:
            self._load(cfg.trainer.resume)

    @staticmethod
    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    # ------------------------------------------------------------ hot path
    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step; everything it records stays on the device."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=False)
        with self.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.loss.label_smoothing)
        objective = loss + cfg.loss.l1 * l1_penalty(self.model) if cfg.loss.l1 > 0 else loss
        if self.scaler is not None:
            self.scaler.scale(objective).backward()
            self.scaler.unscale_(self.optimizer)  # stabilizers must see true gradients
        else:
            objective.backward()
        gs = self.stack.process(loss)
        layer_step = self.recorder.is_layer_step(self.step_count)
        old = self.stack.step(self.optimizer, gs, self.scaler, keep_old_params=layer_step)
        skipped = gs.skip if gs.skip is not None else torch.zeros((), dtype=torch.bool, device=self.device)
        if self.scaler is not None:
            skipped = skipped | ~torch.isfinite(gs.pre_norm)  # what GradScaler skips
            self.scaler.update()
        post = gs.current_norm()
        post = torch.where(skipped, 0.0, post)  # the gradient actually applied
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)
        lr = self.schedule.lr
        self.recorder.record(self.step_count, lr, gs, post, skipped, old_params=old,
                             params=self.stack.params if layer_step else None)
        self.schedule.step()
        self.step_count += 1

    # ------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        cfg = self.cfg
        uri = tracking_uri(cfg.tracking.uri)
        run_name = cfg.tracking.run_name or f"{cfg.model.name}-{stabilizer_label(cfg)}-s{cfg.seed}"
        tags = {"model": cfg.model.name, "optimizer": cfg.optimizer.name, "data": cfg.data.name,
                "stabilizer": stabilizer_label(cfg), "scenario": cfg.scenario, "seed": cfg.seed,
                "scheduler": cfg.scheduler.name, "git_commit": git_commit(), "data_checksum": self.data_checksum,
                "config_hash": config_hash(flatten(cfg)),
                "device": str(self.device), **{str(k): str(v) for k, v in (cfg.tracking.tags or {}).items()}}
        run = RunLogger.start(uri, cfg.tracking.experiment, run_name, tags, cfg.tracking.parent_run_id, self.run_id)
        self.run_id = run.run_id
        if self.step_count == 0:
            run.log_params(flatten(cfg))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        diverged_at: Optional[int] = None
        interactive = cfg.trainer.progress and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step_count, disable=not interactive, dynamic_ncols=True)
        status = "FAILED"
        try:
            self.model.train()
            t0 = time.perf_counter()
            while self.step_count < self.total_steps and diverged_at is None:
                if self.perm is None:
                    self.perm = torch.randperm(len(self.train_data), generator=self.data_gen)
                for x, y in self.train_data.shuffled_batches(cfg.trainer.batch_size, self.perm, self.batch_in_epoch):
                    self.step(x, y)
                    self.batch_in_epoch += 1
                    if self.recorder.full:
                        diverged_at = self._flush(run, bar)
                    if diverged_at is not None or self.step_count >= self.total_steps:
                        break
                if diverged_at is None:
                    diverged_at = self._flush(run, bar)
                if diverged_at is not None:
                    break
                if self.batch_in_epoch >= self.steps_per_epoch:  # a whole epoch is done
                    self._end_epoch(run)
            self.train_seconds += time.perf_counter() - t0
            bar.close()
            result = self._finish(run, diverged_at)
            status = "FINISHED"
            return result
        finally:
            bar.close()
            if status != "FINISHED":
                run.close("FAILED")

    def _flush(self, run: RunLogger, bar) -> Optional[int]:
        points = self.recorder.flush()
        h = self.recorder.history
        diverged_at = first_divergence(h, MAX_CONSECUTIVE_SKIPS)
        if diverged_at is not None:
            points = [p for p in points if p[2] <= diverged_at]
            h.truncate(diverged_at)
        run.log_points(points, int(time.time() * 1000))
        if h.steps:
            bar.update(h.steps[-1] + 1 - bar.n)
            bar.set_postfix(epoch=self.epoch, loss=f"{h.column('train/loss')[-1]:.4g}",
                            grad=f"{h.column('grad/norm')[-1]:.3g}")
        return diverged_at

    def _validate(self, run: RunLogger) -> float:
        val_loss, val_acc, _ = evaluate_split(self.model, self.val_data, autocast=self.autocast)
        train_acc = float(self.correct) / max(self.seen, 1)
        run.log_metrics({"train/accuracy": train_acc, "val/accuracy": val_acc, "val/loss": val_loss},
                        step=self.step_count, timestamp_ms=int(time.time() * 1000))
        self.last_val = (val_loss, val_acc)
        return val_loss

    def _end_epoch(self, run: RunLogger) -> None:
        self.schedule.epoch_end(self._validate(run))
        self.epoch += 1
        self.batch_in_epoch, self.perm, self.seen = 0, None, 0
        self.correct.zero_()

    def _finish(self, run: RunLogger, diverged_at: Optional[int]) -> TrainResult:
        cfg, h = self.cfg, self.recorder.history
        steps = len(h.steps)
        if diverged_at is None and self.batch_in_epoch:  # a partial epoch (max_steps): still report val
            self._validate(run)
        val_loss, val_acc = getattr(self, "last_val", (float("nan"), float("nan")))
        if diverged_at is not None:
            val_loss, val_acc, _ = evaluate_split(self.model, self.val_data, autocast=self.autocast)
        coef, skipped = h.column("grad/clip_coef"), h.column("grad/skipped")
        explosion = detect_explosion(h, self.recorder.layers, cfg.telemetry.explosion_factor, cfg.telemetry.explosion_window)
        per_step = self.train_seconds / max(steps, 1)
        summary = {"clip_rate": float((coef < 1.0).mean()) if steps else 0.0, "skip_count": float((skipped > 0.5).sum()),
                   "steps": float(steps), "time/step_ms": 1000 * per_step,
                   "grad/norm_max": float(np.nanmax(np.where(np.isfinite(h.column("grad/norm")), h.column("grad/norm"), np.nan))) if steps else 0.0,
                   "final/val_accuracy": val_acc, "final/val_loss": val_loss}
        tags = {"diverged": str(diverged_at is not None).lower(), "exploding": str(explosion.step is not None).lower()}
        if diverged_at is not None:
            summary["diverged_at_step"] = float(diverged_at)
        if explosion.step is not None:
            summary["explosion/step"] = float(explosion.step)
            tags["explosion/step"] = explosion.step
            tags["explosion/first_layer"] = explosion.first_layer or "n/a"
        last = h.steps[-1] if h.steps else 0
        run.log_metrics(summary, step=last, timestamp_ms=int(time.time() * 1000))
        run.set_tags(tags)
        ckpt = Path(cfg.trainer.checkpoint) if cfg.trainer.checkpoint else self.output_dir / "model.pt"
        self.save(ckpt, run.run_id, diverged_at)
        run.log_artifact(self.output_dir / "config.yaml")
        run.log_artifact(ckpt, "checkpoint")
        if cfg.telemetry.plots and steps:
            title = f"{run.run_id[:8]} {cfg.model.name} {stabilizer_label(cfg)} seed {cfg.seed}"
            heat = plots.layer_heatmap(h.steps, self.recorder.layers, h.layer_grid(len(self.recorder.layers)),
                                       self.output_dir / "grad_layer_heatmap.png", explosion.step, title)
            norm = plots.norm_history(h.steps, h.column("grad/norm"), h.column("grad/norm_after"), coef, skipped,
                                      h.column("grad/threshold"), self.output_dir / "grad_norm.png",
                                      cfg.stabilizer.clip.max_norm if cfg.stabilizer.clip is not None else None,
                                      explosion.step, diverged_at, title)
            run.log_artifact(heat, "plots")
            run.log_artifact(norm, "plots")
        run.close("FINISHED")
        return TrainResult(run.run_id, run.client.tracking_uri, ckpt, steps, diverged_at is not None, diverged_at,
                           explosion.step, explosion.first_layer, val_acc, per_step)

    # ------------------------------------------------------------ checkpoints
    def save(self, path: Path, run_id: str, diverged_at: Optional[int] = None) -> None:
        h = self.recorder.history
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "stabilizers": self.stack.state_dict(), "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step_count, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "perm": self.perm, "data_gen": self.data_gen.get_state(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "correct": self.correct.cpu(), "seen": self.seen, "train_seconds": self.train_seconds,
            "history": h.__dict__, "config": OmegaConf.to_container(self.cfg, resolve=True),
            "run_id": run_id, "tracking_uri": tracking_uri(self.cfg.tracking.uri), "data_checksum": self.data_checksum,
            "diverged_at_step": diverged_at,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load(self, path: str) -> None:
        if not Path(path).exists():
            raise ConfigError("trainer.resume", f"no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stack.load_state_dict(state["stabilizers"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step_count, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.perm = state["perm"]
        self.data_gen.set_state(state["data_gen"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.correct.copy_(state["correct"])
        self.seen, self.train_seconds = state["seen"], state["train_seconds"]
        self.recorder.history.__dict__.update(state["history"])
        self.stack._stepped = self.step_count > 0
        self.run_id = state["run_id"]


def train(cfg, output_dir: Path) -> TrainResult:
    return Trainer(cfg, output_dir).fit()
