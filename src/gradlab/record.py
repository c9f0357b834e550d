"""The run record: telemetry points up to a divergence while training, and at the end the
summary metrics, the outcome tags, the explosion record and the plots.

Shared by gradlab's own loop (``Trainer``) and by a user's loop (``GradientMonitor`` and the
Lightning / Hugging Face callbacks), so a run reads the same in MLflow whoever trained it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from . import plots
from .telemetry import DivergenceWatch, Explosion, History, Recorder, detect_explosion

MAX_CONSECUTIVE_SKIPS = 100  # a run that skips this many steps in a row has diverged too


def now_ms() -> int:
    return int(time.time() * 1000)


def new_points(recorder: Recorder, divergence: DivergenceWatch) -> List[tuple]:
    """One device->host copy of the pending rows; the new rows are checked for divergence, and
    their (key, value, step) points are returned up to and including a divergence step, nothing
    after it (the history is cut there too)."""
    h = recorder.history
    known = len(h.steps)
    points = recorder.flush()
    if len(h.steps) > known:
        at = divergence.update(h.steps[known:], h.rows[-1])
        if at is not None:
            points = [p for p in points if p[2] <= at]
            h.truncate(at)
    return points


def explosion_of(recorder: Recorder, telemetry_cfg) -> Explosion:
    return detect_explosion(recorder.history, recorder.layers, telemetry_cfg.explosion_factor,
                            telemetry_cfg.explosion_window)


def summary(h: History, diverged_at: Optional[int], seconds: float, explosion: Explosion) -> tuple[dict, dict]:
    """Summary metrics and outcome tags of a run's telemetry (the run's own metrics, e.g. its
    validation accuracy, are the caller's)."""
    steps = len(h.steps)
    norm = h.column("grad/norm")
    finite = norm[np.isfinite(norm)]
    metrics = {"clip_rate": float((h.column("grad/clip_coef") < 1.0).mean()) if steps else 0.0,
               "skip_count": float((h.column("grad/skipped") > 0.5).sum()), "steps": float(steps),
               "time/step_ms": 1000 * seconds / max(steps, 1),
               "grad/norm_max": float(finite.max()) if finite.size else (math.nan if steps else 0.0)}
    tags = {"diverged": str(diverged_at is not None).lower(), "exploding": str(explosion.step is not None).lower()}
    if diverged_at is not None:
        metrics["diverged_at_step"] = float(diverged_at)
    if explosion.step is not None:
        metrics["explosion/step"] = float(explosion.step)
        tags["explosion/step"] = explosion.step
        tags["explosion/first_layer"] = explosion.first_layer or "n/a"
    return metrics, tags


def plot(recorder: Recorder, out_dir: Path, title: str, explosion: Explosion, diverged_at: Optional[int],
         max_norm: Optional[float], faults: Optional[dict] = None) -> list:
    """grad_layer_heatmap.png and grad_norm.png in ``out_dir`` (``faults``: the injected faults' step
    spans, marked on the norm plot); returns their paths."""
    h, layers = recorder.history, recorder.layers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plots.layer_heatmap(h.steps, layers, h.layer_grid(len(layers)), out_dir / "grad_layer_heatmap.png",
                                explosion.step, title),
            plots.norm_history(h.steps, h.column("grad/norm"), h.column("grad/norm_after"), h.column("grad/clip_coef"),
                               h.column("grad/skipped"), h.column("grad/threshold"), out_dir / "grad_norm.png",
                               max_norm, explosion.step, diverged_at, title, faults=faults)]


def log_end(run, h: History, metrics: dict, tags: dict, plot_paths: list) -> None:
    """The end-of-run record into ``run`` (a RunLogger): summary metrics at the last step, tags, plots."""
    run.log_metrics(metrics, step=h.steps[-1] if h.steps else 0, timestamp_ms=now_ms())
    run.set_tags(tags)
    for path in plot_paths:
        run.log_artifact(path, "plots")
