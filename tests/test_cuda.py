"""The CUDA path: training under each precision and stabilizer family, fp16 overflow with and
without the GradScaler, and no host sync in the step or the sharpness gauge under
``torch.cuda.set_sync_debug_mode("error")``. Skipped without a GPU (the CPU suite covers the same
code on the CPU); the README's "GPU" section says when and where these last ran.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import client, history, tiny_cfg
from gradlab.training import Trainer, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")

FAMILIES = ["none", "[warmup,clip]", "[agc,zclip,spike_skip]", "[adagc,spam]", "autoclip", "clip_value"]


@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])
@pytest.mark.parametrize("stabilizers", FAMILIES)
def test_training_on_cuda(tmp_path, precision, stabilizers):
    r = train(tiny_cfg(tmp_path, f"stabilizer={stabilizers}", "optimizer=adam", "trainer.device=cuda",
                       f"trainer.precision={precision}", steps=20), tmp_path / "out")
    assert not r.diverged
    assert client(r.tracking_uri).get_run(r.run_id).data.tags["device"].startswith("cuda")
    norms = history(r.tracking_uri, r.run_id, "grad/norm")
    assert [s for s, _ in norms] == list(range(20))
    if precision != "fp16":  # fp16's first steps may overflow at the scaler's initial scale (then skipped)
        assert np.isfinite([v for _, v in norms]).all()


def test_fp16_overflow_diverges_without_the_scaler_and_is_skipped_with_it(tmp_path):
    """The fp16_overflow scenario in small: one sample of pixel noise up to 1e5 at step 5."""
    common = ["optimizer=sgd", "trainer.device=cuda", "trainer.precision=fp16", "fault=[bad_batch]",
              "fault.bad_batch.at=[5]", "fault.bad_batch.kind=extreme", "fault.bad_batch.factor=100000"]
    off = train(tiny_cfg(tmp_path / "off", *common, "trainer.grad_scaler=false"), tmp_path / "off" / "out")
    on = train(tiny_cfg(tmp_path / "on", *common), tmp_path / "on" / "out")
    assert off.diverged and off.diverged_at_step == 5
    assert not on.diverged and on.steps == 12
    assert dict(history(on.tracking_uri, on.run_id, "grad/skipped"))[5] == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_no_host_sync_in_the_step_with_the_gauge_due(tmp_path, optimizer):
    """Foresight's gauge (every 2 steps here) and the step, under sync debug mode "error"."""
    trainer = Trainer(tiny_cfg(tmp_path, f"optimizer={optimizer}", "stabilizer=[clip,spike_skip]",
                               "trainer.device=cuda", "telemetry.sharpness_every=2", "telemetry.log_every=50",
                               "stabilizer.spike_skip.min_history=2", "stabilizer.spike_skip.window=4"), tmp_path / "out")
    perm = torch.randperm(len(trainer.train_data), generator=torch.Generator().manual_seed(0))
    batches = list(trainer.train_data.shuffled_batches(trainer.cfg.trainer.batch_size, perm))[:8]
    engine = trainer.engine
    for x, y in batches[:3]:  # warm-up: optimizer state, the gauge's first (cold) measurement
        trainer.foresight.before_step(engine.step_count, x, y)
        engine.step(x, y)
    engine.recorder.flush()
    trainer.foresight.gauge.flush()
    torch.cuda.synchronize()
    measured = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[3:]:
            measured.append(trainer.foresight.before_step(engine.step_count, x, y))
            engine.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert any(measured)
    engine.recorder.flush()
    assert np.isfinite(engine.recorder.history.column("grad/norm")).all()
