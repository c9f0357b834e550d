"""gradlab inside your own training loop: ``GradientMonitor`` around your model and optimizer.

    monitor = gradlab.GradientMonitor(model, optimizer, stabilizers=["warmup", "clip"],
                                      tracking={"experiment": "my-project"})
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()            # with AMP: scaler.scale(loss).backward(); scaler.unscale_(optimizer)
        monitor.step(loss)         # where clip_grad_norm_ would go: stabilizers + one telemetry row
        optimizer.step()           # (or scaler.step(optimizer); scaler.update())
        if monitor.diverged is not None:
            break
    result = monitor.finish()      # summary metrics, outcome tags, explosion record, plots

``step`` runs the same ``UpdatePipeline`` as gradlab's own step engine (``gradlab.engine``):
the selected stabilizers on the gradients, a snapshot that lets ``spike_skip`` undo the
coming update, and the telemetry row, all on the device. The optimizer step itself is the
user's: a post-step hook on the optimizer undoes a skipped update and records the row; a step
that never ran (GradScaler found inf/NaN) is recorded as skipped. Rows reach the host and
MLflow once every ``telemetry.log_every`` steps, exactly as in ``src/train.py``; at the end the
run gets the same summary, tags and plots (``gradlab.record``).

Settings use the config's schemas: ``stabilizers`` names options of the ``stabilizer`` group
(a list, or a dict of their knobs), ``telemetry`` and ``tracking`` the keys of those groups;
a bad name or value raises one ``ConfigError`` naming the key. ``tracking=False`` keeps the
record in memory (``monitor.history``) and the plots in ``out_dir``, without MLflow.
"""
from __future__ import annotations

import math

import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import record
from .config import StabilizerConfig, TrackingConfig, check
from .engine import UpdatePipeline
from .record import MAX_CONSECUTIVE_SKIPS, now_ms
from .registry import STABILIZERS, ConfigError, Schema, need
from .stabilizers import StabilizerStack, stabilizer_label
from .telemetry import DivergenceWatch, Explosion, History, Recorder, TelemetryConfig
from .tracking import RunLogger, flatten, tracking_uri

log = logging.getLogger(__name__)


@dataclass
class MonitorConfig(Schema):
    stabilizer: StabilizerConfig = field(default_factory=StabilizerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def stabilizer_selection(stabilizers) -> Dict[str, dict]:
    """``["warmup", "clip"]``, ``"clip"`` or ``{"clip": {"max_norm": 0.5}}`` -> {name: knobs}."""
    if stabilizers is None:
        return {}
    if isinstance(stabilizers, str):
        stabilizers = [stabilizers]
    chosen = dict(stabilizers) if isinstance(stabilizers, Mapping) else {name: {} for name in stabilizers}
    for name, knobs in chosen.items():
        need(name in STABILIZERS, "stabilizers", f"'{name}' is not one of {', '.join(STABILIZERS.names())}")
        need(knobs is None or isinstance(knobs, Mapping), f"stabilizer.{name}",
             f"takes a dict of its knobs, e.g. {{'max_norm': 0.5}}, got {knobs!r}")
    return {name: dict(knobs or {}) for name, knobs in chosen.items() if name != "none"}


def monitor_config(stabilizers=None, telemetry: Optional[dict] = None, tracking=None):
    """The checked settings of a monitor, by the config's own schemas and rules."""
    given = {"stabilizer": stabilizer_selection(stabilizers), "telemetry": dict(telemetry or {}),
             "tracking": dict(tracking) if isinstance(tracking, Mapping) else {}}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(MonitorConfig), given)
    except OmegaConfBaseException as exc:
        raise ConfigError(exc.full_key or "monitor", str(exc).splitlines()[0].strip()) from None
    check(cfg)
    return cfg


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper (accelerate's AcceleratedOptimizer, Lightning's)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_params(optimizer: torch.optim.Optimizer) -> Dict[str, str]:
    group = optimizer.param_groups[0]
    scalars = {k: v for k, v in group.items() if isinstance(v, (bool, int, float, str, tuple)) and k != "params"}
    return {"optimizer.name": type(optimizer).__name__, **{f"optimizer.{k}": str(v) for k, v in scalars.items()}}


class StepLRScale:
    """gradlab's LR factors where the LR schedule is the user's: the ``warmup`` stabilizer's
    min(1, (t+1)/steps) and any stabilizer's own (``lr_factors``, e.g. SPAM's warm-up after a moment
    reset), multiplied, the way gradlab's own schedule chains them. The LR is scaled by an optimizer
    pre-step hook and put back by the post-step hook, so the user's scheduler never sees the scaled
    value, whatever kind it is (chainable, or one that sets the LR outright: LambdaLR, which Hugging
    Face's schedules use, OneCycleLR), and a step that GradScaler skips (no optimizer.step(), no
    hooks) leaves the LR alone."""

    def __init__(self, optimizer: torch.optim.Optimizer, factors: Optional[list] = None):
        self.optimizer, self.factors = optimizer, list(factors or [])
        self.saved: Optional[list] = None  # the user's LRs while a step runs at the scaled ones

    def factor(self, t: int) -> float:
        return math.prod(f(t) for f in self.factors)

    def apply(self, t: int) -> None:
        self.saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * self.factor(t)

    def restore(self) -> None:
        for g, lr in zip(self.optimizer.param_groups, self.saved):
            g["lr"] = lr
        self.saved = None


@dataclass
class MonitorResult:
    run_id: Optional[str]
    steps: int
    diverged_at_step: Optional[int]
    explosion_step: Optional[int]
    explosion_first_layer: Optional[str]
    metrics: Dict[str, float]
    plots: List[Path]


class GradientMonitor:
    """gradlab's stabilizers, device-side telemetry and run record around a user's model and
    optimizer (see the module docstring for the loop). ``run``: an MLflow run to log into
    instead of starting one (a framework logger's run; it is not ended here)."""

    def __init__(self, model: torch.nn.Module, optimizer, stabilizers=None, *, telemetry: Optional[dict] = None,
                 tracking=None, out_dir: Optional[str | Path] = None, run: Optional[RunLogger] = None,
                 integration: str = "pytorch"):
        self.cfg = monitor_config(stabilizers, telemetry, tracking)
        self.model, self.optimizer = model, torch_optimizer(optimizer)
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="gradlab-monitor-"))
        self.divergence = DivergenceWatch(MAX_CONSECUTIVE_SKIPS)
        self.pipeline: Optional[UpdatePipeline] = None  # built at the first step: the parameters that have gradients
        warmup = self.cfg.stabilizer.warmup
        self.lr_scale = StepLRScale(self.optimizer, [lambda t, n=warmup.steps: min(1.0, (t + 1) / n)]
                                    if warmup is not None else [])
        self.steps_taken = 0
        self.started: Optional[float] = None
        self.seconds = 0.0
        self.result: Optional[MonitorResult] = None
        self.owns_run = run is None and tracking is not False
        self.run = self.start_run(integration) if self.owns_run else run
        if run is not None:
            run.set_tags(self.tags(integration))
            run.log_params(self.params())
        self._hooks = [self.optimizer.register_step_pre_hook(self._before_optimizer_step),
                       self.optimizer.register_step_post_hook(self._after_optimizer_step)]

    # ------------------------------------------------------------ the run
    def tags(self, integration: str) -> Dict[str, str]:
        return {"model": type(self.model).__name__, "optimizer": type(self.optimizer).__name__,
                "stabilizer": stabilizer_label(self.cfg.stabilizer), "integration": integration,
                **{str(k): str(v) for k, v in self.cfg.tracking.tags.items()}}

    def params(self) -> Dict[str, str]:
        return {**flatten(OmegaConf.masked_copy(self.cfg, ["stabilizer", "telemetry"])),
                **optimizer_params(self.optimizer)}

    def start_run(self, integration: str) -> RunLogger:
        t = self.cfg.tracking
        name = t.run_name or f"{type(self.model).__name__}-{stabilizer_label(self.cfg.stabilizer)}"
        run = RunLogger.start(tracking_uri(t.uri), t.experiment, name, self.tags(integration), t.parent_run_id)
        run.log_params(self.params())
        return run

    @property
    def run_id(self) -> Optional[str]:
        return self.run.run_id if self.run is not None else None

    # ------------------------------------------------------------ the step
    def step(self, loss: torch.Tensor, step: Optional[int] = None) -> None:
        """Call after backward() (and GradScaler's unscale_), before optimizer.step(): runs the
        stabilizers on the gradients and starts this step's telemetry row. Device work only.
        ``step``: the step number to log at (a framework's own counter), default 0, 1, 2, ..."""
        if self.result is not None:
            raise RuntimeError("this GradientMonitor has finished; create a new one for another run")
        if self.pipeline is not None and self.pipeline.pending is not None:
            self._end(self._not_applied)  # the last optimizer step never ran (GradScaler skipped it)
        if self.pipeline is None:
            self.pipeline = self._build_pipeline()
            self.started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.lr_scale.saved is None:  # (Lightning: the pre-step hook ran already)
            lr = lr * self.lr_scale.factor(self.steps_taken)
        with torch.no_grad():
            self.pipeline.begin(loss.detach(), self.steps_taken if step is None else step,
                                lr.detach().clone() if torch.is_tensor(lr) else lr)

    def _build_pipeline(self) -> UpdatePipeline:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]
        if not named:
            raise RuntimeError("GradientMonitor.step(loss): no parameter has a gradient; call it after loss.backward()")
        device = named[0][1].device
        stack = StabilizerStack(self.cfg.stabilizer, self.model, device, named=named)
        stack.bind(self.optimizer)  # stabilizers that read the optimizer's state (spam)
        self.lr_scale.factors += stack.lr_factors()
        if stack.skips and device.type == "cuda" and not all(g.get("capturable", True) for g in self.optimizer.param_groups):
            log.warning("spike_skip restores the optimizer state on the device; create the optimizer with "
                        "capturable=True, or its CPU step counter costs a host sync per step")
        t = self.cfg.telemetry
        recorder = Recorder(stack.names, device, t.log_every, t.layer_every)
        self._not_applied = torch.ones((), dtype=torch.bool, device=device)
        return UpdatePipeline(stack, recorder, self.optimizer)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.lr_scale.factors:
            self.lr_scale.apply(self.steps_taken)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.lr_scale.saved is not None:
            self.lr_scale.restore()
        if self.pipeline is not None and self.pipeline.pending is not None:
            # a fused optimizer under GradScaler is always called; its kernel skips the update where
            # the scaler found an inf (``found_inf``, set on the optimizer for the call)
            found_inf = getattr(optimizer, "found_inf", None)
            self._end(found_inf > 0 if found_inf is not None else None)

    def _end(self, not_applied: Optional[torch.Tensor]) -> None:
        with torch.no_grad():
            self.pipeline.end(not_applied)
        self.steps_taken += 1
        self.seconds = time.perf_counter() - self.started
        if self.pipeline.recorder.full:
            self.flush()

    # ------------------------------------------------------------ reading it
    def flush(self) -> None:
        """Copy the pending rows to the host (one transfer), check them for divergence, send the
        points to MLflow. Runs by itself every ``telemetry.log_every`` steps."""
        if self.pipeline is None:
            return
        points = record.new_points(self.pipeline.recorder, self.divergence)
        if self.run is not None:
            self.run.log_points(points, now_ms())

    @property
    def diverged(self) -> Optional[int]:
        """The step at which the run diverged, as of the last flush (None while it has not)."""
        return self.divergence.step

    @property
    def history(self) -> History:
        return self.pipeline.recorder.history if self.pipeline is not None else History()

    # ------------------------------------------------------------ the end of the run
    def finish(self, status: str = "FINISHED", metrics: Optional[Dict[str, float]] = None) -> MonitorResult:
        """The end-of-run record: summary metrics (plus ``metrics``), outcome tags, the explosion
        record and the plots; the run is ended if this monitor started it."""
        if self.result is not None:
            return self.result
        for hook in self._hooks:
            hook.remove()
        if self.pipeline is not None and self.pipeline.pending is not None:
            self._end(self._not_applied)
        self.flush()
        recorder, h, at = (self.pipeline.recorder if self.pipeline else None), self.history, self.divergence.step
        explosion = record.explosion_of(recorder, self.cfg.telemetry) if h.steps else Explosion(None, None, None)
        summary, tags = record.summary(h, at, self.seconds, explosion)
        summary.update(metrics or {})
        paths = []
        if self.cfg.telemetry.plots and h.steps:
            title = f"{type(self.model).__name__} {stabilizer_label(self.cfg.stabilizer)}"
            clip = self.cfg.stabilizer.clip
            paths = record.plot(recorder, self.out_dir, title, explosion, at, clip.max_norm if clip is not None else None)
        if self.run is not None:
            record.log_end(self.run, h, summary, tags, paths)
            if self.owns_run:
                self.run.close(status)
            else:
                self.run.flush()
        self.result = MonitorResult(self.run_id, len(h.steps), at, explosion.step, explosion.first_layer, summary, paths)
        return self.result

    def __enter__(self) -> "GradientMonitor":
        return self

    def __exit__(self, exc_type, exc: Any, tb: Any) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")


class MonitorCallback:
    """What the Lightning and Hugging Face callbacks share: settings checked when the callback is
    made (not mid-training), a GradientMonitor built when training starts."""

    integration = "pytorch"

    def __init__(self, stabilizers=None, *, telemetry: Optional[dict] = None, tracking=None,
                 out_dir: Optional[str | Path] = None):
        monitor_config(stabilizers, telemetry, tracking)
        self.settings = {"stabilizers": stabilizers, "telemetry": telemetry, "tracking": tracking, "out_dir": out_dir}
        self.monitor: Optional[GradientMonitor] = None
        self.result: Optional[MonitorResult] = None

    def start_monitor(self, model, optimizer, run: Optional[RunLogger]) -> GradientMonitor:
        s = self.settings
        self.monitor = GradientMonitor(model, optimizer, s["stabilizers"], telemetry=s["telemetry"],
                                       tracking=s["tracking"], out_dir=s["out_dir"], run=run,
                                       integration=self.integration)
        return self.monitor
