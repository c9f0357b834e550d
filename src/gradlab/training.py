"""The run loop: device-resident data, the step engine, MLflow, and the end-of-run record.

Read ``Trainer.fit`` top to bottom: batches -> ``StepEngine.step`` -> flush the telemetry
every ``telemetry.log_every`` steps -> validate once per epoch -> stop at a divergence;
then ``finish`` writes the summary, tags, plots and checkpoint.

Divergence is a result, not an error: a non-finite loss or gradient that was applied
stops training, tags the run ``diverged=true`` with metric ``diverged_at_step``, keeps
everything logged up to that step, and returns normally.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from . import checkpoint, plots
from .config import check, resolve_device
from .errors import ConfigError
from .data import DeviceData, EpochOrder, load_splits
from .engine import StepEngine
from .evaluation import evaluate_split
from .faults import fault_label
from .models import build_model
from .stabilizers import stabilizer_label
from .resume import BUDGET_KEYS, HOW_KEYS, resume_config, resume_key
from .telemetry import DivergenceWatch, Explosion, detect_explosion
from .tracking import ENV_TAGS, RunLogger, ensure_store, flatten, run_name, run_tags, tracking_uri

MAX_CONSECUTIVE_SKIPS = 100  # a run that skips this many steps in a row has diverged too


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


logger = logging.getLogger("gradlab")
PROGRESS_EVERY_S = 30.0  # without a terminal (dvc repro, CI, a log file): a progress line at most this often
LEARNED = 0.5  # the outcome tag's bar: a finite run below this validation accuracy did not learn
SYSTEM_METRICS_EVERY_S = 10.0  # tracking.system_metrics: MLflow's sampling interval


def log(msg: str) -> None:
    logger.info(msg)


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


class StopSignal:
    """SIGTERM / SIGINT while training set a flag that the loop reads between steps (a handler
    raising mid-step could leave a half-applied update); the loop then saves and exits. The
    first signal restores the previous handler, so a second one acts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One run: the data on the device, the step engine, and the loop that drives it."""

    def __init__(self, cfg, output_dir: Path):
        check(cfg)
        self.cfg, self.output_dir = cfg, Path(output_dir)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self.device = resolve_device(cfg.trainer.device)
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        splits = load_splits(cfg.data, log=log)
        self.data_checksum = splits["checksum"]
        self.data_sizes = {k: len(splits[f"{k}_y"]) for k in ("train", "val", "test")}
        self.train_data = DeviceData(splits["train_x"], splits["train_y"], self.device)
        self.val_data = DeviceData(splits["val_x"], splits["val_y"], self.device)
        self.order = EpochOrder(cfg.seed, len(self.train_data), cfg.trainer.batch_size)
        per_epoch = self.order.batches_per_epoch
        self.total_steps = min(cfg.trainer.epochs * per_epoch, cfg.trainer.max_steps or math.inf)
        model = build_model(cfg.model, cfg.data).to(self.device)
        self.engine = StepEngine(cfg, model, self.device, self.total_steps, per_epoch)
        self.divergence = DivergenceWatch(MAX_CONSECUTIVE_SKIPS)
        self.checkpoint_path = Path(cfg.trainer.checkpoint or self.output_dir / "model.pt").resolve()
        self.last_checkpoint = 0  # step of the latest crash-safety checkpoint
        self.train_seconds = 0.0
        self.run_id: Optional[str] = None
        self.resumed: Optional[dict] = None  # what the checkpoint we resume from says about its run
        self.last_val = (math.nan, math.nan)  # (loss, accuracy) of the latest validation
        self.bar = None
        self.interactive = cfg.trainer.progress and sys.stderr.isatty()
        self.progress_at = time.perf_counter()  # when the last progress line was written (no terminal)
        self.system_metrics = None
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
        t0 = time.perf_counter()
        with StopSignal() as stop:
            try:
                while not self.done:
                    for x, y in self.order.batches(self.train_data):
                        self.engine.step(x, y)
                        if self.engine.recorder.full:
                            self.flush(run)
                        if self.done or stop.signum:
                            break
                    if stop.signum:
                        self.stop(run, stop.signum, t0)
                    self.flush(run)
                    if self.order.epoch_done and self.divergence.step is None:
                        self.end_epoch(run)
                self.train_seconds += time.perf_counter() - t0
                return self.finish(run)
            except BaseException:
                run.close_after_error("FAILED")
                raise
            finally:
                self.bar.close()

    def stop(self, run: RunLogger, signum: int, t0: float) -> None:
        """Stopped by a signal: everything recorded goes to MLflow, a checkpoint to resume from, the
        run is KILLED (MLflow's status for it), and the process exits with 128 + the signal."""
        self.train_seconds += time.perf_counter() - t0
        self.flush(run, checkpoint=False)
        name = signal.Signals(signum).name
        if self.divergence.step is None:
            self.checkpoint(run)
            log(f"gradlab: stopped by {name} at step {self.engine.step_count}: checkpoint {self.checkpoint_path}; "
                f"continue with trainer.resume={self.checkpoint_path} (or trainer.resume=auto)")
        run.set_tags({"gradlab.stopped": f"{name} at step {self.engine.step_count}"})
        run.close("KILLED")
        raise SystemExit(128 + signum)

    def start_run(self) -> RunLogger:
        """The MLflow run: a new one, or (resuming an interrupted run) the same run, which is sent
        only the points it lacks; a finished run is never rewritten: its continuation is a new run."""
        cfg, resumed = self.cfg, self.resumed
        uri = tracking_uri(cfg.tracking.uri)
        same = resumed is not None and run_is_open(uri, resumed["run_id"])
        run = RunLogger.start(uri, cfg.tracking.experiment, run_name(cfg), self.tags(), cfg.tracking.parent_run_id,
                              resumed["run_id"] if same else None, unique_name=not cfg.tracking.run_name)
        self.run_id = run.run_id
        if same:
            run.skip_logged()
            run.set_tags({k: v for k, v in self.tags().items() if k.startswith("gradlab.") or k in ENV_TAGS})
            if cfg.tracking.run_name:
                run.set_tags({"mlflow.runName": cfg.tracking.run_name})
        else:
            # the selection as one param too: MLflow's compare and parallel-coordinates views use params
            run.log_params({**flatten(cfg), "stabilizer": stabilizer_label(cfg.stabilizer),
                            "fault": fault_label(cfg.fault)})
            run.log_dataset(self.dataset_name(), self.data_checksum, self.data_source(), self.data_sizes)
        if cfg.tracking.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system_metrics = SystemMetricsMonitor(run.run_id, sampling_interval=SYSTEM_METRICS_EVERY_S,
                                                       tracking_uri=uri, resume_logging=same)
            self.system_metrics.start()
        if resumed is not None:
            run.log_points(self.history.points() + self.history.epoch_points, now_ms())
            run.set_tags(self.resume_tags(same))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.bar = tqdm(total=self.total_steps, initial=self.engine.step_count, disable=not self.interactive,
                        dynamic_ncols=True)
        log(f"run {run.run_id} ({run_name(cfg)}): {self.total_steps} steps on {self.device}, "
            f"{'continuing from step ' + str(self.engine.step_count) if resumed else 'from scratch'}")
        return run

    def dataset_name(self) -> str:
        data = self.cfg.data
        return data.name if data.name == "synthetic" else f"{data.name}-val{data.val_size}-seed{data.split_seed}"

    def data_source(self) -> str:
        from .data import prepared_path

        data = self.cfg.data
        if data.name == "synthetic":
            return "generated (gradlab.data.synthetic_splits)"
        return str(prepared_path(data.root, data.name, data.val_size, data.split_seed).resolve())

    def tags(self) -> dict:
        return {**run_tags(self.cfg, device=self.device, data_checksum=self.data_checksum),
                "gradlab.checkpoint": str(self.checkpoint_path), "gradlab.resume_key": resume_key(self.cfg)}

    def resume_tags(self, same_run: bool) -> dict:
        before, now = flatten(self.resumed["config"]), flatten(self.cfg)
        changed = [f"{k}: {before.get(k)} -> {now[k]}" for k in sorted(now)
                   if k in BUDGET_KEYS + HOW_KEYS and before.get(k) != now[k]]
        tags = {"resume/count": self.resumed["count"], "resume/from_step": self.resumed["step"],
                "resume/changed": "; ".join(changed) or "nothing"}
        if not same_run:
            tags["resumed_from"] = self.resumed["run_id"]
        return tags

    def flush(self, run: RunLogger, checkpoint: bool = True) -> None:
        """One device->host copy of the pending rows; the new rows are checked for divergence, and
        their points go to MLflow up to and including a divergence step, nothing after it. Every
        ``trainer.checkpoint_every`` steps, a crash-safety checkpoint follows."""
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
            self.progress(h)
        every = self.cfg.trainer.checkpoint_every
        if checkpoint and every and self.divergence.step is None and \
                self.engine.step_count - self.last_checkpoint >= every and not self.done:
            self.checkpoint(run)

    def progress(self, h) -> None:
        """The tqdm bar on a terminal; elsewhere a line every PROGRESS_EVERY_S (never silent for long)."""
        loss, grad = h.column("train/loss")[-1], h.column("grad/norm")[-1]
        if self.interactive:
            self.bar.update(h.steps[-1] + 1 - self.bar.n)
            self.bar.set_postfix(epoch=self.order.epoch, loss=f"{loss:.4g}", grad=f"{grad:.3g}")
        elif self.cfg.trainer.progress and time.perf_counter() - self.progress_at >= PROGRESS_EVERY_S:
            self.progress_at = time.perf_counter()
            log(f"step {h.steps[-1] + 1}/{self.total_steps} epoch {self.order.epoch + 1}: train/loss {loss:.4g}, "
                f"grad/norm {grad:.3g}")

    def checkpoint(self, run: RunLogger) -> None:
        """MLflow first holds every point the checkpoint's history holds, then the file is replaced atomically."""
        run.flush()
        self.save(self.checkpoint_path)
        self.last_checkpoint = self.engine.step_count
        run.heartbeat()

    def validate(self, run: RunLogger) -> list:
        """Validation points (and this epoch's training accuracy), logged at the current step."""
        val_loss, val_acc, _ = evaluate_split(self.engine.model, self.val_data, autocast=self.engine.autocast)
        step = self.engine.step_count
        points = [("train/accuracy", self.engine.reset_epoch_accuracy(), step), ("val/accuracy", val_acc, step),
                  ("val/loss", val_loss, step)]
        run.log_points(points, now_ms())
        self.last_val = (val_loss, val_acc)
        return points

    def end_epoch(self, run: RunLogger) -> None:
        points = self.validate(run)
        self.history.epoch_points += points  # a resumed run replays them; a final partial validation is not one
        self.engine.schedule.epoch_end(points[2][1])
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
        ckpt = self.save(self.checkpoint_path)
        run.log_artifact(self.output_dir / "config.yaml")
        if cfg.trainer.log_checkpoint:
            run.log_artifact(ckpt, "checkpoint")
        if cfg.trainer.log_model:
            self.log_model(run)
        if cfg.telemetry.plots and h.steps:
            for path in self.plot(run.run_id, explosion):
                run.log_artifact(path, "plots")
        if self.system_metrics is not None:
            self.system_metrics.finish()
        run.close("FINISHED")
        log(f"run {run.run_id}: {tags['outcome']}, {len(h.steps)} steps, val accuracy {self.last_val[1]:.4f}")
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
                   "final/val_accuracy": self.last_val[1], "final/val_loss": self.last_val[0]}
        tags = {"diverged": str(at is not None).lower(), "exploding": str(explosion.step is not None).lower(),
                "outcome": self.outcome()}
        if at is not None:
            metrics["diverged_at_step"] = float(at)
        if explosion.step is not None:
            metrics["explosion/step"] = float(explosion.step)
            tags["explosion/step"] = explosion.step
            tags["explosion/first_layer"] = explosion.first_layer or "n/a"
        return metrics, tags

    def outcome(self) -> str:
        """One word for the runs table: diverged; stalled (finite, but validation accuracy < LEARNED);
        rescued (a remedy in a failure scenario, and it learned); ok (learned, no remedy to credit)."""
        if self.divergence.step is not None:
            return "diverged"
        if not self.last_val[1] >= LEARNED:
            return "stalled"
        remedy = self.cfg.tracking.tags.get("remedy", stabilizer_label(self.cfg.stabilizer))
        return "rescued" if self.cfg.scenario != "default" and remedy != "none" else "ok"

    def log_model(self, run: RunLogger) -> None:
        """The trained model as an MLflow model with an input/output signature (one batch of images
        -> logits), loadable with mlflow.pytorch.load_model."""
        import mlflow
        from mlflow.models import infer_signature

        x = self.val_data.x[:2]
        with torch.no_grad():
            logits = self.engine.model(x).float()
        signature = infer_signature(x.cpu().numpy(), logits.cpu().numpy())
        mlflow.set_tracking_uri(run.client.tracking_uri)
        with mlflow.start_run(run_id=run.run_id):
            mlflow.pytorch.log_model(self.engine.model, name="model", signature=signature)

    def plot(self, run_id: str, explosion: Explosion) -> list:
        cfg, h = self.cfg, self.history
        layers = self.engine.recorder.layers
        title = f"{run_id[:8]} {cfg.model.name} {stabilizer_label(cfg.stabilizer)} seed {cfg.seed}"
        if self.engine.faults.faults:
            title += f" fault {fault_label(cfg.fault)}"
        clip = cfg.stabilizer.get("clip")
        return [plots.layer_heatmap(h.steps, layers, h.layer_grid(len(layers)),
                                    self.output_dir / "grad_layer_heatmap.png", explosion.step, title),
                plots.norm_history(h.steps, h.column("grad/norm"), h.column("grad/norm_after"),
                                   h.column("grad/clip_coef"), h.column("grad/skipped"), h.column("grad/threshold"),
                                   self.output_dir / "grad_norm.png", clip.max_norm if clip is not None else None,
                                   explosion.step, self.divergence.step, title,
                                   faults=self.engine.faults.spans(h.steps[-1] + 1))]

    # ------------------------------------------------------------ checkpoints
    def save(self, path: Path) -> Path:
        return checkpoint.save(path, {
            "config": OmegaConf.to_container(self.cfg, resolve=True), "engine": self.engine.state_dict(),
            "order": self.order.state_dict(), "history": self.history.state_dict(), "step": len(self.history.steps),
            "train_seconds": self.train_seconds, "run_id": self.run_id, "tracking_uri": tracking_uri(self.cfg.tracking.uri),
            "data_checksum": self.data_checksum, "diverged_at_step": self.divergence.step,
            "resume_count": self.resumed["count"] if self.resumed else 0})

    def load(self, path: str) -> None:
        state = checkpoint.load(path, self.device, "trainer.resume")
        if state["data_checksum"] != self.data_checksum:
            raise ConfigError("trainer.resume", f"{path} was trained on data {state['data_checksum']}, the data "
                                                f"here is {self.data_checksum}")
        try:
            self.engine.load_state_dict(state["engine"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError("trainer.resume", f"{path} does not fit this run's model/optimizer/stabilizers "
                                                f"({str(exc).splitlines()[0][:200]})") from None
        self.order.load_state_dict(state["order"])
        self.history.load_state_dict(state["history"])
        self.train_seconds = state["train_seconds"]
        self.last_checkpoint = self.engine.step_count
        self.resumed = {"run_id": state["run_id"], "step": self.engine.step_count, "config": state["config"],
                        "count": state.get("resume_count", 0) + 1}


def run_is_open(uri: str, run_id: str) -> bool:
    """Whether ``run_id`` exists in the store at ``uri`` and is not FINISHED (a resume continues it)."""
    from mlflow.exceptions import MlflowException

    try:
        return ensure_store(uri).get_run(run_id).info.status != "FINISHED"
    except MlflowException:
        return False


def train(cfg, output_dir: Path, overrides: Optional[Sequence[str]] = None) -> TrainResult:
    """Train one run. With ``trainer.resume``, the config is the checkpoint's (gradlab.resume);
    ``overrides`` (the command line's) tell which of its keys the user set."""
    if cfg.trainer.resume:
        cfg = resume_config(cfg, overrides)
    return Trainer(cfg, output_dir).fit()
