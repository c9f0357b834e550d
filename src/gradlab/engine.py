"""The step engine: one optimizer step on the device, and nothing else (no I/O, no host sync).

the injected faults (gradlab.faults: this step's batch may be corrupted) -> forward
(under autocast) -> loss -> backward (GradScaler-scaled) -> unscale -> the stabilizer pipeline -> the update (undone where a stabilizer skips it) -> one telemetry
row into the device buffer. Mixed precision is always "on" as objects: with
``precision=32`` autocast is disabled and the GradScaler is torch's disabled scaler,
whose calls are no-ops, so the step has no precision branches. The engine owns all of
its state in one ``state_dict``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .faults import Faults
from .optim import Schedule, build_optimizer
from .stabilizers import StabilizerStack
from .telemetry import Recorder, model_probes

AMP_DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def l1_penalty(model: nn.Module) -> torch.Tensor:
    return sum(p.abs().sum() for n, p in model.named_parameters() if n.endswith("weight"))


def z_penalty(logits: torch.Tensor) -> torch.Tensor:
    """PaLM's z-loss (Chowdhery et al. 2022, sec. 5): mean over the batch of log(Z)^2, Z the
    softmax normalizer sum_j exp(logit_j); it pulls log Z towards 0, so the output logits
    cannot drift off together (PaLM: coefficient 1e-4)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def objective(loss: torch.Tensor, logits: torch.Tensor, model: nn.Module, cfg_loss) -> torch.Tensor:
    """What backward differentiates: the cross-entropy plus the configured penalties (the logged
    ``train/loss`` is the cross-entropy alone)."""
    if cfg_loss.l1 > 0:
        loss = loss + cfg_loss.l1 * l1_penalty(model)
    if cfg_loss.z_loss > 0:
        loss = loss + cfg_loss.z_loss * z_penalty(logits)
    return loss


class StepEngine:
    """Model, optimizer, schedule, AMP, stabilizers, faults and the telemetry buffer of one run."""

    def __init__(self, cfg, model: nn.Module, device: torch.device, total_steps: int, steps_per_epoch: int):
        self.model, self.device = model, device
        self.loss_cfg = cfg.loss
        self.stack = StabilizerStack(cfg.stabilizer, model, device)
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters(), device, capturable=self.stack.skips)
        self.stack.bind(self.optimizer)  # for stabilizers that read the optimizer's state (spam)
        self.faults = Faults(cfg.fault, cfg.seed, device)
        warmup = cfg.stabilizer.warmup.steps if cfg.stabilizer.get("warmup") is not None else None
        self.schedule = Schedule(self.optimizer, cfg.scheduler, warmup, total_steps, steps_per_epoch,
                                 self.stack.lr_factors() + self.faults.lr_factors())
        self.amp_dtype = AMP_DTYPES[cfg.trainer.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "fp16"
                                           and cfg.trainer.grad_scaler)
        self.recorder = Recorder(self.stack.names, device, cfg.telemetry.log_every, cfg.telemetry.layer_every,
                                 model_probes(model))
        self.step_count = 0
        self.correct = torch.zeros((), dtype=torch.long, device=device)  # this epoch's right answers
        self.seen = 0  # ... out of this many training images

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step; everything it records stays on the device."""
        x, y, fault = self.faults.apply(self.step_count, x, y)
        self.optimizer.zero_grad(set_to_none=False)
        with self.autocast():
            logits = self.model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.loss_cfg.label_smoothing)
        self.scaler.scale(objective(loss, logits, self.model, self.loss_cfg)).backward()
        self.scaler.unscale_(self.optimizer)  # stabilizers must see true gradients
        gs = self.stack.process(loss)
        gs.fault = fault
        layer_step = self.recorder.is_layer_step(self.step_count)
        old = self.stack.step(self.optimizer, gs, self.scaler, keep_old_params=layer_step)
        skipped = gs.skip if gs.skip is not None else torch.zeros((), dtype=torch.bool, device=self.device)
        if self.scaler.is_enabled():
            skipped = skipped | ~torch.isfinite(gs.pre_norm)  # what GradScaler skips
            self.scaler.update()
        gs.finish(skipped)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)
        self.recorder.record(self.step_count, self.schedule.lr, gs, old_params=old,
                             params=self.stack.params if layer_step else None)
        self.schedule.step()
        self.step_count += 1

    def reset_epoch_accuracy(self) -> float:
        """This epoch's training accuracy (one host read, at the epoch's end), then start counting again."""
        accuracy = float(self.correct) / max(self.seen, 1)
        self.correct.zero_()
        self.seen = 0
        return accuracy

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "stabilizers": self.stack.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step_count, "correct": self.correct.cpu(),
                "seen": self.seen, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stack.load_state_dict(state["stabilizers"])
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step_count, self.seen = state["step"], state["seen"]
        self.correct.copy_(state["correct"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

