"""The run loop: device-resident data, the step engine, MLflow, and the end-of-run record.

Read ``Trainer.fit`` top to bottom: batches -> ``StepEngine.step`` -> flush the telemetry
every ``telemetry.log_every`` steps -> validate once per epoch -> stop at a divergence;
then ``finish`` writes the summary, tags, plots and checkpoint.

Under torchrun (``trainer.strategy=ddp|fsdp``, ``gradlab.distributed``) every rank runs this
same loop on its slice of each batch; the values it records are global, so every rank takes
the same decisions. Rank 0 alone talks to MLflow and writes the checkpoint and plots.

Divergence is a result, not an error: a non-finite loss or gradient that was applied
stops training, tags the run ``diverged=true`` with metric ``diverged_at_step``, keeps
everything logged up to that step, and returns normally.
"""
from __future__ import annotations

import copy
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

from . import checkpoint, distributed, record
from .config import check
from .errors import ConfigError, StorageError
from .data import DeviceData, EpochOrder, load_splits
from .engine import StepEngine
from .evaluation import evaluate_split, log_test, test_result
from .foresight import Foresight
from .forensics import Snapshots, explosion_onset, find_bad_step, investigate
from .faults import fault_label
from .models import build_model
from .record import MAX_CONSECUTIVE_SKIPS, now_ms
from .stabilizers import stabilizer_label
from .resume import BUDGET_KEYS, HOW_KEYS, resume_config, resume_key
from .telemetry import DivergenceWatch, Explosion
from .tracking import ENV_TAGS, NullRun, RunLogger, ensure_store, flatten, run_name, run_tags, tracking_uri


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
    warning_step: Optional[int] = None
    rank: int = 0  # under torchrun: this process's rank (every rank returns the same record)
    test_accuracy: Optional[float] = None  # Trainer(test=True): the test-set accuracy the run logged


class DivergenceFlag:
    """Stop within a step or two of a divergence without a host sync per step: the engine's sticky
    device flag (gradlab.engine.UpdatePipeline.diverged) is copied to pinned host memory without
    blocking and read at the next step, once its copy is done (a CUDA event). On the CPU there is no
    device to wait for: the flag is read at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.copied = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def raised(self, flag: Optional[torch.Tensor]) -> bool:
        if flag is None:
            return False
        if not self.cuda:
            return bool(flag)
        seen = self.pending and self.copied.query() and bool(self.host)
        if not self.pending or self.copied.query():  # the last copy is done: start the next one
            self.host.copy_(flag, non_blocking=True)
            self.copied.record()
            self.pending = True
        return seen


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


def single_process_only(cfg):
    """Under torchrun: the sharpness gauge, the preflight and the forensics replay are off (they run
    the model outside the data-parallel step), and under FSDP the optimizer's fused kernel (torch has
    no sharded version of it); the logged params say so."""
    off = {"telemetry.sharpness_every": 0, "trainer.preflight": False, "forensics.snapshot_every": 0,
           "forensics.investigate": False}
    if cfg.trainer.strategy == "fsdp" and cfg.optimizer.get("fused"):
        off["optimizer.fused"] = False
    if any(OmegaConf.select(cfg, k) != v for k, v in off.items()):
        cfg = copy.deepcopy(cfg)
        for key, value in off.items():
            OmegaConf.update(cfg, key, value)
        if int(os.environ.get("RANK", "0")) == 0:
            log("gradlab: under torchrun the sharpness gauge, preflight and forensics are off "
                "(telemetry.sharpness_every=0, forensics.snapshot_every=0)"
                + ("; under FSDP the optimizer is not fused (optimizer.fused=false)" if "optimizer.fused" in off else ""))
    return cfg


class Trainer:
    """One run: the data on the device, the step engine, and the loop that drives it."""

    def __init__(self, cfg, output_dir: Path, parallel: Optional[distributed.Parallel] = None, test: bool = False):
        """``test``: the run records its test-set result itself before it is closed (a matrix cell),
        instead of ``src/evaluate.py`` reopening it from the checkpoint."""
        check(cfg)
        self.cfg, self.output_dir = cfg, Path(output_dir)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self.parallel, self.device = distributed.start(cfg.trainer.strategy, cfg.trainer.device)
        if test and self.parallel.active:
            raise ValueError("Trainer(test=True) is for single-process runs (matrix cells): evaluate a torchrun "
                             "run's checkpoint with src/evaluate.py")
        if self.parallel.active:
            cfg = self.cfg = single_process_only(cfg)
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        splits = load_splits(cfg.data, log=log)
        self.data_checksum = splits["checksum"]
        self.data_sizes = {k: len(splits[f"{k}_y"]) for k in ("train", "val", "test")}
        self.train_data = DeviceData(splits["train_x"], splits["train_y"], self.device)
        self.val_data = DeviceData(splits["val_x"], splits["val_y"], self.device)
        self.test_split = (splits["test_x"], splits["test_y"]) if test else None
        self.test_accuracy: Optional[float] = None
        self.order = EpochOrder(cfg.seed, len(self.train_data), cfg.trainer.batch_size)
        self.total_steps = self.order.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
        model = self.parallel.wrap(build_model(cfg.model, cfg.data).to(self.device), self.device)
        self.engine = StepEngine(cfg, model, self.device, self.total_steps, self.order.batches_per_epoch,
                                 self.parallel)
        self.divergence = DivergenceWatch(MAX_CONSECUTIVE_SKIPS)
        self.diverging = DivergenceFlag(self.device)
        self.foresight = Foresight(cfg, self.engine)
        self.snapshots = Snapshots(cfg.forensics.snapshot_every, cfg.forensics.keep)
        self.checkpoint_path = Path(cfg.trainer.checkpoint or self.output_dir / "model.pt").resolve()
        self.last_checkpoint = 0  # step of the latest crash-safety checkpoint
        self.train_seconds = 0.0
        self.run_id: Optional[str] = None
        self.resumed: Optional[dict] = None  # what the checkpoint we resume from says about its run
        self.last_val = (math.nan, math.nan)  # (loss, accuracy) of the latest validation
        self.bar = None
        self.interactive = cfg.trainer.progress and sys.stderr.isatty() and self.parallel.main
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
                if self.cfg.trainer.preflight and self.engine.step_count == 0:
                    self.preflight(run)
                if self.snapshots.due(self.engine.step_count):
                    self.snapshots.take(self.engine, self.order)
                while not self.done:
                    for x, y in self.order.batches(self.train_data):
                        measured = self.foresight.before_step(self.engine.step_count, x, y)
                        self.engine.step(x, y)
                        diverging = self.diverging.raised(self.engine.pipeline.diverged)
                        if self.engine.recorder.full or measured or diverging:
                            self.flush(run)  # a measurement is read at once; a divergence ends the run now
                        if self.done or self.stopping(stop):
                            break
                    if self.stopping(stop):
                        self.stop(run, self.stopping(stop), t0)
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

    def stopping(self, stop: StopSignal) -> Optional[int]:
        """The signal to stop for. One process stops at the next step; under torchrun the ranks
        agree at each telemetry flush (a sync point already), so they all stop after the same step."""
        if not self.parallel.active:
            return stop.signum
        if self.engine.recorder.pending_steps:
            return None
        return self.parallel.agree(stop.signum or 0) or None

    def stop(self, run: RunLogger, signum: int, t0: float) -> None:
        """Stopped by a signal: everything recorded goes to MLflow, a checkpoint to resume from, the
        run is KILLED (MLflow's status for it), and the process exits with 128 + the signal."""
        self.train_seconds += time.perf_counter() - t0
        self.flush(run, checkpoint=False)
        name = signal.Signals(signum).name
        if self.divergence.step is None:
            self.checkpoint(run)
        if self.divergence.step is None and self.parallel.main:
            log(f"gradlab: stopped by {name} at step {self.engine.step_count}: checkpoint {self.checkpoint_path}; "
                f"continue with trainer.resume={self.checkpoint_path} (or trainer.resume=auto)")
        run.set_tags({"gradlab.stopped": f"{name} at step {self.engine.step_count}"})
        run.close("KILLED")
        raise SystemExit(128 + signum)

    def start_run(self) -> RunLogger:
        """The MLflow run, opened by rank 0 (``open_run``); the other ranks get a NullRun with its id."""
        run = None
        try:
            if self.parallel.main:
                run = self.open_run()
        finally:  # every rank learns the run id, also when rank 0 failed to open the run (None)
            self.run_id = self.parallel.share(run.run_id if run is not None else None)
        if self.run_id is None:
            raise StorageError("rank 0 could not open the MLflow run (its error above says why)")
        self.bar = tqdm(total=self.total_steps, initial=self.engine.step_count, disable=not self.interactive,
                        dynamic_ncols=True)
        return run if run is not None else NullRun(self.run_id)

    def open_run(self) -> RunLogger:
        """A new run, or (resuming an interrupted run) the same run, which is sent only the points
        it lacks; a finished run is never rewritten: its continuation is a new run."""
        cfg, resumed = self.cfg, self.resumed
        uri = tracking_uri(cfg.tracking.uri)
        same = resumed is not None and run_is_open(uri, resumed["run_id"])
        run = RunLogger.start(uri, cfg.tracking.experiment, run_name(cfg), self.tags(), cfg.tracking.parent_run_id,
                              resumed["run_id"] if same else None,
                              unique_name=not cfg.tracking.run_name or bool(cfg.tracking.parent_run_id))
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
            run.log_points(self.history.points() + self.history.epoch_points + self.history.sparse, now_ms())
            run.set_tags(self.resume_tags(same))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
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
                "parallel": distributed.describe(self.parallel, self.device), "gradlab.checkpoint": str(self.checkpoint_path), "gradlab.resume_key": resume_key(self.cfg)}

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
        run.log_points(record.new_points(self.engine.recorder, self.divergence), now_ms())
        gauge_points, warning = self.foresight.flush(h, self.divergence.step)
        if warning is not None:
            run.set_tags(warning.tags())
        if gauge_points:
            run.log_points(gauge_points, now_ms())
        if h.steps:
            self.progress(h)
        if self.divergence.step is None and self.snapshots.due(self.engine.step_count):
            self.snapshots.take(self.engine, self.order)
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
        elif self.cfg.trainer.progress and self.parallel.main and time.perf_counter() - self.progress_at >= PROGRESS_EVERY_S:
            self.progress_at = time.perf_counter()
            log(f"step {h.steps[-1] + 1}/{self.total_steps} epoch {self.order.epoch + 1}: train/loss {loss:.4g}, "
                f"grad/norm {grad:.3g}")

    def checkpoint(self, run: RunLogger) -> None:
        """MLflow first holds every point the checkpoint's history holds, then the file is replaced atomically."""
        run.flush()
        self.save(self.checkpoint_path)
        self.last_checkpoint = self.engine.step_count
        run.heartbeat()

    def preflight(self, run: RunLogger) -> None:
        """``trainer.preflight=true``: the preflight report before the first update, into this run."""
        from .preflight import log_report, preflight

        report = preflight(self)
        log(report.table())
        log_report(run, report, self.output_dir)

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
        explosion = record.explosion_of(self.engine.recorder, cfg.telemetry)
        summary, tags = self.summary(explosion)
        ckpt = self.save(self.checkpoint_path)
        run.log_artifact(self.output_dir / "config.yaml")
        main = self.parallel.main
        if cfg.trainer.log_checkpoint:
            run.log_artifact(ckpt, "checkpoint")
        if cfg.trainer.log_model and main:
            self.log_model(run)
        plot_paths = self.plot(run.run_id, explosion) if cfg.telemetry.plots and h.steps and main else []
        record.log_end(run, h, summary, tags, plot_paths)
        if self.test_split is not None:  # single-process only (__init__)
            self.test(run)
        if cfg.forensics.investigate and main:
            self.investigate(run, explosion)
        if self.system_metrics is not None:
            self.system_metrics.finish()
        run.close("FINISHED")
        if main:
            log(f"run {run.run_id}: {tags['outcome']}, {len(h.steps)} steps, val accuracy {self.last_val[1]:.4f}")
        warning = self.foresight.watch.warning
        return TrainResult(run.run_id, tracking_uri(cfg.tracking.uri), ckpt, len(h.steps), at is not None, at,
                           explosion.step, explosion.first_layer, self.last_val[1], summary["time/step_ms"] / 1000,
                           warning.step if warning else None, self.parallel.rank, self.test_accuracy)

    def test(self, run: RunLogger) -> None:
        """The final weights (those of the checkpoint) on the test set, logged as ``evaluate`` would."""
        model = self.parallel.unwrap(self.engine.model)
        test = DeviceData(*self.test_split, self.device)
        metrics, image = test_result(model, test, self.output_dir)
        log_test(run, metrics, image, len(self.history.steps))
        self.test_accuracy = metrics["test/accuracy"]

    def summary(self, explosion: Explosion) -> tuple[dict, dict]:
        metrics, tags = record.summary(self.history, self.divergence.step, self.train_seconds, explosion)
        metrics.update({"final/val_accuracy": self.last_val[1], "final/val_loss": self.last_val[0],
                        "model/parameters": float(sum(p.numel() for p in self.engine.model.parameters()))})
        tags["outcome"] = self.outcome()
        warning = self.foresight.watch.warning
        tags["warned"] = str(warning is not None).lower()
        if self.foresight.gauge.unavailable:
            tags["sharpness/unavailable"] = self.foresight.gauge.unavailable
        if warning is not None:
            metrics["warning/step"] = float(warning.step)
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
        """The trained model as an MLflow model with an input/output signature (images -> logits),
        loadable with mlflow.pytorch.load_model (or mlflow.pyfunc.load_model)."""
        import mlflow
        from mlflow.models import infer_signature

        # a CPU copy: MLflow exports it with the (host) input example, and it loads anywhere
        model = copy.deepcopy(self.parallel.unwrap(self.engine.model)).cpu().eval()
        x = self.val_data.x[:2].cpu()
        with torch.no_grad():
            logits = model(x).float()
        example = x.numpy()
        mlflow.set_tracking_uri(run.client.tracking_uri)
        with mlflow.start_run(run_id=run.run_id):  # MLflow's default format: a torch.export'ed graph, no pickle
            mlflow.pytorch.log_model(model, name="model", input_example=example,
                                     signature=infer_signature(example, logits.cpu().numpy()))

    def plot(self, run_id: str, explosion: Explosion) -> list:
        cfg = self.cfg
        title = f"{run_id[:8]} {cfg.model.name} {stabilizer_label(cfg.stabilizer)} seed {cfg.seed}"
        if self.engine.faults.faults:
            title += f" fault {fault_label(cfg.fault)}"
        clip = cfg.stabilizer.get("clip")
        return record.plot(self.engine.recorder, self.output_dir, title, explosion, self.divergence.step,
                           clip.max_norm if clip is not None else None,
                           self.engine.faults.spans(self.history.steps[-1] + 1))

    def investigate(self, run: RunLogger, explosion: Explosion) -> None:
        """Forensics of the bad step (gradlab.forensics), from the last snapshot before it: tags
        ``nonfinite/*`` and ``forensics/*``, artifacts under ``forensics/``, and the snapshot file that
        ``src/forensics.py`` starts from. A failure here is reported on the run, never loses it."""
        bad = find_bad_step(self.history, self.divergence.step, explosion.step)
        if bad is None:
            return
        t = self.cfg.telemetry
        snap = self.snapshots.start_for(explosion_onset(self.history, bad, t.explosion_factor, t.explosion_window),
                                        bad.step)
        if snap is None:
            run.set_tags({"forensics/skipped": f"no snapshot at or before step {bad.step} (forensics.keep)"})
            return
        out = self.output_dir / "forensics"
        try:
            snapshot_file = self.save(out / "snapshot.pt", snap, bad.to_dict())
            found = investigate(self.cfg, snap, self.history, bad, self.train_data, self.device, out,
                                self.cfg.forensics.top_k, run_name(self.cfg))
        except Exception as exc:  # noqa: BLE001 - the run's record matters more than its forensics
            log(f"gradlab: forensics failed: {type(exc).__name__}: {exc}")
            run.set_tags({"forensics/error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            return
        log(f"gradlab: forensics: {found.summary()}")
        run.set_tags({**found.tags(), "forensics/snapshot": str(snapshot_file.resolve())})
        # the snapshot is a checkpoint: uploaded when checkpoints are (matrix children keep it on disk)
        for path in ([snapshot_file] if self.cfg.trainer.log_checkpoint else []) + list(found.artifacts):
            run.log_artifact(path, "forensics")

    # ------------------------------------------------------------ checkpoints
    def save(self, path: Path, snapshot: Optional[dict] = None, bad: Optional[dict] = None) -> Path:
        """The checkpoint, written by rank 0 (every rank calls this: FSDP gathers the state for it);
        with ``snapshot`` (gradlab.forensics), the same file for that earlier state."""
        engine = snapshot["engine"] if snapshot else self.engine.state_dict()
        if not self.parallel.main:
            return path
        order = snapshot["order"] if snapshot else self.order.state_dict()
        return checkpoint.save(path, {
            "config": OmegaConf.to_container(self.cfg, resolve=True), "engine": engine, "forensics": bad,
            "order": order, "history": self.history.state_dict(), "step": len(self.history.steps),
            "train_seconds": self.train_seconds, "run_id": self.run_id, "tracking_uri": tracking_uri(self.cfg.tracking.uri),
            "data_checksum": self.data_checksum, "diverged_at_step": self.divergence.step,
            "foresight": self.foresight.state_dict(),
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
        if "foresight" in state:
            self.foresight.load_state_dict(state["foresight"])
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


def train(cfg, output_dir: Path, overrides: Optional[Sequence[str]] = None, test: bool = False) -> TrainResult:
    """Train one run. With ``trainer.resume``, the config is the checkpoint's (gradlab.resume);
    ``overrides`` (the command line's) tell which of its keys the user set."""
    if cfg.trainer.resume:  # under torchrun rank 0 decides (an MLflow query for auto), every rank follows
        parallel, _ = distributed.start(cfg.trainer.strategy, cfg.trainer.device)
        cfg = parallel.from_main(lambda: resume_config(cfg, overrides))
    return Trainer(cfg, output_dir, test=test).fit()
