"""Per-step gradient telemetry: recorded on the device, copied to the host once per interval.

Each step writes one row of device scalars (loss, pre/post norm, clip coefficient,
skipped flag, adaptive threshold) into a preallocated buffer; every
``telemetry.layer_every`` steps the row also carries per-layer gradient norms and
update-to-weight ratios. ``flush()`` copies the filled rows to the host in one
transfer; everything after that (divergence, explosion warning, plots) is numpy.

Non-finite values are kept as they are: NaN and +/-inf reach MLflow unchanged
(the UI shows them as NaN / a huge value and leaves gaps in charts), and the plots
draw them as marked points instead of dropping them silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

STEP_KEYS = ["train/loss", "grad/norm", "grad/norm_after", "grad/clip_coef", "grad/skipped", "grad/threshold"]


def group_layers(param_names: Sequence[str]) -> tuple[List[str], torch.Tensor]:
    """Layer names (a parameter name less .weight/.bias) and each parameter's layer index."""
    layers: List[str] = []
    index = []
    for n in param_names:
        layer = n.rsplit(".", 1)[0] if n.endswith((".weight", ".bias")) else n
        if layer not in layers:
            layers.append(layer)
        index.append(layers.index(layer))
    return layers, torch.tensor(index)


def layer_norms(per_tensor: List[torch.Tensor], index: torch.Tensor, n_layers: int) -> torch.Tensor:
    """sqrt of the summed squared per-parameter norms of each layer (one scatter, no loop)."""
    sq = torch.stack(per_tensor).float() ** 2
    return torch.zeros(n_layers, device=sq.device).index_add_(0, index, sq).sqrt()


@dataclass
class History:
    """Everything flushed so far, on the host."""

    steps: List[int] = field(default_factory=list)
    rows: List[np.ndarray] = field(default_factory=list)  # [n, len(STEP_KEYS)]
    lr: List[float] = field(default_factory=list)
    layer_steps: List[int] = field(default_factory=list)
    layer_grad: List[np.ndarray] = field(default_factory=list)  # [L]
    layer_ratio: List[np.ndarray] = field(default_factory=list)  # [L]

    def column(self, key: str) -> np.ndarray:
        if not self.rows:
            return np.zeros(0)
        return np.concatenate(self.rows)[:, STEP_KEYS.index(key)]

    def truncate(self, last_step: int) -> None:
        """Drop everything recorded after ``last_step`` (garbage steps after a divergence)."""
        keep = [i for i, s in enumerate(self.steps) if s <= last_step]
        allrows = np.concatenate(self.rows) if self.rows else np.zeros((0, len(STEP_KEYS)))
        self.rows = [allrows[: len(keep)]]
        self.steps, self.lr = self.steps[: len(keep)], self.lr[: len(keep)]
        keep_l = [i for i, s in enumerate(self.layer_steps) if s <= last_step]
        self.layer_steps = self.layer_steps[: len(keep_l)]
        self.layer_grad, self.layer_ratio = self.layer_grad[: len(keep_l)], self.layer_ratio[: len(keep_l)]


class Recorder:
    """Device-side per-step buffer; ``flush`` returns the new host rows as MLflow points."""

    def __init__(self, param_names: Sequence[str], device: torch.device, log_every: int, layer_every: int):
        self.layers, index = group_layers(param_names)
        self.index = index.to(device)
        self.device, self.log_every, self.layer_every = device, log_every, layer_every
        n_layers = len(self.layers)
        # one row per step: the step scalars, then per-layer grad norms and update ratios
        self.buf = torch.full((log_every, len(STEP_KEYS) + 2 * n_layers), float("nan"), device=device)
        self.pending_steps: List[int] = []
        self.pending_lr: List[float] = []
        self.history = History()
        self._nan = torch.full((), float("nan"), device=device)
        self._zero = torch.zeros((), device=device)

    def is_layer_step(self, step: int) -> bool:
        return step % self.layer_every == 0

    def record(self, step: int, lr: float, gs, post_norm: torch.Tensor, skipped: torch.Tensor,
               old_params: Optional[List[torch.Tensor]] = None, params: Optional[List[torch.Tensor]] = None) -> None:
        pre = gs.pre_norm
        coef = torch.where(pre > 0, post_norm / pre, 1.0) if gs.modified else torch.ones((), device=self.device)
        thr = gs.threshold if gs.threshold is not None else self._nan
        row = [gs.loss.detach().float(), pre, post_norm, coef, skipped.float(), thr.float()]
        i = len(self.pending_steps)
        if old_params is not None:
            n = len(self.layers)
            g = layer_norms(gs.per_tensor, self.index, n)
            delta = torch._foreach_norm(torch._foreach_sub([p.detach() for p in params], old_params))
            d = layer_norms(delta, self.index, n)
            w = layer_norms(torch._foreach_norm([p.detach() for p in params]), self.index, n)
            ratio = d / w.clamp(min=1e-12)
            self.buf[i].copy_(torch.cat([torch.stack(row), g, ratio]))
        else:
            self.buf[i, : len(STEP_KEYS)].copy_(torch.stack(row))
        self.pending_steps.append(step)
        self.pending_lr.append(lr)

    @property
    def full(self) -> bool:
        return len(self.pending_steps) >= self.log_every

    def flush(self) -> List[tuple]:
        """One device->host copy of the pending rows; returns (key, value, step) points."""
        n = len(self.pending_steps)
        if n == 0:
            return []
        host = self.buf[:n].cpu().numpy().astype(np.float64)
        self.buf.fill_(float("nan"))
        k = len(STEP_KEYS)
        points = []
        h = self.history
        for j, step in enumerate(self.pending_steps):
            row = host[j]
            for c, key in enumerate(STEP_KEYS):
                if key == "grad/threshold" and not np.isfinite(row[c]):
                    continue  # no adaptive threshold (yet) at this step
                points.append((key, row[c], step))
            points.append(("lr", self.pending_lr[j], step))
            if self.is_layer_step(step) and not np.isnan(row[k:]).all():
                nl = len(self.layers)
                h.layer_steps.append(step)
                h.layer_grad.append(row[k:k + nl])
                h.layer_ratio.append(row[k + nl:k + 2 * nl])
                for li, name in enumerate(self.layers):
                    points.append((f"grad/layer/{name}", row[k + li], step))
                    points.append((f"update_ratio/{name}", row[k + nl + li], step))
        h.steps += self.pending_steps
        h.lr += self.pending_lr
        h.rows.append(host[:, :k])
        self.pending_steps, self.pending_lr = [], []
        return points


# ---------------------------------------------------------------- host-side analysis
def first_divergence(history: History, max_skips: int) -> Optional[int]:
    """First step with a non-finite loss or gradient that was applied (not skipped), or
    the step at which ``max_skips`` consecutive steps have been skipped."""
    if not history.rows:
        return None
    loss, norm, skipped = (history.column(k) for k in ("train/loss", "grad/norm", "grad/skipped"))
    bad = (~np.isfinite(loss) | ~np.isfinite(norm)) & (skipped < 0.5)
    run = 0
    for i in range(len(loss)):
        if bad[i]:
            return history.steps[i]
        run = run + 1 if skipped[i] > 0.5 else 0
        if run >= max_skips:
            return history.steps[i]
    return None


def _growth_crossing(steps: np.ndarray, values: np.ndarray, factor: float, window: int) -> tuple[Optional[int], float]:
    """First step whose value exceeds ``factor`` x the smallest finite positive value in the
    preceding ``window`` steps (+inf counts as crossing; NaN does not). Returns (step, ratio)."""
    for i in range(1, len(values)):
        v = values[i]
        if np.isnan(v):
            continue
        lo = np.searchsorted(steps, steps[i] - window)
        prev = values[lo:i]
        prev = prev[np.isfinite(prev) & (prev > 0)]
        if prev.size == 0:
            continue
        ratio = v / prev.min()
        if ratio > factor:
            return int(steps[i]), float(ratio)
    return None, 0.0


@dataclass
class Explosion:
    step: Optional[int]
    first_layer: Optional[str]
    layer_step: Optional[int]


def detect_explosion(history: History, layers: List[str], factor: float, window: int) -> Explosion:
    """Early warning: the global norm grew > ``factor`` within ``window`` steps. The first
    layer is the one whose own norm crossed the same factor earliest (ties: larger growth);
    if no single layer grew that much, the layer with the largest growth at the first
    per-layer sample at or after the flagged step."""
    step, _ = _growth_crossing(np.asarray(history.steps), history.column("grad/norm"), factor, window)
    if step is None:
        return Explosion(None, None, None)
    best = (None, None, 0.0)
    if history.layer_steps:
        ls = np.asarray(history.layer_steps)
        grid = np.stack(history.layer_grad)
        for li, name in enumerate(layers):
            s, r = _growth_crossing(ls, grid[:, li], factor, window)
            if s is not None and (best[1] is None or s < best[1] or (s == best[1] and r > best[2])):
                best = (name, s, r)
        at = int(np.searchsorted(ls, step))
        if best[0] is None and at < len(ls):
            lo = int(np.searchsorted(ls, ls[at] - window))
            with np.errstate(divide="ignore", invalid="ignore"):
                base = np.where(grid[lo:at + 1] > 0, grid[lo:at + 1], np.nan)
                growth = grid[at] / np.nanmin(base, axis=0)
            growth = np.where(np.isnan(growth), -np.inf, growth)
            if np.isfinite(growth).any() or np.isposinf(growth).any():
                li = int(np.argmax(growth))
                best = (layers[li], int(ls[at]), float(growth[li]))
    return Explosion(step, best[0], best[1])
