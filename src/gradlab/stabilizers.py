"""Gradient-side remedies, applied between backward() and optimizer.step().

Everything here stays on the device: thresholds, histories and skip decisions
are tensors, so a stabilizer never forces a host sync. The formulas follow
``shared/reference/stabilizers.md``; each class names its source.

Non-finite gradients are not clipped into shape: the step is recorded, and the
run is marked diverged unless ``spike_skip`` (or fp16's GradScaler) skipped it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import clip_grad_value_, clip_grads_with_norm_, get_total_norm

from .distributed import plain, tensor_norms
from .registry import STABILIZERS, Schema, choice, infinite_ok, need

EPS = 1e-6  # the denominator guard torch's clip_grad_norm_ uses


def total_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together, fused (one multi-tensor kernel); global under FSDP."""
    return torch.linalg.vector_norm(torch.stack(tensor_norms(grads)))


def clip_to(grads: List[torch.Tensor], threshold: torch.Tensor, norm: torch.Tensor) -> None:
    """grads *= min(1, threshold / (norm + 1e-6)): clip_grads_with_norm_'s formula for a
    threshold that is a device tensor. torch's function calls float(max_norm) first, which
    would read an adaptive threshold back to the host on every step."""
    torch._foreach_mul_(grads, (threshold / (norm + EPS)).clamp(max=1.0))


class RingBuffer:
    """A bounded history on the device; pushes can be rejected by a device-side flag."""

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.values = torch.zeros(size, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self._arange = torch.arange(size, device=device)

    def push(self, x: torch.Tensor, accept: torch.Tensor) -> None:
        idx = self.pos.view(1)
        new = torch.where(accept, x.detach().float().view(1), self.values.index_select(0, idx))
        self.values.index_copy_(0, idx, new)
        self.pos.copy_(torch.where(accept, (self.pos + 1) % self.size, self.pos))
        self.count.copy_(torch.where(accept, (self.count + 1).clamp(max=self.size), self.count))

    def mean_std(self):
        mask = self._arange < self.count
        n = self.count.clamp(min=1).float()
        mean = torch.where(mask, self.values, 0.0).sum() / n
        var = torch.where(mask, (self.values - mean) ** 2, 0.0).sum() / n
        return mean, var.sqrt()

    def quantile(self, q: float) -> torch.Tensor:
        """Linear-interpolated quantile of the stored values (numpy's default); inf when empty."""
        ordered = torch.sort(torch.where(self._arange < self.count, self.values, float("inf"))).values
        pos = q * (self.count - 1).clamp(min=0).float()
        lo = pos.floor().long()
        hi = torch.minimum(lo + 1, (self.count - 1).clamp(min=0))
        a, b = ordered.gather(0, lo.view(1))[0], ordered.gather(0, hi.view(1))[0]
        return torch.where(hi > lo, a + (pos - lo.float()) * (b - a), a)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"values": self.values.clone(), "count": self.count.clone(), "pos": self.pos.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for k in ("values", "count", "pos"):
            getattr(self, k).copy_(state[k])


@dataclass
class GradStep:
    """What one step's gradient pipeline saw and did (all device tensors)."""

    loss: torch.Tensor
    grads: List[torch.Tensor]
    per_tensor: List[torch.Tensor]  # per-parameter L2 norms before any stabilizer
    pre_norm: torch.Tensor
    norm: Optional[torch.Tensor] = None  # current L2 norm; None once a transform made it stale
    threshold: Optional[torch.Tensor] = None
    skip: Optional[torch.Tensor] = None  # a stabilizer's decision to skip the update
    modified: bool = False
    skipped: Optional[torch.Tensor] = None  # after the update: whether it was skipped (by anyone)
    applied_norm: Optional[torch.Tensor] = None  # after the update: the L2 norm applied (0 if skipped)

    def current_norm(self) -> torch.Tensor:
        if self.norm is None:
            self.norm = total_norm(self.grads)
        return self.norm

    def changed(self) -> None:
        """Gradients changed non-uniformly: the cached norm is stale."""
        self.norm, self.modified = None, True

    def finish(self, skipped: torch.Tensor) -> None:
        """Record the outcome of the update (telemetry reads it through STEP_METRICS)."""
        self.skipped = skipped
        self.applied_norm = torch.where(skipped, 0.0, self.current_norm())

    @property
    def clip_coef(self) -> torch.Tensor:
        """applied / raw norm when a stabilizer touched the gradients, else 1."""
        if not self.modified:
            return torch.ones((), device=self.pre_norm.device)
        return torch.where(self.pre_norm > 0, self.applied_norm / self.pre_norm, 1.0)

    @property
    def threshold_or_nan(self) -> torch.Tensor:
        if self.threshold is None:
            return torch.full((), float("nan"), device=self.pre_norm.device)
        return self.threshold.float()

    def clipped_to(self, max_norm, norm: torch.Tensor) -> None:
        """Gradients were scaled by clip_grads_with_norm_'s coefficient min(1, max/(norm+1e-6)):
        a cached L2 norm scales by the same factor, so it is updated without another pass.
        A stale one stays stale (recomputing it here would read the already-clipped
        gradients and apply the coefficient twice)."""
        if self.norm is not None:
            self.norm = self.norm * (max_norm / (norm + EPS)).clamp(max=1.0)
        self.modified = True


class Stabilizer:
    """Base: a stateful transform of the gradients; state is saved with the checkpoint.
    A subclass registers with its schema and its place in the run order:
    ``@STABILIZERS.register(name, Config, order=...)``; its ``name`` is set from there."""

    name = "base"

    def __init__(self, params: List[nn.Parameter], names: List[str], device: torch.device):
        self.params, self.names, self.device = params, names, device

    def apply(self, step: GradStep) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class NoneStabilizer(Schema):
    """Selecting ``none`` selects nothing; it exists so ``stabilizer=none`` reads naturally."""


STABILIZERS.add("none", NoneStabilizer, order=0)


@dataclass
class ClipConfig(Schema):
    max_norm: float = 1.0
    norm_type: float = infinite_ok(2.0)  # any p >= 1, or inf

    def check(self) -> None:
        need(self.max_norm > 0, "max_norm", f"must be > 0, got {self.max_norm}")
        need(self.norm_type >= 1, "norm_type", f"must be >= 1 (or inf), got {self.norm_type}")


@STABILIZERS.register("clip", ClipConfig, order=40)
class ClipNorm(Stabilizer):
    """Global-norm clipping, exactly torch.nn.utils.clip_grad_norm_ (any p, inf included)."""

    def __init__(self, params, names, device, max_norm: float, norm_type: float):
        super().__init__(params, names, device)
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def apply(self, step):
        norm = step.current_norm() if self.norm_type == 2.0 else \
            plain(get_total_norm(step.grads, self.norm_type, foreach=True))  # FSDP: torch reduces the shards
        clip_grads_with_norm_(self.params, self.max_norm, norm, foreach=True)
        step.clipped_to(self.max_norm, norm)


@dataclass
class ClipValueConfig(Schema):
    clip_value: float = 1.0

    def check(self) -> None:
        need(self.clip_value > 0, "clip_value", f"must be > 0, got {self.clip_value}")


@STABILIZERS.register("clip_value", ClipValueConfig, order=20)
class ClipValue(Stabilizer):
    """Element-wise clamp to [-c, c] (changes the direction; Mikolov's RNNs used 15)."""

    def __init__(self, params, names, device, clip_value: float):
        super().__init__(params, names, device)
        self.clip_value = float(clip_value)

    def apply(self, step):
        clip_grad_value_(self.params, self.clip_value, foreach=True)
        step.changed()


@dataclass
class AGCConfig(Schema):
    clipping: float = 0.01  # lambda
    eps: float = 1e-3
    exclude: List[str] = field(default_factory=lambda: ["auto"])  # name prefixes; "auto" = the final classifier

    def check(self) -> None:
        need(self.clipping > 0, "clipping", f"must be > 0, got {self.clipping}")
        need(self.eps > 0, "eps", f"must be > 0, got {self.eps}")


@STABILIZERS.register("agc", AGCConfig, order=30)
class AGC(Stabilizer):
    """Adaptive gradient clipping (Brock et al. 2021): per output unit,
    G_i <- G_i * max_i / max(||G_i||, 1e-6) when ||G_i|| > max_i = clipping * max(||W_i||, eps)."""

    def __init__(self, params, names, device, clipping: float, eps: float, exclude: List[str]):
        super().__init__(params, names, device)
        prefixes = [("head." if e == "auto" else e) for e in exclude]
        self.clipping, self.eps = float(clipping), float(eps)
        self.targets = [p for p, n in zip(params, names) if not any(n.startswith(x) for x in prefixes)]

    @staticmethod
    def unit_norm(t: torch.Tensor) -> torch.Tensor:
        if t.ndim <= 1:
            return torch.linalg.vector_norm(t)
        return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)

    def apply(self, step):
        for p in self.targets:
            w_norm = self.unit_norm(p.detach()).clamp(min=self.eps)
            g_norm = self.unit_norm(p.grad)
            max_norm = self.clipping * w_norm
            coef = torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=1e-6), 1.0)
            p.grad.mul_(coef)
        step.changed()


@dataclass
class AutoClipConfig(Schema):
    percentile: float = 10.0
    window: int = 1000  # bounded history of total norms

    def check(self) -> None:
        need(0 < self.percentile <= 100, "percentile", f"must be in (0, 100], got {self.percentile}")
        need(self.window >= 1, "window", f"must be >= 1, got {self.window}")


@STABILIZERS.register("autoclip", AutoClipConfig, order=50)
class AutoClip(Stabilizer):
    """AutoClip (Seetharaman et al. 2020): clip to the p-th percentile of the total norms seen
    so far, the current one included, over a bounded window. Non-finite norms are not stored."""

    def __init__(self, params, names, device, percentile: float, window: int):
        super().__init__(params, names, device)
        self.q = float(percentile) / 100.0
        self.history = RingBuffer(int(window), device)

    def apply(self, step):
        norm = step.current_norm()
        self.history.push(norm, torch.isfinite(norm))
        threshold = self.history.quantile(self.q)
        clip_to(step.grads, threshold, norm)
        step.clipped_to(threshold, norm)
        step.threshold = threshold

    def state_dict(self):
        return self.history.state_dict()

    def load_state_dict(self, state):
        self.history.load_state_dict(state)


@dataclass
class ZClipConfig(Schema):
    warmup_steps: int = 25
    alpha: float = 0.97
    z_thresh: float = 2.5
    mode: str = choice("zscore", "mean")  # adaptive threshold, or clip to the mean
    max_grad_norm: Optional[float] = None  # hard cap, also during warmup

    def check(self) -> None:
        # with no warmup the EMA starts at 0 and every gradient is clipped to 0
        need(self.warmup_steps >= 1, "warmup_steps", f"must be >= 1, got {self.warmup_steps}")
        need(0 < self.alpha < 1, "alpha", f"must be in (0, 1), got {self.alpha}")
        need(self.z_thresh > 0, "z_thresh", f"must be > 0, got {self.z_thresh}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
             f"must be > 0 (or null), got {self.max_grad_norm}")


@STABILIZERS.register("zclip", ZClipConfig, order=60)
class ZClip(Stabilizer):
    """ZClip (Kumar et al. 2025). Warmup: collect ``warmup_steps`` norms (clip only at
    ``max_grad_norm``), then mean/variance (population) seed the EMA. After it:
    z = (g - mu) / (sigma + 1e-6); if z > z_thresh clip to mu + z_thresh^2 * sigma / z
    (mode zscore) or to mu (mode mean). The EMA is updated with the clipped value:
    mu <- a mu + (1-a) x;  var <- a var + (1-a) (x - mu)^2 (mu already updated, as the reference).
    The logged threshold is the norm above which this step clips: the adaptive target when
    z > z_thresh, else mu + z_thresh * (sigma + 1e-6), exactly where z crosses z_thresh."""

    def __init__(self, params, names, device, warmup_steps: int, alpha: float, z_thresh: float,
                 mode: str, max_grad_norm: Optional[float]):
        super().__init__(params, names, device)
        self.warmup_steps, self.alpha, self.z_thresh, self.mode = int(warmup_steps), float(alpha), float(z_thresh), mode
        self.max_grad_norm = float("inf") if max_grad_norm is None else float(max_grad_norm)
        self.warmup = RingBuffer(max(self.warmup_steps, 1), device)
        self.mean = torch.zeros((), device=device)
        self.var = torch.zeros((), device=device)
        self.steps = 0  # host-side counter: known without a sync

    def apply(self, step):
        norm = step.current_norm()
        finite = torch.isfinite(norm)
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.warmup.push(norm, finite)
            if self.steps == self.warmup_steps:
                mean, std = self.warmup.mean_std()
                self.mean.copy_(mean)
                self.var.copy_(std ** 2)
            threshold = torch.full((), self.max_grad_norm, device=self.device)
        else:
            std = self.var.sqrt()
            z = (norm - self.mean) / (std + EPS)
            if self.mode == "zscore":
                target = self.mean + self.z_thresh ** 2 * std / z.clamp(min=EPS)
            else:
                target = self.mean
            boundary = self.mean + self.z_thresh * (std + EPS)  # z <= z_thresh <=> norm <= boundary
            threshold = torch.where(z > self.z_thresh, target, boundary).clamp(max=self.max_grad_norm)
            clipped = torch.where(norm > threshold, threshold, norm)
            new_mean = self.alpha * self.mean + (1 - self.alpha) * clipped
            new_var = self.alpha * self.var + (1 - self.alpha) * (clipped - new_mean) ** 2
            self.mean.copy_(torch.where(finite, new_mean, self.mean))
            self.var.copy_(torch.where(finite, new_var, self.var))
        clip_to(step.grads, threshold, norm)
        step.clipped_to(threshold, norm)
        step.threshold = threshold

    def state_dict(self):
        return {"warmup": self.warmup.state_dict(), "mean": self.mean.clone(), "var": self.var.clone(), "steps": self.steps}

    def load_state_dict(self, state):
        self.warmup.load_state_dict(state["warmup"])
        self.mean.copy_(state["mean"])
        self.var.copy_(state["var"])
        self.steps = int(state["steps"])


@dataclass
class SpikeSkipConfig(Schema):
    window: int = 128
    threshold: float = 6.0  # z-score above which the update is skipped
    min_history: int = 20

    def check(self) -> None:
        need(self.window >= 2, "window", f"must be >= 2, got {self.window}")
        need(self.threshold > 0, "threshold", f"must be > 0, got {self.threshold}")
        need(2 <= self.min_history <= self.window, "min_history", f"must be in [2, window], got {self.min_history}")


@STABILIZERS.register("spike_skip", SpikeSkipConfig, order=90)
class SpikeSkip(Stabilizer):
    """Skip the update (OLMo-core style) when |x - mean| / std over the last ``window``
    accepted steps exceeds ``threshold`` for the loss or the pre-stabilizer grad norm
    (once ``min_history`` are stored), or when either is non-finite. Skipped values are
    not added to the window. Decided on the device; applied by ``StabilizerStack.step``."""

    def __init__(self, params, names, device, window: int, threshold: float, min_history: int):
        super().__init__(params, names, device)
        self.threshold, self.min_history = float(threshold), int(min_history)
        self.losses = RingBuffer(int(window), device)
        self.norms = RingBuffer(int(window), device)

    def _z(self, buf: RingBuffer, x: torch.Tensor) -> torch.Tensor:
        mean, std = buf.mean_std()
        z = (x - mean).abs() / (std + 1e-12 * mean.abs() + 1e-30)
        return torch.where(buf.count >= self.min_history, z, 0.0)

    def apply(self, step):
        loss, norm = step.loss.detach().float(), step.pre_norm
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        spike = (self._z(self.losses, loss) > self.threshold) | (self._z(self.norms, norm) > self.threshold)
        skip = spike | ~finite
        self.losses.push(loss, ~skip)
        self.norms.push(norm, ~skip)
        step.skip = skip if step.skip is None else (step.skip | skip)

    def state_dict(self):
        return {"losses": self.losses.state_dict(), "norms": self.norms.state_dict()}

    def load_state_dict(self, state):
        self.losses.load_state_dict(state["losses"])
        self.norms.load_state_dict(state["norms"])


def selected_names(cfg_stabilizer) -> List[str]:
    """The options the config selects, in the run order (``none`` selects nothing)."""
    return [e.name for e in STABILIZERS if e.name != "none" and cfg_stabilizer.get(e.name) is not None]


def stabilizer_label(cfg_stabilizer) -> str:
    """What a run's tag and name call its selection: ``warmup+clip``, or ``none``."""
    return "+".join(selected_names(cfg_stabilizer)) or "none"


class StabilizerStack:
    """Runs the selected gradient stabilizers in the registry's order; spike skipping and
    update snapshots are applied around ``optimizer.step``."""

    def __init__(self, cfg_stabilizer, model: nn.Module, device: torch.device):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device = device
        self.stabilizers: List[Stabilizer] = []
        for name in selected_names(cfg_stabilizer):
            entry = STABILIZERS[name]
            if entry.obj is not None:  # warmup is an LR schedule (gradlab.optim)
                stabilizer = entry.obj(self.params, self.names, device, **dict(cfg_stabilizer[name]))
                stabilizer.name = name
                self.stabilizers.append(stabilizer)
        self.skips = any(isinstance(s, SpikeSkip) for s in self.stabilizers)
        self.stepped = False  # optimizer state exists only after the first real step

    # -- gradients
    def process(self, loss: torch.Tensor) -> GradStep:
        grads = [p.grad for p in self.params]
        per_tensor = tensor_norms(grads)  # under FSDP: the shards' norms combined, the same on every rank
        pre = torch.linalg.vector_norm(torch.stack(per_tensor))
        step = GradStep(loss=loss, grads=grads, per_tensor=per_tensor, pre_norm=pre, norm=pre)
        for s in self.stabilizers:
            s.apply(step)
        return step

    # -- the update
    def _state_tensors(self, optimizer) -> List[torch.Tensor]:
        out = []
        for p in self.params:
            out += [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        return out

    def step(self, optimizer, step: GradStep, scaler=None, keep_old_params: bool = False):
        """optimizer.step(), undone bit-for-bit where ``step.skip``; returns the old params
        when ``keep_old_params`` (for update-to-weight ratios), else None."""
        skip = step.skip
        if skip is not None and not self.stepped and bool(skip):
            # Before the first real step the optimizer has no state to restore, so this
            # one decision is read on the host (once per run, not per step).
            return [p.detach().clone() for p in self.params] if keep_old_params else None
        self.stepped = True
        state = self._state_tensors(optimizer) if skip is not None else []
        tracked = self.params + state if skip is not None else (self.params if keep_old_params else [])
        snaps = None
        if tracked:
            snaps = [t.detach().clone() for t in tracked]
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        if skip is not None:
            for t, old in zip(tracked, snaps):
                t.detach().copy_(torch.where(skip, old, t.detach()))
        return snaps[: len(self.params)] if keep_old_params else None

    def state_dict(self) -> dict:
        return {"stepped": self.stepped, **{s.name: s.state_dict() for s in self.stabilizers}}

    def load_state_dict(self, state: dict) -> None:
        self.stepped = bool(state.get("stepped", False))
        for s in self.stabilizers:
            if s.name in state:
                s.load_state_dict(state[s.name])
