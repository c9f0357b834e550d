"""Per-step gradient telemetry: recorded on the device, copied to the host once per interval.

Each step writes one row of device scalars (loss, pre/post norm, clip coefficient,
skipped flag, adaptive threshold, injected fault), the model's probes (e.g. a
transformer's largest attention logit per layer, read from module buffers its forward
filled) and the per-layer gradient norms into a preallocated buffer. The per-layer norms cost one scatter of the per-tensor norms the
global norm needs anyway, so the host keeps them for every step (the explosion
warning and the heatmap use full resolution); MLflow gets them, and the
update-to-weight ratios (which need a parameter snapshot), every
``telemetry.layer_every`` steps. ``flush()`` copies the filled rows to the host in
one transfer; everything after that (divergence, explosion warning, plots) is numpy.

Non-finite values are kept as they are. In MLflow's SQL store NaN stays NaN (the UI
leaves a gap in the chart) and +/-inf is stored as +/-1.797e308 (float max), so an
infinite norm shows as a spike to the top of a chart. The plots draw non-finite
values as marked points instead of dropping them silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .distributed import tensor_norms
from .registry import Schema, need

# The per-step series, named once and in row order: each reads its device scalar from the
# step's GradStep (gradlab.stabilizers). A new per-step metric is one line here.
STEP_METRICS = {
    "train/loss": lambda g: g.loss.detach(),
    "grad/norm": lambda g: g.pre_norm,  # before any stabilizer
    "grad/norm_after": lambda g: g.applied_norm,  # what the optimizer applied (0 on a skipped step)
    "grad/clip_coef": lambda g: g.clip_coef,  # what the clippers did: norm after / before (skips aside)
    "grad/skipped": lambda g: g.flag(g.skipped),
    "grad/threshold": lambda g: g.or_nan(g.threshold),  # the last adaptive one in the run order
    "fault/active": lambda g: g.or_nan(g.fault),  # 1: an injected fault acted on this step (gradlab.faults)
}
STEP_KEYS = list(STEP_METRICS)
OPTIONAL_KEYS = ("grad/threshold", "fault/active")  # NaN at a step: nothing to log (no threshold, no fault selected)


def model_probes(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Per-step device scalars a model fills during its forward pass (``model.probes()``, e.g.
    ``attn/logit_max/0``): the recorder copies them into each row, so reading them costs no sync."""
    probes = getattr(model, "probes", None)
    return dict(probes()) if callable(probes) else {}


@dataclass
class TelemetryConfig(Schema):
    log_every: int = 50  # steps between device->host copies of the per-step history
    layer_every: int = 10  # steps between per-layer norm / update-ratio points in MLflow
    explosion_factor: float = 100.0  # norm growth that flags an explosion ...
    explosion_window: int = 100  # ... within this many steps
    plots: bool = True  # heatmap + norm plot artifacts
    sharpness_every: int = 100  # steps between sharpness gauges (gradlab.foresight; 0: off)
    sharpness_iters: int = 3  # power iterations per gauge after the first (warm-started)
    warn_ratio: float = 1.0  # warn at this stability ratio (SGD-type optimizers)
    warn_loss: float = 1.5  # ... when the training loss climbs to this multiple of its start
    warn_attn_logit: float = 100.0  # ... when an attention logit reaches this (models with attention probes)

    def check(self) -> None:
        for key in ("log_every", "layer_every", "explosion_window", "sharpness_iters"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.explosion_factor > 1, "explosion_factor", f"must be > 1, got {self.explosion_factor}")
        need(self.sharpness_every >= 0, "sharpness_every", f"must be >= 0 (0: off), got {self.sharpness_every}")
        for key in ("warn_ratio", "warn_loss", "warn_attn_logit"):
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")




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


def layer_matrix(index: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[layers, tensors] 0/1: row l sums the squared norms of layer l's tensors (one matrix-vector
    product per step instead of a scatter into a fresh buffer)."""
    return (torch.arange(n_layers, device=index.device).unsqueeze(1) == index.unsqueeze(0)).float()


@dataclass
class History:
    """Everything flushed so far, on the host: the source of the MLflow points, the plots, the
    divergence and explosion records, and (in the checkpoint) of a resumed run's replay."""

    layers: List[str] = field(default_factory=list)
    steps: List[int] = field(default_factory=list)
    rows: List[np.ndarray] = field(default_factory=list)  # [n, len(STEP_KEYS)]
    probes: List[str] = field(default_factory=list)  # the model's probe names (model_probes)
    probe_rows: List[np.ndarray] = field(default_factory=list)  # [n, len(probes)]: every step
    lr: List[float] = field(default_factory=list)
    layer_grad: List[np.ndarray] = field(default_factory=list)  # [n, L]: every step
    ratio_steps: List[int] = field(default_factory=list)  # the layer_every steps
    layer_ratio: List[np.ndarray] = field(default_factory=list)  # [L] per ratio step
    epoch_points: List[tuple] = field(default_factory=list)  # (key, value, step) of each epoch's validation
    sparse: List[tuple] = field(default_factory=list)  # (key, value, step) measured at some steps only (the gauge)

    def column(self, key: str) -> np.ndarray:
        if not self.rows:
            return np.zeros(0)
        return np.concatenate(self.rows)[:, STEP_KEYS.index(key)]

    def layer_grid(self, n_layers: int) -> np.ndarray:
        """Per-layer gradient norms, [steps, layers]."""
        return np.concatenate(self.layer_grad) if self.layer_grad else np.zeros((0, n_layers))

    def probe_grid(self) -> np.ndarray:
        """The model's probes, [steps, probes]."""
        return np.concatenate(self.probe_rows) if self.probe_rows else np.zeros((len(self.steps), len(self.probes)))

    def points(self, start: int = 0) -> List[tuple]:
        """The MLflow points (key, value, step) of the steps from index ``start`` on: every step's
        STEP_METRICS and lr; per-layer norms and update ratios on the layer steps."""
        rows = np.concatenate(self.rows)[start:] if self.rows else np.zeros((0, len(STEP_KEYS)))
        grads = self.layer_grid(len(self.layers))[start:]
        probes = self.probe_grid()[start:]
        ratios = dict(zip(self.ratio_steps, self.layer_ratio))
        out = []
        for j, step in enumerate(self.steps[start:]):
            for key, value in zip(STEP_KEYS, rows[j]):
                if key not in OPTIONAL_KEYS or not np.isnan(value):
                    out.append((key, value, step))
            out.append(("lr", self.lr[start + j], step))
            out += [(name, v, step) for name, v in zip(self.probes, probes[j])]
            if step in ratios:
                out += [(f"grad/layer/{name}", g, step) for name, g in zip(self.layers, grads[j])]
                out += [(f"update_ratio/{name}", r, step) for name, r in zip(self.layers, ratios[step])]
        return out

    def truncate(self, last_step: int) -> None:
        """Drop everything recorded after ``last_step`` (garbage steps after a divergence)."""
        n = sum(1 for s in self.steps if s <= last_step)
        self.rows = [np.concatenate(self.rows)[:n]] if self.rows else []
        self.layer_grad = [np.concatenate(self.layer_grad)[:n]] if self.layer_grad else []
        self.probe_rows = [self.probe_grid()[:n]] if self.probe_rows else []
        self.steps, self.lr = self.steps[:n], self.lr[:n]
        m = sum(1 for s in self.ratio_steps if s <= last_step)
        self.ratio_steps, self.layer_ratio = self.ratio_steps[:m], self.layer_ratio[:m]
        self.sparse = [p for p in self.sparse if p[2] <= last_step]

    def state_dict(self) -> Dict[str, Any]:
        """Tensors and plain types only, so a checkpoint loads with ``weights_only=True``."""
        n_layers = len(self.layers)
        empty = torch.zeros((0, n_layers), dtype=torch.float64)
        return {"layers": list(self.layers), "steps": torch.tensor(self.steps, dtype=torch.long),
                "lr": torch.tensor(self.lr, dtype=torch.float64),
                "rows": torch.from_numpy(np.concatenate(self.rows)) if self.rows
                else torch.zeros((0, len(STEP_KEYS)), dtype=torch.float64),
                "layer_grad": torch.from_numpy(self.layer_grid(n_layers)),
                "probes": list(self.probes), "probe_rows": torch.from_numpy(self.probe_grid()),
                "ratio_steps": torch.tensor(self.ratio_steps, dtype=torch.long),
                "layer_ratio": torch.from_numpy(np.stack(self.layer_ratio)) if self.layer_ratio else empty,
                "epoch_points": [(k, float(v), int(s)) for k, v, s in self.epoch_points],
                "sparse": [(k, float(v), int(s)) for k, v, s in self.sparse]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.layers = list(state["layers"])
        self.steps, self.lr = state["steps"].tolist(), state["lr"].tolist()
        rows = state["rows"].numpy()
        if rows.shape[1] < len(STEP_KEYS):  # a checkpoint from before a series existed: it was never set
            rows = np.pad(rows, ((0, 0), (0, len(STEP_KEYS) - rows.shape[1])), constant_values=np.nan)
        self.rows = [rows] if len(self.steps) else []
        self.layer_grad = [state["layer_grad"].numpy()] if len(self.steps) else []
        self.probes = list(state.get("probes", []))
        self.probe_rows = [state["probe_rows"].numpy()] if len(self.steps) and self.probes else []
        self.ratio_steps = state["ratio_steps"].tolist()
        self.layer_ratio = list(state["layer_ratio"].numpy())
        self.epoch_points = [tuple(p) for p in state["epoch_points"]]
        self.sparse = [tuple(p) for p in state.get("sparse", [])]


class Recorder:
    """Device-side per-step buffer; ``flush`` moves the pending rows to the host history."""

    def __init__(self, param_names: Sequence[str], device: torch.device, log_every: int, layer_every: int,
                 probes: Optional[Dict[str, torch.Tensor]] = None):
        self.layers, index = group_layers(param_names)
        self.index = index.to(device)
        self.device, self.log_every, self.layer_every = device, log_every, layer_every
        self.probes = dict(probes or {})
        n_layers = len(self.layers)
        # one row per step: the step scalars, the probes, then per-layer grad norms and update ratios
        self.buf = torch.full((log_every, len(STEP_KEYS) + len(self.probes) + 2 * n_layers), float("nan"),
                              device=device)
        self.sums = layer_matrix(self.index, n_layers)
        k, g = len(STEP_KEYS), len(STEP_KEYS) + len(self.probes)
        # each row's parts as fixed views of the buffer: a step writes into them with out=, no copies
        self.views = [(r[:k], r[k:g], r[g:g + n_layers], r[g + n_layers:]) for r in self.buf]
        self.pending_steps: List[int] = []
        self.pending_lr: List[float] = []
        self.history = History(layers=list(self.layers), probes=list(self.probes))

    def is_layer_step(self, step: int) -> bool:
        return step % self.layer_every == 0

    def record(self, step: int, lr: float, gs, old_params: Optional[List[torch.Tensor]] = None,
               params: Optional[List[torch.Tensor]] = None) -> None:
        """One row: STEP_METRICS of the finished GradStep, per-layer gradient norms and, on a
        layer step, per-layer update-to-weight ratios. Device work only."""
        n = len(self.layers)
        metrics, probes, grads, ratios = self.views[len(self.pending_steps)]
        torch.stack([read(gs) for read in STEP_METRICS.values()], out=metrics)
        if self.probes:
            torch.stack([p.detach() for p in self.probes.values()], out=probes)
        vec = gs.norm_vec if gs.norm_vec is not None else torch.stack(gs.per_tensor)
        torch.mv(self.sums, vec.float().square(), out=grads).sqrt_()
        if old_params is not None:
            delta = tensor_norms(torch._foreach_sub([p.detach() for p in params], old_params))
            d = layer_norms(delta, self.index, n)
            w = layer_norms(tensor_norms([p.detach() for p in params]), self.index, n)
            torch.div(d, w.clamp(min=1e-12), out=ratios)
        self.pending_steps.append(step)
        self.pending_lr.append(lr)

    @property
    def full(self) -> bool:
        return len(self.pending_steps) >= self.log_every

    def flush(self) -> List[tuple]:
        """One device->host copy of the pending rows into the history; returns their MLflow points."""
        n = len(self.pending_steps)
        if n == 0:
            return []
        host = self.buf[:n].cpu().numpy().astype(np.float64)
        self.buf.fill_(float("nan"))
        k, npr, nl = len(STEP_KEYS), len(self.probes), len(self.layers)
        g = k + npr  # where the per-layer grad norms start
        h = self.history
        start = len(h.steps)
        lrs = [float(lr) for lr in self.pending_lr]  # a tensor lr (a user's optimizer) is read here, not per step
        for j, step in enumerate(self.pending_steps):
            if self.is_layer_step(step):
                h.ratio_steps.append(step)
                h.layer_ratio.append(host[j, g + nl:g + 2 * nl])
        h.steps += self.pending_steps
        h.lr += lrs
        h.rows.append(host[:, :k])
        if npr:
            h.probe_rows.append(host[:, k:g])
        h.layer_grad.append(host[:, g:g + nl])
        self.pending_steps, self.pending_lr = [], []
        return h.points(start)


# ---------------------------------------------------------------- host-side analysis
class DivergenceWatch:
    """The first step that applied (did not skip) a non-finite loss or a non-finite update
    (``grad/norm_after``: the gradient after the stabilizers), or the step at which ``max_skips``
    consecutive steps have been skipped. A raw non-finite gradient that an element-wise clipper
    (clip_value, spam) bounded to finite values reaches the weights finite: not a divergence.
    ``update`` looks at new rows only, carrying the current run of skips, so each flush costs
    the same however long the run is."""

    def __init__(self, max_skips: int):
        self.max_skips = max_skips
        self.skip_run = 0  # consecutive skipped steps up to the last row seen
        self.step: Optional[int] = None

    def update(self, steps: Sequence[int], rows: np.ndarray) -> Optional[int]:
        if self.step is not None or not len(steps):
            return self.step
        loss, applied, skipped = (rows[:, STEP_KEYS.index(k)] for k in ("train/loss", "grad/norm_after", "grad/skipped"))
        skip = skipped > 0.5
        bad = (~np.isfinite(loss) | ~np.isfinite(applied)) & ~skip
        idx = np.arange(len(steps))
        last_applied = np.maximum.accumulate(np.where(skip, -1, idx))
        run = np.where(skip, np.where(last_applied < 0, self.skip_run + idx + 1, idx - last_applied), 0)
        hits = np.flatnonzero(bad | (run >= self.max_skips))
        if hits.size:
            self.step = int(steps[hits[0]])
        else:
            self.skip_run = int(run[-1])
        return self.step


def _growth_crossing(values: np.ndarray, factor: float, window: int) -> tuple[Optional[int], float]:
    """Index of the first value that exceeds ``factor`` x the smallest finite positive value
    among the ``window`` values before it (+inf counts as crossing; NaN does not), and
    that ratio. Values are one per step, so an index window is a step window."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None, 0.0
    base = np.where(np.isfinite(values) & (values > 0), values, np.inf)
    padded = np.concatenate([np.full(window, np.inf), base[:-1]])
    prev_min = np.lib.stride_tricks.sliding_window_view(padded, window).min(axis=1)  # min of the window before i
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isfinite(prev_min) & ~np.isnan(values), values / prev_min, 0.0)
    hits = np.flatnonzero(ratio > factor)
    if hits.size == 0:
        return None, 0.0
    return int(hits[0]), float(ratio[hits[0]])


@dataclass
class Explosion:
    step: Optional[int]
    first_layer: Optional[str]
    layer_step: Optional[int]


def detect_explosion(history: History, layers: List[str], factor: float, window: int) -> Explosion:
    """Early warning: the global norm grew > ``factor`` within ``window`` steps. The first
    layer is the one whose own norm crossed the same factor earliest (ties: larger growth);
    if no single layer grew that much, the layer that grew most over the window ending at
    the flagged step."""
    i, _ = _growth_crossing(history.column("grad/norm"), factor, window)
    if i is None:
        return Explosion(None, None, None)
    steps = history.steps
    grid = history.layer_grid(len(layers))
    best: tuple = (None, None, 0.0)  # (layer index, row, ratio)
    for li in range(grid.shape[1]):
        j, r = _growth_crossing(grid[:, li], factor, window)
        if j is not None and (best[1] is None or j < best[1] or (j == best[1] and r > best[2])):
            best = (li, j, r)
    if best[0] is None and grid.shape[1]:
        lo = max(0, i - window)
        with np.errstate(divide="ignore", invalid="ignore"):
            base = np.where(grid[lo:i] > 0, grid[lo:i], np.nan) if i > lo else np.full((1, grid.shape[1]), np.nan)
            growth = grid[i] / np.fmin.reduce(base, axis=0)  # NaN-ignoring min, silent
        growth = np.where(np.isnan(growth), -np.inf, growth)
        if (growth > -np.inf).any():
            best = (int(np.argmax(growth)), i, float(growth.max()))
    if best[0] is None:
        return Explosion(steps[i], None, None)
    return Explosion(steps[i], layers[best[0]], steps[best[1]])
