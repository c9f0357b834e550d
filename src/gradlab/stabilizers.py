"""Gradient-side remedies, applied between backward() and optimizer.step().

Everything here stays on the device: thresholds, histories and skip decisions
are tensors, so a stabilizer never forces a host sync. The formulas follow
``shared/reference/stabilizers.md`` and each remedy's reference code; each class
names its source and where gradlab deliberately differs.

Non-finite gradients: the norm-based clippers (clip, autoclip, zclip, adagc) scale
by a coefficient, and an infinite norm gives 0 x inf = NaN, so they never turn a
non-finite gradient into a finite one. The element-wise ones (clip_value, spam)
bound an infinite element to a finite value, as torch's ``clip_grad_value_`` does.
A run is diverged when a non-finite loss or a non-finite update reaches the weights
(``gradlab.telemetry.DivergenceWatch``), unless ``spike_skip`` or fp16's GradScaler
skipped that step.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import clip_grad_value_, clip_grads_with_norm_, get_total_norm

from .optim import adam_moments
from .distributed import plain, tensor_norms
from .registry import STABILIZERS, Schema, choice, infinite_ok, need

EPS = 1e-6  # the denominator guard torch's clip_grad_norm_ (and ZClip's, AdaGC's references) use


def total_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together, fused (one multi-tensor kernel); global under FSDP."""
    return torch.linalg.vector_norm(torch.stack(tensor_norms(grads)))


def norm_clip_coef(threshold, norm: torch.Tensor) -> torch.Tensor:
    """clip_grads_with_norm_'s coefficient min(1, threshold / (norm + 1e-6)), for a threshold
    that is a device tensor (torch's function calls float(max_norm), a host read per step)."""
    return (threshold / (norm + EPS)).clamp(max=1.0)


def above_clip_coef(threshold: torch.Tensor, norm: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """threshold / (norm + eps) where norm > threshold, else exactly 1: how the ZClip and AdaGC
    references clip (they leave a norm at or below the threshold untouched)."""
    return torch.where(norm > threshold, threshold / (norm + eps), 1.0)


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

    def mean_std(self, unbiased: bool = False):
        """Mean and standard deviation of the stored values (divisor n, or n - 1 when ``unbiased``)."""
        mask = self._arange < self.count
        n = self.count.clamp(min=1).float()
        mean = torch.where(mask, self.values, 0.0).sum() / n
        dof = (self.count - 1).clamp(min=1).float() if unbiased else n
        var = torch.where(mask, (self.values - mean) ** 2, 0.0).sum() / dof
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
    norm_vec: Optional[torch.Tensor] = None  # per_tensor stacked (what pre_norm reduces; telemetry reuses it)
    norm: Optional[torch.Tensor] = None  # current L2 norm; None once a transform made it stale
    threshold: Optional[torch.Tensor] = None  # the last adaptive threshold set (run order)
    skip: Optional[torch.Tensor] = None  # a stabilizer's decision to skip the update
    modified: bool = False
    skipped: Optional[torch.Tensor] = None  # after the update: whether it was skipped (None: nothing could skip it)
    applied_norm: Optional[torch.Tensor] = None  # after the update: the L2 norm applied (0 if skipped)
    fault: Optional[torch.Tensor] = None  # 1 when an injected fault acted on this step (gradlab.faults)

    def current_norm(self) -> torch.Tensor:
        if self.norm is None:
            self.norm = total_norm(self.grads)
        return self.norm

    def tensor_norms(self) -> torch.Tensor:
        """Per-parameter L2 norms of the gradients as they are now, as one vector."""
        return torch.stack(self.per_tensor if not self.modified else torch._foreach_norm(self.grads))

    def changed(self) -> None:
        """Gradients changed non-uniformly: the cached norm is stale."""
        self.norm, self.modified = None, True

    def scaled(self, coef: torch.Tensor) -> None:
        """All gradients were multiplied by ``coef``: a cached L2 norm scales by the same factor,
        so it is updated without another pass. A stale one stays stale (recomputing it here
        would read the already-scaled gradients and apply the coefficient twice)."""
        if self.norm is not None:
            self.norm = self.norm * coef
        self.modified = True

    def finish(self, skipped: Optional[torch.Tensor]) -> None:
        """Record the outcome of the update (telemetry reads it through STEP_METRICS); ``skipped``
        None: nothing could skip this step."""
        self.skipped = skipped
        self.applied_norm = self.current_norm() if skipped is None else torch.where(skipped, 0.0, self.current_norm())

    @property
    def clip_coef(self) -> torch.Tensor:
        """What the clippers did: the L2 norm after the gradient stabilizers / the raw norm, 1 when
        none touched the gradients. Whether the update was then skipped is ``skipped``, not this."""
        if not self.modified:
            return constant(1.0, self.pre_norm.device)
        return torch.where(self.pre_norm > 0, self.current_norm() / self.pre_norm, 1.0)

    def or_nan(self, value: Optional[torch.Tensor]) -> torch.Tensor:
        """An optional per-step scalar for telemetry: NaN (not logged) when it was not set."""
        return constant(math.nan, self.pre_norm.device) if value is None else value

    def flag(self, value: Optional[torch.Tensor]) -> torch.Tensor:
        """A per-step device flag for telemetry, 0 when it was not set."""
        return constant(0.0, self.pre_norm.device) if value is None else value


@functools.lru_cache(maxsize=None)
def constant(value: float, device: torch.device) -> torch.Tensor:
    """A shared read-only device scalar (telemetry reads it instead of allocating one per step)."""
    return torch.full((), value, device=device)


class Stabilizer:
    """Base: a stateful transform of the gradients; state is saved with the checkpoint.
    A subclass registers with its schema and its place in the run order:
    ``@STABILIZERS.register(name, Config, order=...)``; its ``name`` is set from there.
    One that reads the optimizer's state sets ``needs_optimizer``: the stack then hands it
    the optimizer (``bind``) once the optimizer exists."""

    name = "base"
    needs_optimizer = False
    bounds_update = False  # whether every update's size is bounded from the first step (gradlab.preflight)

    def __init__(self, params: List[nn.Parameter], names: List[str], device: torch.device):
        self.params, self.names, self.device = params, names, device

    def apply(self, step: GradStep) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def lr_factor(self) -> Optional[Callable[[int], float]]:
        """A factor f(step) the LR schedule multiplies by (gradlab.optim.Schedule), or None."""
        return None

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

    bounds_update = True

    def __init__(self, params, names, device, max_norm: float, norm_type: float):
        super().__init__(params, names, device)
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def apply(self, step):
        norm = step.current_norm() if self.norm_type == 2.0 else \
            plain(get_total_norm(step.grads, self.norm_type, foreach=True))  # FSDP: torch reduces the shards
        clip_grads_with_norm_(self.params, self.max_norm, norm, foreach=True)
        step.scaled(norm_clip_coef(self.max_norm, norm))


@dataclass
class ClipValueConfig(Schema):
    clip_value: float = 1.0

    def check(self) -> None:
        need(self.clip_value > 0, "clip_value", f"must be > 0, got {self.clip_value}")


@STABILIZERS.register("clip_value", ClipValueConfig, order=20)
class ClipValue(Stabilizer):
    """Element-wise clamp to [-c, c] (changes the direction; Mikolov's RNNs used 15). An inf
    element becomes +-c, as with torch's clip_grad_value_: the update applied is finite."""

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
    exclude: List[str] = field(default_factory=lambda: ["auto"])  # module paths; "auto" = the final classifier

    def check(self) -> None:
        need(self.clipping > 0, "clipping", f"must be > 0, got {self.clipping}")
        need(self.eps > 0, "eps", f"must be > 0, got {self.eps}")


def under(name: str, path: str) -> bool:
    """Whether parameter ``name`` lies in module ``path``: ``blocks.1`` holds ``blocks.1.weight``,
    not ``blocks.10.weight`` (a trailing ``.`` on the path is ignored)."""
    path = path.rstrip(".")
    return name == path or name.startswith(path + ".")


@STABILIZERS.register("agc", AGCConfig, order=30)
class AGC(Stabilizer):
    """Adaptive gradient clipping (Brock et al. 2021): per output unit,
    G_i <- G_i * max_i / max(||G_i||, 1e-6) when ||G_i|| > max_i = clipping * max(||W_i||, eps).
    ``exclude`` names modules (``head``, ``blocks.1``), matched at a ``.`` boundary."""

    bounds_update = True  # relative to each unit's weights (the excluded head is not bounded)

    def __init__(self, params, names, device, clipping: float, eps: float, exclude: List[str]):
        super().__init__(params, names, device)
        paths = [("head" if e == "auto" else e) for e in exclude]
        self.clipping, self.eps = float(clipping), float(eps)
        self.targets = [p for p, n in zip(params, names) if not any(under(n, x) for x in paths)]

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
class AdaGCConfig(Schema):
    warmup_steps: int = 100  # global-norm clipping at max_norm (the reference's start_clip_steps)
    max_norm: float = 1.0  # lambda_abs, during the warm-up
    clip_ratio: float = 1.04  # lambda_rel
    beta: float = 0.99  # EMA of each tensor's clipped norms
    eps: float = 1e-6

    def check(self) -> None:
        need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(self.max_norm > 0, "max_norm", f"must be > 0, got {self.max_norm}")
        need(self.clip_ratio > 0, "clip_ratio", f"must be > 0, got {self.clip_ratio}")
        need(0 <= self.beta < 1, "beta", f"must be in [0, 1), got {self.beta}")
        need(self.eps > 0, "eps", f"must be > 0, got {self.eps}")


@STABILIZERS.register("adagc", AdaGCConfig, order=35)
class AdaGC(Stabilizer):
    """AdaGC (Wang et al. 2025, arXiv 2502.11034; reference: lishuai-97/AdaGC, class AdaGC).
    Warm-up (the first ``warmup_steps`` steps): global-norm clipping,
    g <- g * min(1, max_norm / (||g|| + eps)), and per tensor gamma_i = min over the warm-up of
    the clipped ||g_i||. After it, per tensor: if ||g_i|| > clip_ratio * gamma_i then
    g_i <- g_i * clip_ratio * gamma_i / (||g_i|| + eps), and
    gamma_i <- beta * gamma_i + (1 - beta) * min(||g_i||, clip_ratio * gamma_i).
    A non-finite norm never enters gamma (the reference would store it)."""

    bounds_update = True  # the warm-up clips the global norm at max_norm from the first step

    def __init__(self, params, names, device, warmup_steps: int, max_norm: float, clip_ratio: float,
                 beta: float, eps: float):
        super().__init__(params, names, device)
        self.warmup_steps, self.max_norm = int(warmup_steps), float(max_norm)
        self.clip_ratio, self.beta, self.eps = float(clip_ratio), float(beta), float(eps)
        self.gamma = torch.full((len(params),), float("inf"), device=device)  # inf: not seeded yet
        self.steps = 0  # host-side counter: known without a sync

    def apply(self, step):
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self._global_clip(step)
        else:
            self._tensor_clip(step)

    def _global_clip(self, step):
        norms = step.tensor_norms()
        coef = (self.max_norm / (step.current_norm() + self.eps)).clamp(max=1.0)
        torch._foreach_mul_(step.grads, coef)
        step.scaled(coef)
        clipped = norms * coef
        self.gamma.copy_(torch.where(torch.isfinite(clipped), torch.minimum(self.gamma, clipped), self.gamma))
        step.threshold = torch.full((), self.max_norm, device=norms.device)

    def _tensor_clip(self, step):
        norms = step.tensor_norms()
        gamma = torch.where(torch.isinf(self.gamma), norms, self.gamma)  # never seeded: start from this norm
        limit = self.clip_ratio * gamma
        coef = above_clip_coef(limit, norms, self.eps)
        torch._foreach_mul_(step.grads, list(coef.unbind(0)))
        step.changed()
        new = self.beta * gamma + (1 - self.beta) * torch.minimum(norms, limit)
        self.gamma.copy_(torch.where(torch.isfinite(norms), new, gamma))

    def state_dict(self):
        return {"gamma": self.gamma.clone(), "steps": self.steps}

    def load_state_dict(self, state):
        self.gamma.copy_(state["gamma"])
        self.steps = int(state["steps"])


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
        coef = norm_clip_coef(threshold, norm)
        torch._foreach_mul_(step.grads, coef)
        step.scaled(coef)
        step.threshold = threshold

    def state_dict(self):
        return self.history.state_dict()

    def load_state_dict(self, state):
        self.history.load_state_dict(state)


@dataclass
class ZClipConfig(Schema):
    warmup_steps: int = 25  # finite norms collected before the EMA starts
    alpha: float = 0.97
    z_thresh: float = 2.5
    mode: str = choice("zscore", "percentile")  # z-score test, or a fixed mu + z_thresh * sigma
    clip_option: str = choice("adaptive_scaling", "mean")  # zscore mode: clip to mu + z_thresh^2 sigma / z, or mu
    clip_factor: float = 1.0  # multiplies the adaptive_scaling threshold
    skip_update_on_spike: bool = False  # a clipped spike does not enter the EMA
    max_grad_norm: Optional[float] = None  # hard cap, also during the warm-up (the reference's default: 1.0)
    eps: float = 1e-6  # z = (g - mu) / (sigma + eps)

    def check(self) -> None:
        need(self.warmup_steps >= 1, "warmup_steps", f"must be >= 1, got {self.warmup_steps}")
        need(0 < self.alpha < 1, "alpha", f"must be in (0, 1), got {self.alpha}")
        need(self.z_thresh > 0, "z_thresh", f"must be > 0, got {self.z_thresh}")
        need(self.clip_factor > 0, "clip_factor", f"must be > 0, got {self.clip_factor}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
             f"must be > 0 (or null), got {self.max_grad_norm}")
        need(self.eps > 0, "eps", f"must be > 0, got {self.eps}")


@STABILIZERS.register("zclip", ZClipConfig, order=60)
class ZClip(Stabilizer):
    """ZClip (Kumar et al. 2025; reference: bluorion-com/ZClip, zclip/zclip.py). Warm-up: collect
    ``warmup_steps`` finite norms (clip only at ``max_grad_norm``, as clip_grad_norm_ does), then
    their mean and population variance seed the EMA. After it, with sigma = sqrt(var):
    mode zscore: z = (g - mu) / (sigma + eps); a spike is z > z_thresh, clipped to
    clip_factor * (mu + z_thresh^2 sigma / z) (adaptive_scaling) or to mu (clip_option mean);
    mode percentile: a spike is g > mu + z_thresh * sigma, clipped to that.
    The threshold is capped at ``max_grad_norm``; g is scaled by threshold / (g + 1e-6) only
    when g > threshold. EMA, as the reference: x = the uncapped spike threshold on a spike
    (no update with ``skip_update_on_spike``), else the raw g;
    mu <- a mu + (1-a) x;  var <- a var + (1-a) (x - mu)^2 (mu already updated).
    Differs from the reference where it breaks: a non-finite norm neither counts in the
    warm-up nor enters the EMA. The logged threshold is where this step's clipping begins:
    the spike threshold, else the boundary mu + z_thresh (sigma + eps) (zscore mode)."""

    def __init__(self, params, names, device, warmup_steps: int, alpha: float, z_thresh: float, mode: str,
                 clip_option: str, clip_factor: float, skip_update_on_spike: bool, max_grad_norm: Optional[float],
                 eps: float):
        super().__init__(params, names, device)
        self.warmup_steps, self.alpha, self.z_thresh = int(warmup_steps), float(alpha), float(z_thresh)
        self.mode, self.clip_option, self.clip_factor = mode, clip_option, float(clip_factor)
        self.skip_update_on_spike, self.eps = bool(skip_update_on_spike), float(eps)
        self.cap = math.inf if max_grad_norm is None else float(max_grad_norm)
        self.warmup = RingBuffer(self.warmup_steps, device)  # the warm-up's finite norms
        self.bounds_update = max_grad_norm is not None  # the hard cap applies from the first step
        self.mean = torch.zeros((), device=device)
        self.var = torch.zeros((), device=device)

    def _spike(self, norm: torch.Tensor):
        """(is this norm a spike, the threshold it is clipped to, the boundary logged otherwise)."""
        std = self.var.sqrt()
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            return norm > threshold, threshold, threshold
        z = (norm - self.mean) / (std + self.eps)
        if self.clip_option == "mean":
            target = self.mean
        else:
            target = self.clip_factor * (self.mean + self.z_thresh ** 2 * std / z.clamp(min=EPS))
        return z > self.z_thresh, target, self.mean + self.z_thresh * (std + self.eps)

    def _update_ema(self, norm: torch.Tensor, spike: torch.Tensor, target: torch.Tensor, active: torch.Tensor):
        x = torch.where(spike, target, norm)
        mean = self.alpha * self.mean + (1 - self.alpha) * x
        var = self.alpha * self.var + (1 - self.alpha) * (x - mean) ** 2
        if self.skip_update_on_spike:
            active = active & ~spike
        self.mean.copy_(torch.where(active, mean, self.mean))
        self.var.copy_(torch.where(active, var, self.var))

    def apply(self, step):
        norm = step.current_norm()
        finite = torch.isfinite(norm)
        warming = self.warmup.count < self.warmup_steps  # before this step
        spike, target, boundary = self._spike(norm)
        self._update_ema(norm, spike, target, ~warming & finite)
        self.warmup.push(norm, warming & finite)
        seeded = warming & (self.warmup.count >= self.warmup_steps)
        mean, std = self.warmup.mean_std()
        self.mean.copy_(torch.where(seeded, mean, self.mean))
        self.var.copy_(torch.where(seeded, std ** 2, self.var))
        threshold = torch.where(warming, self.cap, torch.where(spike, target, boundary).clamp(max=self.cap))
        warm_coef = norm_clip_coef(self.cap, norm) if math.isfinite(self.cap) else torch.ones_like(norm)
        coef = torch.where(warming, warm_coef, above_clip_coef(threshold, norm))
        torch._foreach_mul_(step.grads, coef)
        step.scaled(coef)
        step.threshold = threshold

    def state_dict(self):
        return {"warmup": self.warmup.state_dict(), "mean": self.mean.clone(), "var": self.var.clone()}

    def load_state_dict(self, state):
        self.warmup.load_state_dict(state["warmup"])
        self.mean.copy_(state["mean"])
        self.var.copy_(state["var"])


@dataclass
class SpamConfig(Schema):
    threshold: float = 5000.0  # theta: g^2 > theta * v is a spike
    reset_interval: Optional[int] = 500  # Delta T: Adam's moments are zeroed every this many steps (null: never)
    warmup_steps: int = 150  # cosine LR warm-up after each reset (0: none)
    clip_delay: int = 20  # no clipping in the first steps, and after each reset: v is still ~0

    def check(self) -> None:
        need(self.threshold > 0, "threshold", f"must be > 0, got {self.threshold}")
        need(self.reset_interval is None or self.reset_interval >= 2, "reset_interval",
             f"must be >= 2 (or null for no reset), got {self.reset_interval}")
        need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(self.clip_delay >= 1, "clip_delay", f"must be >= 1, got {self.clip_delay}")


@STABILIZERS.register("spam", SpamConfig, order=70)
class Spam(Stabilizer):
    """SPAM (Huang et al., ICLR 2025, arXiv 2501.06842; reference: TianjinYellow/SPAM-Optimizer,
    galore_torch/SPAM.py) on torch's Adam/AdamW/stable_adamw, whose second moment v (before this
    step's update) it reads through the optimizer (``gradlab.optim.adam_moments``). At step s
    (1-based): if s % reset_interval == 0, m and v are zeroed (Adam's step count is kept, as in
    the reference); if s >= clip_delay and s % reset_interval >= clip_delay, every element with
    g^2 > threshold * v becomes sign(g) * sqrt(threshold * v). After each reset the LR is
    multiplied by 1 - 0.99 (1 + cos(pi j / (warmup_steps + 1))) / 2 for the j-th step since it
    (j = 0 .. warmup_steps - 1), the reference's cosine warm-up. Differences: the warm-up scales
    the LR, so it also scales weight decay (none by default); torch's Adam puts eps after the
    bias correction, the reference's AdamW before it."""

    needs_optimizer = True

    def __init__(self, params, names, device, threshold: float, reset_interval: Optional[int],
                 warmup_steps: int, clip_delay: int):
        super().__init__(params, names, device)
        self.threshold, self.reset_interval = float(threshold), reset_interval
        self.warmup_steps, self.clip_delay = int(warmup_steps), int(clip_delay)
        self.steps = 0  # host-side counter: known without a sync

    def _since_reset(self, s: int) -> int:
        """Steps since the last reset at or before step s (s itself if none has happened yet)."""
        return s if self.reset_interval is None else s % self.reset_interval

    def apply(self, step):
        self.steps += 1
        s = self.steps
        moments = [adam_moments(self.optimizer, p) for p in self.params]
        if self.reset_interval is not None and s % self.reset_interval == 0:
            torch._foreach_zero_([t for mv in moments if mv is not None for t in mv])
        elif s >= self.clip_delay and self._since_reset(s) >= self.clip_delay:
            for p, mv in zip(self.params, moments):
                if mv is not None:
                    tv = self.threshold * mv[1]
                    p.grad.copy_(torch.where(p.grad.square() > tv, p.grad.sign() * tv.sqrt(), p.grad))
            step.changed()

    def factor(self, t: int) -> float:
        """The LR factor at 0-based step t (step s = t + 1)."""
        s = t + 1
        if self.reset_interval is None or s < self.reset_interval:
            return 1.0
        j = s % self.reset_interval
        if j >= self.warmup_steps:
            return 1.0
        return 1.0 - 0.99 * (1 + math.cos(math.pi * j / (self.warmup_steps + 1))) / 2

    def lr_factor(self):
        return self.factor if self.reset_interval is not None and self.warmup_steps > 0 else None

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


@dataclass
class SpikeSkipConfig(Schema):
    window: int = 128
    threshold: float = 6.0  # sigmas above the window mean at which the update is skipped
    sided: str = choice("one", "two")  # one: only a rise skips (OLMo-core); two: a drop skips too
    std: str = choice("unbiased", "population")  # OLMo-core's torch.std_mean is unbiased
    min_history: Optional[int] = None  # past values before any test; null: max(2, window // 2 - 1), as OLMo-core

    def check(self) -> None:
        need(self.window >= 2, "window", f"must be >= 2, got {self.window}")
        need(self.threshold > 0, "threshold", f"must be > 0, got {self.threshold}")
        need(self.min_history is None or 2 <= self.min_history <= self.window, "min_history",
             f"must be in [2, window] (or null), got {self.min_history}")


@STABILIZERS.register("spike_skip", SpikeSkipConfig, order=90)
class SpikeSkip(Stabilizer):
    """Skip the update (OLMo-core's SkipStepOptimizer: olmo_core/optim/skip_step_optimizer.py)
    when the loss or the pre-stabilizer grad norm is more than ``threshold`` standard deviations
    above the mean of the last ``window`` accepted steps (``sided=two``: away from it, either
    way), once ``min_history`` are stored; or when either is non-finite. The default is
    OLMo-core's: one-sided, unbiased std, tests from the step whose window (the current value
    included) holds window // 2 values. Differs from OLMo-core: a skipped or non-finite value
    does not enter the window (OLMo-core appends every value, so one NaN would skip the next
    ``window`` steps). The logged threshold is the norm boundary mean + threshold * std once
    the window is long enough (before: an earlier stabilizer's threshold, if any).
    Decided on the device; applied by ``StabilizerStack.step``."""

    def __init__(self, params, names, device, window: int, threshold: float, sided: str, std: str,
                 min_history: Optional[int]):
        super().__init__(params, names, device)
        self.threshold, self.two_sided, self.unbiased = float(threshold), sided == "two", std == "unbiased"
        self.min_history = int(min_history) if min_history is not None else max(2, int(window) // 2 - 1)
        self.losses = RingBuffer(int(window), device)
        self.norms = RingBuffer(int(window), device)

    def _test(self, buf: RingBuffer, x: torch.Tensor):
        """(whether x is a spike against the window, whether the window is long enough, the upper boundary)."""
        mean, std = buf.mean_std(self.unbiased)
        deviation = (x - mean).abs() if self.two_sided else x - mean
        ready = buf.count >= self.min_history
        return ready & (deviation > self.threshold * std), ready, mean + self.threshold * std

    def apply(self, step):
        loss, norm = step.loss.detach().float(), step.pre_norm
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        loss_spike, _, _ = self._test(self.losses, loss)
        norm_spike, ready, boundary = self._test(self.norms, norm)
        skip = loss_spike | norm_spike | ~finite
        self.losses.push(loss, ~skip)
        self.norms.push(norm, ~skip)
        step.skip = skip if step.skip is None else (step.skip | skip)
        earlier = step.threshold if step.threshold is not None else math.nan
        step.threshold = torch.where(ready, boundary, earlier)

    def state_dict(self):
        return {"losses": self.losses.state_dict(), "norms": self.norms.state_dict()}

    def load_state_dict(self, state):
        self.losses.load_state_dict(state["losses"])
        self.norms.load_state_dict(state["norms"])


@dataclass
class UpdateSnapshot:
    """A copy of what an update changes, taken just before it (``StabilizerStack.before_update``)."""

    skip: Optional[torch.Tensor]
    run_step: bool  # False: the update is skipped on the host (take no optimizer step, or it is undone)
    tracked: List[torch.Tensor]  # params (and optimizer state) that a skip restores
    old: Optional[List[torch.Tensor]]  # their values before the update
    keep_old_params: bool
    optimizer: object = None  # host-skip only: whose state to put back
    saved_state: Dict = field(default_factory=dict)


def selected_names(cfg_stabilizer) -> List[str]:
    """The options the config selects, in the run order (``none`` selects nothing)."""
    return [e.name for e in STABILIZERS if e.name != "none" and cfg_stabilizer.get(e.name) is not None]


def stabilizer_label(cfg_stabilizer) -> str:
    """What a run's tag and name call its selection: ``warmup+clip``, or ``none``."""
    return "+".join(selected_names(cfg_stabilizer)) or "none"


class StabilizerStack:
    """Runs the selected gradient stabilizers in the registry's order; spike skipping and
    update snapshots are applied around ``optimizer.step``."""

    def __init__(self, cfg_stabilizer, model: nn.Module, device: torch.device, named=None):
        """``named``: the (name, parameter) pairs to treat, default every trainable parameter of ``model``."""
        named = named if named is not None else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Hand the optimizer to the stabilizers that read its state (SPAM reads Adam's v)."""
        for s in self.stabilizers:
            if s.needs_optimizer:
                s.bind(optimizer)

    def lr_factors(self) -> List[Callable[[int], float]]:
        """Factors f(step) the LR schedule multiplies by (SPAM's warm-up after a moment reset)."""
        return [f for f in (s.lr_factor() for s in self.stabilizers) if f is not None]

    # -- gradients
    def process(self, loss: torch.Tensor) -> GradStep:
        grads = [p.grad for p in self.params]
        per_tensor = tensor_norms(grads)  # under FSDP: the shards' norms combined, the same on every rank
        vec = torch.stack(per_tensor)
        pre = torch.linalg.vector_norm(vec)
        step = GradStep(loss=loss, grads=grads, per_tensor=per_tensor, pre_norm=pre, norm=pre, norm_vec=vec)
        for s in self.stabilizers:
            s.apply(step)
        return step

    # -- the update
    def _state_tensors(self, optimizer) -> List[torch.Tensor]:
        out = []
        for p in self.params:
            out += [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        return out

    def before_update(self, optimizer, step: GradStep, keep_old_params: bool = False) -> "UpdateSnapshot":
        """What ``after_update`` needs to undo the coming update where ``step.skip`` (and the old
        params when ``keep_old_params``, for update-to-weight ratios). Device copies only, except
        before the optimizer's first real step: it has no state yet that a device-side select
        could restore, so that one decision is read on the host (once per run, not per step)."""
        skip = step.skip
        if skip is not None and not self.stepped and bool(skip):
            saved = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in optimizer.state[p].items()}
                     for p in self.params if p in optimizer.state}
            return UpdateSnapshot(skip, False, list(self.params), [p.detach().clone() for p in self.params],
                                  keep_old_params, optimizer, saved)
        self.stepped = True
        state = self._state_tensors(optimizer) if skip is not None else []
        tracked = self.params + state if skip is not None else (self.params if keep_old_params else [])
        snaps = [t.detach().clone() for t in tracked] if tracked else None
        return UpdateSnapshot(skip, True, tracked, snaps, keep_old_params)

    def after_update(self, snap: "UpdateSnapshot") -> Optional[List[torch.Tensor]]:
        """Undo the update where it was to be skipped; returns the old params when kept, else None."""
        if not snap.run_step:  # skipped on the host: undo whatever a framework's loop did anyway
            for t, old in zip(snap.tracked, snap.old):
                t.detach().copy_(old)
            for p in self.params:
                if p in snap.saved_state:
                    snap.optimizer.state[p] = snap.saved_state[p]
                else:
                    snap.optimizer.state.pop(p, None)
        elif snap.skip is not None:
            for t, old in zip(snap.tracked, snap.old):
                t.detach().copy_(torch.where(snap.skip, old, t.detach()))
        return snap.old[: len(self.params)] if snap.keep_old_params else None

    def step(self, optimizer, step: GradStep, scaler=None, keep_old_params: bool = False):
        """optimizer.step() (through ``scaler`` when given), undone bit-for-bit where ``step.skip``;
        returns the old params when ``keep_old_params``, else None."""
        snap = self.before_update(optimizer, step, keep_old_params)
        if snap.run_step and scaler is not None:
            scaler.step(optimizer)
        elif snap.run_step:
            optimizer.step()
        return self.after_update(snap)

    def state_dict(self) -> dict:
        return {"stepped": self.stepped, **{s.name: s.state_dict() for s in self.stabilizers}}

    def load_state_dict(self, state: dict) -> None:
        self.stepped = bool(state.get("stepped", False))
        for s in self.stabilizers:
            if s.name in state:
                s.load_state_dict(state[s.name])
