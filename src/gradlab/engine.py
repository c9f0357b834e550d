"""The step engine: one optimizer step on the device, and nothing else (no I/O, no host sync).

the injected faults (gradlab.faults: this step's batch may be corrupted) -> forward (under
autocast) -> loss -> backward (GradScaler-scaled) -> unscale -> the stabilizer pipeline -> the
update (undone where a stabilizer skips it) -> one telemetry row into the device buffer (the part
after backward is ``UpdatePipeline``, which ``gradlab.monitor`` also drives around a user's own
step). Under torchrun (``gradlab.distributed``) each rank takes its slice of the global batch, and
the loss the stabilizers and telemetry see is the global one. Mixed precision is always "on"
as objects: with ``precision=32`` autocast is disabled and the GradScaler is torch's disabled scaler,
whose calls are no-ops, so the step has no precision branches. The engine owns all of
its state in one ``state_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import SINGLE, Parallel
from .faults import Faults
from .optim import Schedule, build_optimizer
from .stabilizers import GradStep, StabilizerStack, UpdateSnapshot
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


@dataclass
class PendingUpdate:
    gs: GradStep
    snapshot: UpdateSnapshot
    step: int
    lr: float


class UpdatePipeline:
    """What gradlab adds to a step after backward(): the stabilizers on the unscaled gradients,
    the update (undone where a stabilizer skips it) and one telemetry row. StepEngine drives it
    around its own optimizer step; GradientMonitor and the Lightning / Hugging Face callbacks
    around the step that the user's loop or framework takes. Device work only."""

    def __init__(self, stack: StabilizerStack, recorder: Recorder, optimizer):
        self.stack, self.recorder, self.optimizer = stack, recorder, optimizer
        self.pending: Optional[PendingUpdate] = None
        self.diverged: Optional[torch.Tensor] = None  # device flag, sticky: a non-finite loss or update was applied

    def begin(self, loss: torch.Tensor, step: int, lr, fault: Optional[torch.Tensor] = None) -> bool:
        """Stabilize the gradients and snapshot what a skip restores; False when the optimizer step
        must not run (a skip decided on the host, see ``StabilizerStack.before_update``).
        ``fault``: the step's ``fault/active`` flag (gradlab.faults)."""
        gs = self.stack.process(loss)
        gs.fault = fault
        snapshot = self.stack.before_update(self.optimizer, gs, keep_old_params=self.recorder.is_layer_step(step))
        self.pending = PendingUpdate(gs, snapshot, step, lr)
        return snapshot.run_step

    def end(self, not_applied: Optional[torch.Tensor] = None) -> None:
        """After the optimizer step (or where it was not taken): undo a skipped update and record
        the row. ``not_applied``: a device flag for an update something else skipped (GradScaler)."""
        p, self.pending = self.pending, None
        gs = p.gs
        old = self.stack.after_update(p.snapshot)
        skipped = gs.skip
        if not_applied is not None:
            skipped = not_applied if skipped is None else skipped | not_applied
        gs.finish(skipped)
        if skipped is None:  # DivergenceWatch's rule: a non-finite update or loss was applied
            bad = ~torch.isfinite(torch.stack((gs.applied_norm, gs.loss.detach().float()))).all()
        else:
            bad = ~torch.isfinite(gs.applied_norm) | (~torch.isfinite(gs.loss) & ~skipped)
        self.diverged = bad if self.diverged is None else self.diverged | bad
        self.recorder.record(p.step, p.lr, p.gs, old_params=old,
                             params=self.stack.params if p.snapshot.keep_old_params else None)


class StepEngine:
    """Model, optimizer, schedule, AMP, stabilizers, faults and the telemetry buffer of one run."""

    def __init__(self, cfg, model: nn.Module, device: torch.device, total_steps: int, steps_per_epoch: int,
                 parallel: Parallel = SINGLE):
        self.model, self.device, self.parallel = model, device, parallel
        self.loss_cfg = SimpleNamespace(**cfg.loss)  # read every step: plain attributes, not OmegaConf's
        self.stack = StabilizerStack(cfg.stabilizer, parallel.unwrap(model), device)
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
        self.pipeline = UpdatePipeline(self.stack, self.recorder, self.optimizer)
        self.step_count = 0
        self.correct = torch.zeros((), dtype=torch.long, device=device)  # this epoch's right answers
        self.seen = 0  # ... out of this many training images

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the global batch ``x, y``; everything it records stays on the device."""
        x, y, fault = self.faults.apply(self.step_count, x, y)
        n = len(y)
        x, y, weight = self.parallel.shard(x, y)
        self.optimizer.zero_grad()  # set_to_none: backward writes fresh gradients, no zero-fill + add
        with self.autocast():
            logits = self.model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.loss_cfg.label_smoothing)
        total = objective(loss, logits, self.model, self.loss_cfg)
        self.scaler.scale(total * weight if weight != 1.0 else total).backward()
        self.update(self.parallel.global_loss(loss, weight), logits, y, n, fault)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, n: int,
               fault: Optional[torch.Tensor]) -> None:
        """The step after backward: stabilizers, the optimizer step, telemetry, schedule
        (``gradlab.ensemble`` calls it per member after one batched backward)."""
        self.scaler.unscale_(self.optimizer)  # stabilizers must see true gradients
        if self.pipeline.begin(loss, self.step_count, self.schedule.lr, fault):
            self.scaler.step(self.optimizer)
        not_applied = None
        if self.scaler.is_enabled():
            not_applied = ~torch.isfinite(self.pipeline.pending.gs.pre_norm)  # what GradScaler skips
            self.scaler.update()
        self.correct += (logits.detach().argmax(1) == y).sum()  # this rank's
        self.seen += n  # all ranks'
        self.pipeline.end(not_applied)
        self.schedule.step()
        self.step_count += 1

    def reset_epoch_accuracy(self) -> float:
        """This epoch's training accuracy (one host read, at the epoch's end), then start counting again."""
        accuracy = float(self.parallel.sum(self.correct)) / max(self.seen, 1)
        self.correct.zero_()
        self.seen = 0
        return accuracy

    def state_dict(self) -> dict:
        """Everything a resume needs, in the single-process layout (under FSDP every rank must call
        this: it gathers the shards; rank 0 gets the state)."""
        return {"model": self.parallel.model_state(self.model),
                "optimizer": self.parallel.optimizer_state(self.model, self.optimizer),
                "stabilizers": self.stack.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step_count,
                "correct": self.parallel.sum(self.correct).cpu(),
                "seen": self.seen, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict) -> None:
        self.parallel.load_model_state(self.model, state["model"])
        self.parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.stack.load_state_dict(state["stabilizers"])
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step_count, self.seen = state["step"], state["seen"]
        self.correct.copy_(state["correct"] if self.parallel.main else 0)  # all ranks' count, held once
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

