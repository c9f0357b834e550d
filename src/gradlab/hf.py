"""gradlab in a Hugging Face ``Trainer``: ``GradlabCallback`` (``pip install 'gradlab[hf]'``).

    args = TrainingArguments(..., max_grad_norm=0)      # gradlab does the clipping
    trainer = Trainer(model, args, callbacks=[GradlabCallback(stabilizers=["clip"])], ...)

Where it hooks in (transformers 5.x, ``Trainer._run_epoch``): after the last micro-batch's
backward the Trainer calls ``accelerator.clip_grad_norm_(params, max_grad_norm)``, which first
unscales fp16 gradients and returns the norm *before* clipping (this is the ``grad_norm`` it
logs); with ``max_grad_norm=0`` it still computes that norm (``clip_grad_norm_`` with an inf
threshold, which leaves finite gradients unchanged). Then ``on_pre_optimizer_step``, then
``optimizer.step()``, then ``on_optimizer_step``. So ``on_pre_optimizer_step`` sees the
unscaled, accumulated gradients before the update, but after the Trainer's own clipping: with
``max_grad_norm > 0`` gradlab would record the clipped norm as the raw one, so the callback
asks for ``max_grad_norm=0`` and does the clipping itself (``stabilizers=["clip"]``: the same
formula as the Trainer's default, ``max_norm=1.0``).

The loss comes from the model's output (``loss``, as the Trainer reads it), through a forward
hook. Step numbers are the Trainer's ``global_step`` after the update, the step at which the
Trainer logs that update's ``grad_norm``, so both sit side by side in one chart. Logging: into
the active MLflow run when there is one (``report_to="mlflow"`` starts it), else into a run of
gradlab's own batched logger, where the Trainer's logged ``grad_norm`` is copied too.
A divergence stops training (``control.should_training_stop``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import mlflow
import torch
from transformers import TrainerCallback

from .monitor import MonitorCallback
from .record import now_ms
from .tracking import RunLogger

HF_KEYS = ("grad_norm", "loss", "learning_rate")  # the Trainer's own logged values, copied into gradlab's run


def output_loss(output) -> Optional[torch.Tensor]:
    """The loss in a model's output, where the Trainer's ``compute_loss`` finds it."""
    if isinstance(output, Mapping):
        return output.get("loss")
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]) and output[0].ndim == 0:
        return output[0]
    return getattr(output, "loss", None)


class GradlabCallback(MonitorCallback, TrainerCallback):
    """gradlab's stabilizers, telemetry and run record for a Hugging Face Trainer. Arguments as
    ``gradlab.GradientMonitor``."""

    integration = "hf"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list = []  # this step's micro-batch losses

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(f"TrainingArguments.max_grad_norm={args.max_grad_norm} clips before any callback sees "
                             "the gradients, so gradlab would record the clipped norm as the raw one; set "
                             "max_grad_norm=0 and pass stabilizers=['clip'] (the same formula) to GradlabCallback")
        active = mlflow.active_run()
        run = RunLogger(mlflow.MlflowClient(mlflow.get_tracking_uri()), active.info.run_id) if active else None
        self.own_run = run is None
        self.start_monitor(model, optimizer, run)
        self.hook = model.register_forward_hook(self._capture_loss)

    def _capture_loss(self, module, inputs, output) -> None:
        if module.training and torch.is_grad_enabled():
            loss = output_loss(output)
            if loss is None:
                raise ValueError("GradlabCallback reads the training loss from the model's output ('loss'), "
                                 "and this model returned none; pass labels so the model computes its loss")
            self.losses.append(loss.detach().float())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        loss = torch.stack(self.losses).mean()  # over the accumulated micro-batches
        self.losses = []
        self.monitor.step(loss, step=state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor.diverged is not None:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: float(v) for k, v in (logs or {}).items() if k in HF_KEYS}
        if self.own_run and self.monitor.run is not None and values:
            self.monitor.run.log_metrics(values, step=state.global_step, timestamp_ms=now_ms())

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.remove()
        self.result = self.monitor.finish()
