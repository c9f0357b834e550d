"""Optimizers and LR schedules (the scheduler group plus the ``warmup`` stabilizer).

Step-wise schedules are torch schedulers used in their chainable form, so the
linear warmup (and a stabilizer's LR factor, e.g. SPAM's warm-up after a moment reset)
multiplies whatever the main schedule does; ReduceLROnPlateau is stepped once per
epoch on the validation loss.

Stabilizers that read an optimizer's state do it through the functions here
(``adam_moments``), so the knowledge of each optimizer's state layout stays in one place.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.optim import lr_scheduler

from .registry import OPTIMIZERS, SCHEDULERS, STABILIZERS, Schema, need


# ---------------------------------------------------------------- optimizers
@dataclass
class OptimizerSchema(Schema):
    name: str = ""
    lr: float = 1e-3
    weight_decay: float = 0.0

    def check(self) -> None:
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")


def _unit(value: float, key: str) -> None:
    need(0 <= value < 1, key, f"must be in [0, 1), got {value}")


@dataclass
class SGDConfig(OptimizerSchema):
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    fused: bool = False  # torch's fused kernel: one per parameter, faster, rounds differently from the default loop

    def check(self) -> None:
        super().check()
        _unit(self.momentum, "momentum")
        need(not self.nesterov or self.momentum > 0, "nesterov", "needs momentum > 0")


@dataclass
class AdamFamily(OptimizerSchema):
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01  # always decoupled

    def check(self) -> None:
        super().check()
        need(len(self.betas) == 2, "betas", f"needs two values, got {list(self.betas)}")
        for i, b in enumerate(self.betas):
            _unit(b, f"betas.{i}")
        need(self.eps > 0, "eps", f"must be > 0, got {self.eps}")


@dataclass
class AdamWConfig(AdamFamily):
    name: str = "adamw"
    fused: bool = False  # torch's fused kernel: one per parameter, faster, rounds differently from the default loop


@dataclass
class AdamConfig(AdamWConfig):
    name: str = "adam"
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False  # AdamW-style decay


@dataclass
class RMSpropConfig(OptimizerSchema):
    name: str = "rmsprop"
    alpha: float = 0.99  # smoothing of the squared-gradient average
    eps: float = 1e-8
    momentum: float = 0.0

    def check(self) -> None:
        super().check()
        _unit(self.alpha, "alpha")
        _unit(self.momentum, "momentum")
        need(self.eps > 0, "eps", f"must be > 0, got {self.eps}")


@OPTIMIZERS.register("sgd", SGDConfig)
def sgd(cfg, params, capturable):
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                           fused=cfg.fused or None)


@OPTIMIZERS.register("adam", AdamConfig)
def adam(cfg, params, capturable):
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                            decoupled_weight_decay=cfg.decoupled_weight_decay, fused=cfg.fused or None, **capturable)


@OPTIMIZERS.register("adamw", AdamWConfig)
def adamw(cfg, params, capturable):
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=cfg.fused or None, **capturable)


@dataclass
class StableAdamWConfig(AdamFamily):
    name: str = "stable_adamw"
    clip_thresh: float = 1.0  # d: a tensor's step is scaled by 1 / max(1, RMS / d)

    def check(self) -> None:
        super().check()
        need(self.clip_thresh > 0, "clip_thresh", f"must be > 0, got {self.clip_thresh}")


class StableAdamW(torch.optim.Optimizer):
    """StableAdamW: AdamW with Adafactor's update clipping per tensor (Wortsman et al. 2023,
    arXiv 2304.13013, Algorithm 2; the authors' reference: StableAdamWUnfused in
    gist.github.com/mitchellnw/d42e22a0b9ec02ceaf4f7b4457f51423). Per tensor, at step t:
        m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  m^ = m / (1-b1^t);  v^ = v / (1-b2^t)
        RMS = sqrt(mean(g^2 / max(v^, eps^2)))
        p <- p (1 - lr wd) - lr / max(1, RMS / d) * m^ / (sqrt(v^) + eps)
    (the reference keeps m^ and v^ by bias-corrected betas, the same numbers). Written here,
    not taken from torch-optimi, because optimi reads RMS back to the host for every tensor
    on every step and keeps its step count in the param group, where a skipped step could not
    restore it. State uses torch Adam's names (exp_avg, exp_avg_sq, step), the step count a
    device tensor: no host sync, and ``spike_skip`` restores all of it."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 clip_thresh: float = 1.0):
        # capturable: load_state_dict keeps ``step`` on the parameter's device (torch's rule)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      clip_thresh=clip_thresh, capturable=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        (b1, b2), eps, lr, g = group["betas"], group["eps"], group["lr"], p.grad
        step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        step.add_(1)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        v_hat = v / (1 - b2 ** step)
        rms = (g.square() / v_hat.clamp(min=eps * eps)).mean().sqrt()
        step_size = lr / (rms / group["clip_thresh"]).clamp(min=1.0)
        p.mul_(1 - lr * group["weight_decay"])
        p.sub_(step_size * (m / (1 - b1 ** step)) / (v_hat.sqrt() + eps))


@OPTIMIZERS.register("stable_adamw", StableAdamWConfig)
def stable_adamw(cfg, params, capturable):
    return StableAdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       clip_thresh=cfg.clip_thresh)


@OPTIMIZERS.register("rmsprop", RMSpropConfig)
def rmsprop(cfg, params, capturable):
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, **capturable)


def build_optimizer(cfg_opt, params, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
    # capturable keeps Adam/RMSprop's step counter on the device, so skipped steps restore it without a sync
    cap = {"capturable": True} if capturable and device.type == "cuda" and cfg_opt.name != "sgd" else {}
    return OPTIMIZERS[cfg_opt.name].obj(cfg_opt, params, cap)


MOMENT_OPTIMIZERS = ("adam", "adamw", "stable_adamw")  # keep Adam's m and v per parameter


def adam_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Adam's first and second moment (m, v: torch's ``exp_avg`` / ``exp_avg_sq``, un-bias-corrected)
    of ``param`` in one of MOMENT_OPTIMIZERS, or None before its first update."""
    state = optimizer.state.get(param)
    if not state or "exp_avg_sq" not in state:
        return None
    return state["exp_avg"], state["exp_avg_sq"]


# ---------------------------------------------------------------- schedules
@dataclass
class NoSchedule(Schema):
    name: str = "none"


@dataclass
class StepConfig(Schema):
    name: str = "step"
    step_size: int = 1  # epochs between decays
    gamma: float = 0.5  # decay factor

    def check(self) -> None:
        need(self.step_size >= 1, "step_size", f"must be >= 1, got {self.step_size}")
        need(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")


@dataclass
class CosineConfig(Schema):
    name: str = "cosine"
    eta_min: float = 0.0  # the floor

    def check(self) -> None:
        need(self.eta_min >= 0, "eta_min", f"must be >= 0, got {self.eta_min}")


@dataclass
class OneCycleConfig(Schema):
    name: str = "onecycle"
    pct_start: float = 0.3  # fraction of the steps rising
    div_factor: float = 25.0  # initial lr = lr / div_factor

    def check(self) -> None:
        need(0 < self.pct_start < 1, "pct_start", f"must be in (0, 1), got {self.pct_start}")
        need(self.div_factor > 0, "div_factor", f"must be > 0, got {self.div_factor}")


@dataclass
class PlateauConfig(Schema):
    name: str = "plateau"
    factor: float = 0.1  # lr multiplier on a plateau of the validation loss
    patience: int = 1  # epochs without improvement

    def check(self) -> None:
        need(0 < self.factor < 1, "factor", f"must be in (0, 1), got {self.factor}")
        need(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")


SCHEDULERS.add("none", NoSchedule)


@SCHEDULERS.register("step", StepConfig)
def step_lr(optimizer, cfg, total_steps: int, steps_per_epoch: int):
    return lr_scheduler.StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)


@SCHEDULERS.register("cosine", CosineConfig)
def cosine(optimizer, cfg, total_steps: int, steps_per_epoch: int):
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=cfg.eta_min)


@SCHEDULERS.register("onecycle", OneCycleConfig)
def onecycle(optimizer, cfg, total_steps: int, steps_per_epoch: int):
    return lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"], total_steps=total_steps + 1,
                                   pct_start=cfg.pct_start, div_factor=cfg.div_factor)


@SCHEDULERS.register("plateau", PlateauConfig)
def plateau(optimizer, cfg, total_steps: int, steps_per_epoch: int):
    return lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.factor, patience=cfg.patience)


# ---------------------------------------------------------------- warmup (selected in the stabilizer group)
@dataclass
class WarmupConfig(Schema):
    steps: int = 500  # linear ramp (t+1)/steps, multiplying the scheduler

    def check(self) -> None:
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")


STABILIZERS.add("warmup", WarmupConfig, order=10)


def ratio(f: Callable[[int], float]) -> Callable[[int], float]:
    """MultiplicativeLR's per-step multiplier that makes the LR at step t carry f(t) exactly."""
    return lambda t: f(t) / f(t - 1)


class _ShadowOptimizer:
    """What a torch scheduler reads and writes of its optimizer (Schedule.ahead): the param groups, and a
    ``step`` marked as the schedulers' wrapper marks it, so they take it for a stepped optimizer."""

    def __init__(self, group: dict):
        self.param_groups, self._opt_called = [group], True

    def step(self) -> None:
        pass

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


class Schedule:
    """The run's LR schedule: per-step schedulers plus an optional per-epoch plateau."""

    def __init__(self, optimizer, cfg_sched, warmup_steps: Optional[int], total_steps: int, steps_per_epoch: int,
                 factors: Sequence[Callable[[int], float]] = ()):
        self.optimizer, self.total_steps = optimizer, total_steps
        self.per_step: List[lr_scheduler.LRScheduler] = []
        self.plateau: Optional[lr_scheduler.ReduceLROnPlateau] = None
        if warmup_steps:
            # factor (t+1)/N for t < N, then 1
            self.per_step.append(lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup_steps,
                                                       end_factor=1.0, total_iters=max(warmup_steps - 1, 1)))
        for f in factors:  # lr_t = (the rest of the schedule) * f(t), with f(0) = 1
            self.per_step.append(lr_scheduler.MultiplicativeLR(optimizer, lr_lambda=ratio(f)))
        build = SCHEDULERS[cfg_sched.name].obj
        scheduler = build(optimizer, cfg_sched, total_steps, steps_per_epoch) if build else None
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            self.plateau = scheduler
        elif scheduler is not None:
            self.per_step.append(scheduler)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> None:
        for s in self.per_step:
            s.step()

    def ahead(self, steps: int) -> List[float]:
        """The learning rates of this step and the next ``steps`` ones, up to the run's last step, as the
        per-step schedule will set them (warmup, the scheduler, every LR factor: all known in advance):
        shallow copies of the schedulers stepped on a copy of the first param group, so the real ones
        are untouched. Host work, none when nothing is scheduled per step. A plateau's cut depends on
        validation losses to come and only lowers the LR: not foreseen."""
        if not self.per_step:
            return [self.lr] * (steps + 1)
        steps = max(0, min(steps, self.total_steps - 1 - self.per_step[0].last_epoch))  # last_epoch: this step
        group = {k: copy.deepcopy(v) for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        shadow = _ShadowOptimizer(group)
        schedulers = [copy.copy(s) for s in self.per_step]
        for s in schedulers:
            s.optimizer = shadow
        lrs = [self.lr]
        for _ in range(steps):
            for s in schedulers:
                s.step()
            lrs.append(float(group["lr"]))
        return lrs

    def epoch_end(self, val_loss: float) -> None:
        if self.plateau is not None:
            self.plateau.step(val_loss)

    def state_dict(self) -> dict:
        return {"per_step": [s.state_dict() for s in self.per_step],
                "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.per_step, state["per_step"]):
            s.load_state_dict(st)
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
