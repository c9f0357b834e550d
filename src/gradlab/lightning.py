"""gradlab in a PyTorch Lightning ``Trainer``: ``GradlabCallback`` (``pip install 'gradlab[lightning]'``).

    trainer = lightning.Trainer(callbacks=[GradlabCallback(stabilizers=["clip"])], ...)

Where it hooks in (Lightning 2.x, read from ``lightning/pytorch/plugins/precision``): the
optimizer step runs the closure (training_step, zero_grad, backward), then under AMP
``scaler.unscale_(optimizer)``, then ``on_before_optimizer_step``, then Lightning's own
``gradient_clip_val`` clipping, then ``optimizer.step()``. So ``on_before_optimizer_step``
sees the unscaled gradients of the whole (accumulated) step, before the update: this is where
gradlab's stabilizers run and the telemetry row starts. Lightning's clipping would come after
them and change what the optimizer applies without gradlab seeing it, so the callback refuses
a set ``gradient_clip_val`` (use ``stabilizers=["clip"]``, the same formula, instead).
``on_before_backward`` supplies the loss (divided by the AMP scale when a GradScaler scaled it).

Logging: into the run of Lightning's ``MLFlowLogger`` when the trainer has one (same run, same
step numbers: ``trainer.global_step``), else into a run of gradlab's own batched logger
(``tracking=...``, as ``GradientMonitor``). A divergence stops the trainer (``should_stop``).
"""
from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import MLFlowLogger

from .monitor import MonitorCallback
from .tracking import RunLogger


class GradlabCallback(MonitorCallback, Callback):
    """gradlab's stabilizers, telemetry and run record for a LightningModule with one optimizer
    and automatic optimization. Arguments as ``gradlab.GradientMonitor``."""

    integration = "lightning"
    loss: Optional[torch.Tensor] = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(f"gradient_clip_val={trainer.gradient_clip_val}: Lightning clips after gradlab's "
                             "stabilizers, so gradlab could not record what the optimizer applies; leave it unset "
                             "and pass stabilizers=['clip'] (or {'clip': {'max_norm': ...}}) to GradlabCallback")
        if len(trainer.optimizers) != 1 or not pl_module.automatic_optimization:
            raise ValueError("GradlabCallback supports one optimizer with automatic optimization")
        mlflow_loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        run = RunLogger(mlflow_loggers[0].experiment, mlflow_loggers[0].run_id) if mlflow_loggers else None
        self.start_monitor(pl_module, trainer.optimizers[0], run)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss = loss.detach()
        if scaler is not None and scaler.is_enabled():
            loss = loss / scaler._get_scale_async()  # the scale as a device tensor: get_scale() would sync
        self.loss = loss if self.loss is None else self.loss + loss  # accumulated micro-batches: their mean

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves a fused optimizer's gradients scaled (its kernel would unscale them);
            # unscaled here, the stabilizers and telemetry see true gradients and the kernel skips only
            # where the scaler found an inf
            scaler.unscale_(optimizer)
        self.monitor.step(self.loss, step=trainer.global_step)
        self.loss = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor.diverged is not None:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.result = self.monitor.finish()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.monitor is not None:
            self.result = self.monitor.finish("FAILED")
