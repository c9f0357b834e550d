"""Optimizers and LR schedules (the scheduler group plus the ``warmup`` stabilizer).

Step-wise schedules are torch schedulers used in their chainable form, so the
linear warmup multiplies whatever the main schedule does; ReduceLROnPlateau is
stepped once per epoch on the validation loss.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.optim import lr_scheduler

from .config import ConfigError


def build_optimizer(cfg_opt, params, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
    name, wd = cfg_opt.name, cfg_opt.weight_decay
    if cfg_opt.decoupled_weight_decay and name in ("sgd", "rmsprop"):
        raise ConfigError("optimizer.decoupled_weight_decay", f"torch's {name} has coupled L2 decay only; use adam or adamw")
    # capturable keeps Adam/RMSprop's step counter on the device, so skipped steps restore it without a sync
    cap = {"capturable": True} if capturable and device.type == "cuda" else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg_opt.lr, momentum=cfg_opt.momentum, nesterov=cfg_opt.nesterov, weight_decay=wd)
    if name in ("adam", "adamw"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        kwargs = {} if name == "adamw" else {"decoupled_weight_decay": cfg_opt.decoupled_weight_decay}
        return cls(params, lr=cfg_opt.lr, betas=tuple(cfg_opt.betas), eps=cfg_opt.eps, weight_decay=wd, **kwargs, **cap)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg_opt.lr, alpha=cfg_opt.alpha, eps=cfg_opt.eps,
                                   momentum=cfg_opt.momentum, weight_decay=wd, **cap)
    raise ConfigError("optimizer.name", f"unknown optimizer '{name}'")


class Schedule:
    """The run's LR schedule: per-step schedulers plus an optional per-epoch plateau."""

    def __init__(self, optimizer, cfg_sched, warmup_steps: Optional[int], total_steps: int, steps_per_epoch: int):
        self.optimizer = optimizer
        self.per_step: List[lr_scheduler.LRScheduler] = []
        self.plateau: Optional[lr_scheduler.ReduceLROnPlateau] = None
        if warmup_steps:
            # factor (t+1)/N for t < N, then 1
            self.per_step.append(lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup_steps,
                                                       end_factor=1.0, total_iters=max(warmup_steps - 1, 1)))
        name = cfg_sched.name
        if name == "step":
            self.per_step.append(lr_scheduler.StepLR(optimizer, step_size=cfg_sched.step_size * steps_per_epoch,
                                                     gamma=cfg_sched.gamma))
        elif name == "cosine":
            self.per_step.append(lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=cfg_sched.eta_min))
        elif name == "onecycle":
            self.per_step.append(lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"],
                                                         total_steps=total_steps + 1, pct_start=cfg_sched.pct_start,
                                                         div_factor=cfg_sched.div_factor))
        elif name == "plateau":
            self.plateau = lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg_sched.factor, patience=cfg_sched.patience)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> None:
        for s in self.per_step:
            s.step()

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
