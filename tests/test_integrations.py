"""gradlab's callbacks in PyTorch Lightning and the Hugging Face Trainer: the same telemetry as
gradlab's own trainer for the same model, seed and batches, no host sync added by their hooks,
and their refusals of a framework clipping that gradlab could not see. Each test skips, with
the extra to install, when its framework is missing."""
from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import client, history
from gradlab.monitor import GradientMonitor
from test_monitor import CLIP, STEPS, assert_same_telemetry, knobs, reference
from test_stabilizers import forbid_host_sync

STACK = ["stabilizer=[warmup,clip]", "stabilizer.warmup.steps=3", "stabilizer.clip.max_norm=0.05"]
TELEMETRY = {"log_every": 5, "layer_every": 4}
NO_FLUSH = {"log_every": 50, "layer_every": 4}  # under the no-sync guard: the once-per-log_every copy comes at the end


@pytest.fixture(autouse=True)
def _no_global_tracking_uri():
    """Lightning's MLFlowLogger and HF's MLflowCallback set MLflow's process-wide tracking URI:
    unset it after each test, so the next one uses its own store."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def hooks_without_host_sync(monkeypatch, cls, names):
    """Every call of ``cls.<name>`` and of the monitor's optimizer hooks runs under the no-sync guard."""
    def guarded(fn):
        def call(*args, **kwargs):
            with forbid_host_sync():
                return fn(*args, **kwargs)
        return call

    for name in names:
        monkeypatch.setattr(cls, name, guarded(getattr(cls, name)))
    for name in ("_before_optimizer_step", "_after_optimizer_step"):
        monkeypatch.setattr(GradientMonitor, name, guarded(getattr(GradientMonitor, name)))
    yield


# ---------------------------------------------------------------- PyTorch Lightning
def lightning_fit(model, batches, callback, tmp_path, fused=False, **trainer_kwargs):
    pl = pytest.importorskip("lightning.pytorch", reason="needs the lightning extra: pip install -e '.[lightning]'")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=fused or None)

    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the trainer's batches, in its order
    settings = {"logger": False, **trainer_kwargs}
    trainer = pl.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[callback], **settings)
    trainer.fit(Module(), train_dataloaders=loader)
    return trainer


def test_lightning_callback_telemetry_equals_the_trainers(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch", reason="needs the lightning extra: pip install -e '.[lightning]'")
    from gradlab.lightning import GradlabCallback

    ours, model, batches = reference(tmp_path, STACK)
    ours.fit()
    callback = GradlabCallback(knobs(STACK), telemetry=NO_FLUSH, tracking=False, out_dir=tmp_path / "pl")
    with hooks_without_host_sync(monkeypatch, GradlabCallback, ["on_before_backward", "on_before_optimizer_step"]):
        lightning_fit(model, batches, callback, tmp_path)
    assert callback.result.steps == STEPS
    assert_same_telemetry(callback.monitor.history, ours.history)
    assert (callback.monitor.history.column("grad/clip_coef") < 1).all()


def test_lightning_callback_logs_into_the_mlflow_logger_run(tmp_path, tmp_store):
    pl = pytest.importorskip("lightning.pytorch", reason="needs the lightning extra: pip install -e '.[lightning]'")
    from gradlab.lightning import GradlabCallback

    _, model, batches = reference(tmp_path, CLIP, steps=6)
    logger = pl.loggers.MLFlowLogger(experiment_name="pl", tracking_uri=tmp_store)
    callback = GradlabCallback(["clip"], telemetry=TELEMETRY, out_dir=tmp_path / "pl")
    lightning_fit(model, batches, callback, tmp_path, logger=logger)
    assert callback.result.run_id == logger.run_id
    assert [s for s, _ in history(tmp_store, logger.run_id, "grad/norm_after")] == list(range(6))
    run = client(tmp_store).get_run(logger.run_id)
    assert run.data.tags["integration"] == "lightning" and run.data.tags["diverged"] == "false"
    assert run.info.status == "FINISHED"  # ended by Lightning's logger, not by gradlab


@pytest.mark.parametrize("fused", [False, True])
def test_lightning_callback_under_amp_sees_unscaled_gradients_and_loss(tmp_path, fused):
    """16-mixed with a GradScaler (on the CPU here): the callback's loss and gradients are the
    unscaled ones (close to a 32-bit run's, not 2^10 times them), and a step the scaler skips
    (an inf gradient) is recorded as skipped, not as a divergence."""
    pl = pytest.importorskip("lightning.pytorch", reason="needs the lightning extra: pip install -e '.[lightning]'")
    from gradlab.lightning import GradlabCallback

    _, model, batches = reference(tmp_path, CLIP, steps=5)
    runs = {}
    for precision in ("32", "16-mixed"):
        callback = GradlabCallback(["clip"], tracking=False, out_dir=tmp_path / precision)
        net = copy.deepcopy(model)
        hook = None
        if precision == "16-mixed":
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
            extra = {"plugins": [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
            calls = iter(range(100))
            hook = net.head.bias.register_hook(lambda g: g * math.inf if next(calls) == 3 else g)
        else:
            extra = {}
        lightning_fit(net, batches, callback, tmp_path / precision, fused=fused, **extra)
        if hook is not None:
            hook.remove()
        runs[precision] = callback
    fp32, amp = (runs[p].monitor.history for p in ("32", "16-mixed"))
    assert list(amp.column("grad/skipped")) == [0, 0, 0, 1, 0] and runs["16-mixed"].result.diverged_at_step is None
    kept = [0, 1, 2]  # before the skip: the same weights, so fp16 rounding is the only difference
    for key in ("train/loss", "grad/norm"):
        np.testing.assert_allclose(amp.column(key)[kept], fp32.column(key)[kept], rtol=2e-2, err_msg=key)
    assert scaler.get_scale() == 2.0 ** 9  # the scaler saw the inf and backed off


def test_lightning_callback_refuses_gradient_clip_val(tmp_path):
    pytest.importorskip("lightning.pytorch", reason="needs the lightning extra: pip install -e '.[lightning]'")
    from gradlab.lightning import GradlabCallback

    _, model, batches = reference(tmp_path, [], steps=2)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        lightning_fit(model, batches, GradlabCallback(["clip"], tracking=False), tmp_path, gradient_clip_val=1.0)


# ---------------------------------------------------------------- Hugging Face Trainer
class WithLoss(nn.Module):
    """gradlab's model as the HF Trainer expects one: labels in, a dict with the loss out."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def hf_train(model, batches, callback, tmp_path, max_grad_norm=0.0, report_to="none"):
    transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")

    class Examples(torch.utils.data.IterableDataset):  # no sampler: the trainer's order, one example at a time
        def __iter__(self):
            for x, y in batches:
                for i in range(len(y)):
                    yield {"x": x[i], "labels": y[i]}

    net = WithLoss(model)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=len(batches), per_device_train_batch_size=len(batches[0][1]),
        max_grad_norm=max_grad_norm, use_cpu=True, report_to=report_to, save_strategy="no", logging_steps=4,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
    trainer = transformers.Trainer(net, args, train_dataset=Examples(), optimizers=(optimizer, constant),
                                   callbacks=[callback])
    trainer.train()
    return trainer


def test_hf_callback_telemetry_equals_the_trainers(tmp_path, monkeypatch, tmp_store):
    pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
    from gradlab.hf import GradlabCallback

    ours, model, batches = reference(tmp_path, STACK)
    ours.fit()
    callback = GradlabCallback(knobs(STACK), telemetry=NO_FLUSH, tracking={"uri": tmp_store, "experiment": "hf"},
                               out_dir=tmp_path / "hfplots")
    with hooks_without_host_sync(monkeypatch, GradlabCallback, ["on_pre_optimizer_step", "_capture_loss"]):
        hf_train(model, batches, callback, tmp_path)
    assert callback.result.steps == STEPS
    assert callback.monitor.history.steps == list(range(1, STEPS + 1))  # the Trainer's global_step after each update
    assert_same_telemetry(callback.monitor.history, ours.history, steps=False)
    # the Trainer's own grad_norm (max_grad_norm=0: the norm before any clipping) sits next to gradlab's
    theirs = dict(history(tmp_store, callback.result.run_id, "grad_norm"))
    mine = dict(history(tmp_store, callback.result.run_id, "grad/norm"))
    assert sorted(theirs) == [4, 8, 12]
    for step, value in theirs.items():
        assert value == pytest.approx(mine[step], rel=1e-6)


def test_hf_callback_refuses_the_trainers_own_clipping(tmp_path):
    pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
    from gradlab.hf import GradlabCallback

    _, model, batches = reference(tmp_path, [], steps=2)
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        hf_train(model, batches, GradlabCallback(["clip"], tracking=False), tmp_path, max_grad_norm=1.0)


def test_hf_callback_joins_the_trainers_mlflow_run(tmp_path, tmp_store, monkeypatch):
    pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
    from gradlab.hf import GradlabCallback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tmp_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-own")
    _, model, batches = reference(tmp_path, CLIP, steps=8)
    callback = GradlabCallback(["clip"], telemetry=TELEMETRY, out_dir=tmp_path / "hfplots")
    hf_train(model, batches, callback, tmp_path, report_to="mlflow")
    run = client(tmp_store).get_run(callback.result.run_id)
    assert run.data.params["max_grad_norm"] == "0.0"  # the Trainer's own parameters: its run, not a second one
    assert run.data.tags["integration"] == "hf" and run.data.tags["stabilizer"] == "clip"
    steps = [s for s, _ in history(tmp_store, run.info.run_id, "grad_norm")]
    assert steps == [4, 8] and [s for s, _ in history(tmp_store, run.info.run_id, "grad/norm")] == list(range(1, 9))
    assert np.isfinite([v for _, v in history(tmp_store, run.info.run_id, "grad/norm_after")]).all()
