"""In-training foresight: the sharpness gauge and the early warning, driven from the run loop.

The gauge measures, every ``telemetry.sharpness_every`` steps and before that step's update,
the top (preconditioned) Hessian eigenvalue on the step's batch (power iteration warm-started
from the previous eigenvector: ``telemetry.sharpness_iters`` products; the first measurement
starts cold: Lanczos with ``sharpness.COLD_PRODUCTS``) and, for recurrent models, the recurrent Jacobian's
growth over the sequence. It is device work only; its numbers reach the host with the next
telemetry flush (the loop flushes right after a measurement, so a warning is known before the
next update).

The warning (``WarningWatch``) fires once, at the first step where a signal predicts a
divergence (README, "Foresight", has the measurements behind each threshold):

* ``stability``: the stability ratio lambda_max / limit >= ``telemetry.warn_ratio`` at initialization
  (step 0: nothing has had time to self-stabilize; at a ratio of 0.8 SGD already diverged), or at two
  measurements in a row later on (at the edge of stability a healthy SGD run can cross the limit once
  and recover: one of 8 measured did, at 9.65). The limit is taken at the largest learning rate the
  schedule will apply from the measured step to ``HORIZON`` gauge intervals ahead (the schedule,
  warmup and every LR factor are known in advance: ``Schedule.ahead``), so a rise of the LR is seen
  by the two measurements before it, not only by the two after it (``stability forecast``). When
  only the LR to come crosses the limit, the second measurement is taken ``CONFIRM`` x the interval
  later instead of a whole interval: the present LR is stable, so no edge-of-stability dynamics can
  pull the sharpness back under it before the rise; what the second measurement rules out is one
  unrepresentative batch. Under a constant or falling LR the limit is the measured step's own: the
  rule is the one above.
* ``loss``: the training loss (median of the last ``LOSS_WINDOW`` steps) climbed to
  ``telemetry.warn_loss`` x the loss of the first steps: the updates go uphill.
* ``attention``: an attention logit (the model's ``attn/logit_max/<block>`` probes, recorded every
  step) reached ``telemetry.warn_attn_logit``: at a logit gap of 100 the softmax gives the other keys
  e^-100 of the weight, so attention is one-hot and its gradient vanishes (attention entropy collapse,
  Dehghani et al. 2023; Wortsman et al. 2023). A transformer can fail this way with no NaN at all.

The recurrent growth is recorded (``sharpness/recurrent_growth``) and judged by the preflight, but
not warned on during training: healthy tanh RNNs reach 15-20x mid-training (README, "Foresight").
The stability ratio predicts a runaway of the update, so it applies only where the update's size
follows the gradient: plain SGD (with or without momentum) with no stabilizer that bounds every
update (clip, agc, zclip with a hard cap). Under such a bound an unstable direction oscillates at
a bounded amplitude instead of growing, and Adam-type optimizers bound each coordinate's step
(Adam: |step| <= lr (1 - b1) / sqrt(1 - b2), about 3 lr; their preconditioned sharpness sits at or
above its limit in healthy runs, Cohen et al. 2022), so for them the ratio is recorded, not warned
on. The loss signal applies to every run.
The explosion record (``explosion/*``) stays what it was: the marker that it is happening.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from . import sharpness
from .preflight import bounded_by, recurrent_growth
from .telemetry import History, layer_norms

GAUGE_KEYS = ("sharpness/lambda_max", "sharpness/stability_ratio", "sharpness/recurrent_growth")
FORECAST_KEY = "sharpness/forecast_ratio"  # lambda_max against the limit at the horizon's largest LR
LOSS_WINDOW = 5  # steps whose median loss is compared with the first steps'
HORIZON = 2  # gauge intervals the forecast looks ahead: both measurements of "two in a row" see a rise
CONFIRM = 0.1  # share of a gauge interval after which a forecast-only crossing is measured again


@dataclass
class Warning:
    step: int
    reason: str
    layer: str

    def tags(self) -> Dict[str, str]:
        return {"warning/step": str(self.step), "warning/reason": self.reason, "warning/layer": self.layer}


@dataclass
class Forecast:
    """The largest learning rate the schedule applies from a measured step to the horizon, and the
    stability limit there (host numbers: the schedule is host state)."""
    lr: float  # the measured step's
    peak: float  # the largest within the horizon
    at: int  # the first step that applies it
    limit: float  # the optimizer's stability limit at ``peak``

    @property
    def factor(self) -> float:
        return self.peak / self.lr if self.lr > 0 else 1.0


def forecast(cfg_opt, schedule, step: int, horizon: int) -> Forecast:
    """The forecast at ``step`` over the next ``horizon`` steps of ``schedule`` (gradlab.optim.Schedule)."""
    lrs = schedule.ahead(horizon)
    i = max(range(len(lrs)), key=lambda j: (lrs[j], -j))
    return Forecast(lrs[0], lrs[i], step + i, sharpness.stability_limit(cfg_opt, lrs[i]))


class Gauge:
    """Sharpness (and recurrent growth) every ``every`` steps; results wait on the device until ``flush``."""

    def __init__(self, cfg, engine):
        self.cfg, self.engine = cfg, engine
        self.every, self.iters = cfg.telemetry.sharpness_every, cfg.telemetry.sharpness_iters
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.vector: Optional[List[torch.Tensor]] = None  # the last eigenvector: the next warm start
        self.pending: List[tuple] = []  # (step, limit, device row: lambda, ratio, growth, layer shares..., Forecast)
        self.unavailable: Optional[str] = None  # why the gauge turned itself off (the run goes on without it)
        self.confirm_at: Optional[int] = None  # an extra measurement's step (WarningWatch.forecast_only)

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.confirm_at)

    def confirm(self, step: int) -> None:
        """Measure again soon after ``step`` (before the next regular measurement)."""
        self.confirm_at = int(step) + max(1, round(CONFIRM * self.every))

    def measure(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One measurement at the weights before ``step``'s update, on its batch. Device work only.
        A model the transforms cannot differentiate twice turns the gauge off, never the run."""
        try:
            with sharpness.native_kernels():
                self._measure(step, x, y)
        except RuntimeError as exc:
            self.every, self.unavailable = 0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"gradlab: the sharpness gauge is off for this run ({self.unavailable})", file=sys.stderr)

    def _measure(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        e = self.engine
        m = sharpness.measure(e.model, e.optimizer, self.cfg.optimizer, x, y, e.schedule.lr, self.iters, self.vector,
                              self.cfg.loss.label_smoothing, self.generator)
        self.vector = m.vector
        growth = recurrent_growth(e.model, x, generator=self.generator)
        nan = torch.full((), math.nan, device=x.device)
        shares = layer_norms(torch._foreach_norm(m.vector), e.recorder.index, len(e.recorder.layers)) ** 2
        row = torch.cat([torch.stack([m.lambda_max, m.ratio, nan if growth is None else growth]), shares])
        self.pending.append((step, m.limit, row, forecast(self.cfg.optimizer, e.schedule, step, HORIZON * self.every)))

    def flush(self) -> List[tuple]:
        """One device->host copy of the pending measurements: [(step, limit, host row, Forecast)]."""
        if not self.pending:
            return []
        host = torch.stack([r for _, _, r, _ in self.pending]).cpu().numpy().astype(np.float64)
        out = [(s, lim, row, ahead) for (s, lim, _, ahead), row in zip(self.pending, host)]
        self.pending = []
        if not np.isfinite(out[-1][2][0]):
            self.vector = None  # a non-finite eigenvector cannot warm-start the next measurement
        return out

    def state_dict(self) -> dict:
        return {"vector": [v.detach().cpu() for v in self.vector] if self.vector is not None else None,
                "generator": self.generator.get_state(), "confirm_at": self.confirm_at}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.confirm_at = state.get("confirm_at")
        device = self.engine.device
        self.vector = [v.to(device) for v in state["vector"]] if state["vector"] is not None else None


class WarningWatch:
    """The first step at which a signal predicts a divergence (see the module docstring)."""

    def __init__(self, cfg, layers: List[str], bound: Optional[str]):
        t = cfg.telemetry
        self.ratio, self.loss, self.attn = t.warn_ratio, t.warn_loss, t.warn_attn_logit
        self.runaway_possible = bound is None and not sharpness.preconditioned(cfg.optimizer)
        self.layers = layers
        self.warning: Optional[Warning] = None
        self.above = False  # whether the previous measurement was at or above the limit
        self.forecast_only = False  # ... because of the LR to come (the present one is under it)

    def largest(self, values: np.ndarray) -> str:
        """The layer with the largest value (+inf counts; NaN does not); n/a when none is a number."""
        values = np.where(np.isnan(values), -np.inf, values)
        return self.layers[int(np.argmax(values))] if len(values) and (values > -np.inf).any() else "n/a"

    def from_gauge(self, step: int, limit: float, row: np.ndarray, ahead: Optional[Forecast] = None) -> Optional[Warning]:
        """At initialization one measurement at or above the limit; later, two in a row (at the edge of
        stability a run crosses it and recovers: README, "Foresight"). With ``ahead``, the limit is the
        one at the largest LR the schedule applies within the horizon. Measurements come in order."""
        lam, ratio, shares = row[0], row[1], row[3:]
        rises = ahead is not None and ahead.factor > 1
        r = lam / ahead.limit if rises else ratio
        above, sustained = not r < self.ratio, self.above  # NaN: the measurement itself blew up
        self.above = above
        self.forecast_only = bool(above and rises and ratio < self.ratio and self.runaway_possible)  # a numpy bool
        # would make the checkpoint unreadable to the weights-only loader
        if not (self.runaway_possible and above and (step == 0 or sustained)):
            return None
        when = "at initialization" if step == 0 else "at two measurements in a row"
        if rises and ratio < self.ratio:  # the LR to come crosses the limit, the present one does not
            return Warning(step, f"stability forecast: LR x{ahead.factor:.3g} at step {ahead.at} (lr {ahead.peak:.3g}) "
                                 f"crosses the limit: ratio {r:.3g} >= {self.ratio:g} {when} (lambda_max {lam:.4g}, "
                                 f"limit {ahead.limit:.4g} there, {limit:.4g} now)", self.largest(shares))
        return Warning(step, f"stability ratio {r:.3g} >= {self.ratio:g} {when} (lambda_max {lam:.4g}, limit "
                             f"{ahead.limit if rises else limit:.4g}"
                             + (f" at the LR of step {ahead.at}" if rises else "")
                             + "): updates grow along the top curvature direction", self.largest(shares))

    def from_loss(self, history: History) -> Optional[Warning]:
        loss = history.column("train/loss")
        if len(loss) < 2 * LOSS_WINDOW:
            return None
        start = np.median(loss[:LOSS_WINDOW])
        recent = np.lib.stride_tricks.sliding_window_view(loss, LOSS_WINDOW)
        med = np.median(recent, axis=1)
        hits = np.flatnonzero(~(med < self.loss * start))[:1]  # NaN counts: the loss itself blew up
        if not hits.size:
            return None
        i = int(hits[0]) + LOSS_WINDOW - 1
        grid = history.layer_grid(len(self.layers))
        with np.errstate(invalid="ignore", over="ignore"):
            layer = self.largest(grid[i] / np.maximum(grid[0], 1e-30)) if len(grid) else "n/a"
        return Warning(history.steps[i], f"training loss {med[hits[0]]:.3g} >= {self.loss:g} x its start "
                                         f"{start:.3g}: the updates go uphill", layer)

    def from_attention(self, history: History) -> Optional[Warning]:
        cols = [i for i, p in enumerate(history.probes) if p.startswith("attn/logit_max/")]
        if not cols or not history.steps:
            return None
        logits = np.nan_to_num(history.probe_grid()[:, cols], nan=np.inf, posinf=np.inf)  # NaN: blown up too
        hits = np.flatnonzero(logits.max(axis=1) >= self.attn)[:1]
        if not hits.size:
            return None
        row = logits[int(hits[0])]
        block = history.probes[cols[int(np.argmax(row))]].rsplit("/", 1)[-1]
        layer = next((name for name in self.layers if name.startswith(f"blocks.{block}.attn")), f"attention block {block}")
        return Warning(history.steps[int(hits[0])], f"attention logit {row.max():.3g} >= {self.attn:g} in block {block}: the "
                                         "softmax saturates (attention entropy collapse)", layer)

    def update(self, history: History, measurements: List[tuple], last_step: Optional[int] = None) -> Optional[Warning]:
        """Look at the new measurements and the history (up to ``last_step`` when the run diverged);
        returns the warning when it fires now, else None."""
        if self.warning is not None:
            return None
        found = [w for w in (self.from_gauge(*m) for m in measurements if last_step is None or m[0] <= last_step) if w]
        candidates = found + [w for w in (self.from_loss(history), self.from_attention(history)) if w]
        if candidates:
            self.warning = min(candidates, key=lambda w: w.step)
        return self.warning

    def state_dict(self) -> dict:
        w = self.warning
        return {"warning": None if w is None else {"step": w.step, "reason": w.reason, "layer": w.layer},
                "above": self.above, "forecast_only": self.forecast_only}

    def load_state_dict(self, state: dict) -> None:
        w = state.get("warning")
        self.warning = Warning(int(w["step"]), w["reason"], w["layer"]) if w else None
        self.above = bool(state.get("above", False))
        self.forecast_only = bool(state.get("forecast_only", False))


class Foresight:
    """The gauge and the warning of one run, as the loop uses them."""

    def __init__(self, cfg, engine):
        self.gauge = Gauge(cfg, engine)
        self.watch = WarningWatch(cfg, engine.recorder.layers, bounded_by(engine.stack))
        self.measured: List[tuple] = []  # every flushed measurement (step, limit, row, Forecast): one per gauge

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Measure when due; True when there is something for the next flush to read."""
        if self.gauge.due(step):
            self.gauge.measure(step, x, y)
            return True
        return False

    def flush(self, history: History, last_step: Optional[int] = None) -> tuple[List[tuple], Optional[Warning]]:
        """The gauge's MLflow points (steps up to ``last_step``), and a warning if one fires now."""
        measurements = [m for m in self.gauge.flush() if last_step is None or m[0] <= last_step]
        self.measured += measurements
        points = [(key, value, step) for step, _, row, _ in measurements
                  for key, value in zip(GAUGE_KEYS, row[:3]) if not np.isnan(value) or key != GAUGE_KEYS[2]]
        points += [(FORECAST_KEY, row[0] / ahead.limit, step) for step, _, row, ahead in measurements]
        history.sparse += points
        warning = self.watch.update(history, measurements, last_step)
        if measurements and self.watch.warning is None and self.watch.forecast_only:
            self.gauge.confirm(measurements[-1][0])
        if warning is not None:
            print(f"gradlab: warning at step {warning.step}: {warning.reason} (layer {warning.layer})", file=sys.stderr)
        return points, warning

    def state_dict(self) -> dict:
        return {"gauge": self.gauge.state_dict(), **self.watch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gauge.load_state_dict(state["gauge"])
        self.watch.load_state_dict(state)


# The healthy configurations the warning must stay silent on (README "Foresight": the false-alarm
# suite; tests/test_foresight.py runs it as a slow test). One epoch (430 steps at batch 128), or
# the preset's own budget for the rescued presets.
ONE_EPOCH = "trainer.epochs=1"
HEALTHY_SUITE = [
    ["model=mlp", ONE_EPOCH],
    ["model=mlp", "optimizer=sgd", ONE_EPOCH],
    ["model=mlp", "optimizer=adamw", "scheduler=cosine", ONE_EPOCH],
    ["model=mlp", "optimizer=sgd", "scheduler=onecycle", ONE_EPOCH],
    ["model=cnn", ONE_EPOCH],
    ["model=cnn", "optimizer=sgd", "scheduler=step", ONE_EPOCH],
    ["model=lstm", ONE_EPOCH],
    ["model=rnn", ONE_EPOCH],
    ["model=rnn", "optimizer=sgd", ONE_EPOCH],
    ["model=deep_mlp", "model.residual=true", "model.norm=layernorm", ONE_EPOCH],
    ["model=vit", ONE_EPOCH],
    ["experiment=explode_rnn", "stabilizer=clip"],
    ["experiment=explode_rnn", "stabilizer=agc"],
    ["experiment=explode_deep_mlp", "stabilizer=clip"],
    ["experiment=explode_deep_mlp", "stabilizer=[warmup,clip]"],
    ["experiment=explode_high_lr", "stabilizer=clip"],
    ["experiment=explode_high_lr", "stabilizer=agc"],
    ["experiment=explode_transformer", "model.qk_norm=true"],
]
