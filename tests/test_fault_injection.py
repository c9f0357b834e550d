"""Injected faults (gradlab.faults): what each does to a batch or the LR, exactly; which steps
they hit (a function of the seed and the step only, so a resume hits the same ones); that they
cost no host sync; and how a run records them (tag, per-step metric, plot marks).
(tests/test_faults.py is about gradlab's own failure and recovery: crashes, kills, bad files.)"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import client, compose, history, one_line_error, cli, tiny_cfg
from gradlab import plots
from gradlab.config import ConfigError, check
from gradlab.data import MEAN, STD
from gradlab.faults import Faults, fault_label, selected_faults
from gradlab.registry import FAULTS
from gradlab.training import Trainer, train
from test_stabilizers import forbid_host_sync

CPU = torch.device("cpu")


def make(name: str, seed: int = 0, **knobs):
    """One fault with its schema's defaults, ``knobs`` replacing some."""
    return FAULTS[name].obj(seed, CPU, **{**asdict(FAULTS[name].schema()), **knobs})


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 1, 28, 28, generator=g)
    return (pixels - MEAN) / STD, torch.randint(0, 10, (n,), generator=g)


def pixels(x):
    return x * STD + MEAN


# ---------------------------------------------------------------- what each fault does
def test_bad_batch_scale_multiplies_every_pixel():
    x, y = batch()
    x2, y2 = make("bad_batch", factor=255.0).corrupt(100, x, y)
    torch.testing.assert_close(pixels(x2), 255.0 * pixels(x), rtol=1e-5, atol=1e-4)
    assert torch.equal(y2, y)


def test_bad_batch_labels_are_seeded_random_classes():
    x, y = batch(n=512)
    fault = make("bad_batch", kind="labels")
    _, y2 = fault.corrupt(100, x, y)
    assert torch.equal(fault.corrupt(100, x, y)[1], y2)  # a function of (seed, step)
    assert not torch.equal(make("bad_batch", seed=1, kind="labels").corrupt(100, x, y)[1], y2)
    assert not torch.equal(fault.corrupt(101, x, y)[1], y2)
    assert set(y2.tolist()) == set(range(10)) and (y2 != y).float().mean() > 0.8  # ~9/10 wrong
    assert torch.equal(fault.corrupt(100, x, y)[0], x)


def test_bad_batch_extreme_replaces_one_sample_with_noise_up_to_factor():
    x, y = batch()
    x2, y2 = make("bad_batch", kind="extreme", factor=1000.0).corrupt(100, x, y)
    changed = [i for i in range(len(x)) if not torch.equal(x2[i], x[i])]
    assert len(changed) == 1 and torch.equal(y2, y)
    p = pixels(x2[changed[0]])
    assert float(p.min()) >= -1e-3 and float(p.max()) <= 1000.0 + 1e-2 and float(p.mean()) > 300  # U(0, 1000)


def test_bad_batch_steps_and_probability():
    fault = make("bad_batch", at=[3, 7], prob=0.0)
    assert [s for s in range(20) if fault.active(s)] == [3, 7]
    rare = make("bad_batch", at=[], prob=0.05, seed=4)
    hits = [s for s in range(4000) if rare.active(s)]
    assert 120 < len(hits) < 280  # Binomial(4000, 0.05): 200 +- 14
    # the same steps whatever the order they are asked in (a resumed run asks from its step on)
    assert [s for s in reversed(range(4000)) if rare.active(s)] == hits[::-1]
    assert hits != [s for s in range(4000) if make("bad_batch", at=[], prob=0.05, seed=5).active(s)]
    both = make("bad_batch", at=[1], prob=0.05, seed=4)
    assert [s for s in range(4000) if both.active(s)] == sorted({1, *hits})


def test_lr_spike_factor_is_k_for_n_steps():
    fault = make("lr_spike", at=5, length=3, factor=20.0)
    assert [fault.lr_factor()(t) for t in range(10)] == [1, 1, 1, 1, 1, 20, 20, 20, 1, 1]
    assert [s for s in range(10) if fault.active(s)] == [5, 6, 7]
    assert fault.spans(100) == [(5, 8)] and fault.spans(6) == [(5, 6)] and fault.spans(5) == []


def test_lr_spike_multiplies_the_schedule(tmp_path):
    """Composed with cosine and warmup: the LR at each step is the schedule's, x factor on the spike."""
    base = ["scheduler=cosine", "stabilizer=warmup", "stabilizer.warmup.steps=4"]
    plain = Trainer(tiny_cfg(tmp_path / "a", *base, steps=14), tmp_path / "a" / "out")
    spiked = Trainer(tiny_cfg(tmp_path / "b", *base, "fault=lr_spike", "fault.lr_spike.at=6",
                              "fault.lr_spike.length=3", "fault.lr_spike.factor=10", steps=14), tmp_path / "b" / "out")
    plain.fit(), spiked.fit()
    want = [lr * (10 if 6 <= t < 9 else 1) for t, lr in enumerate(plain.history.lr)]
    np.testing.assert_allclose(spiked.history.lr, want, rtol=1e-12)


def test_shift_inverts_or_rescales_from_its_step():
    x, y = batch()
    invert, rescale = make("shift", at=10), make("shift", at=10, kind="rescale", factor=0.5)
    assert [s for s in range(13) if invert.active(s)] == [10, 11, 12]
    torch.testing.assert_close(pixels(invert.corrupt(10, x, y)[0]), 1 - pixels(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pixels(rescale.corrupt(10, x, y)[0]), 0.5 * pixels(x), rtol=1e-5, atol=1e-5)
    assert invert.spans(50) == [(10, 50)]


def test_faults_apply_in_order_and_flag_the_step():
    cfg = compose(["fault=[bad_batch,shift]", "fault.bad_batch.at=[4]", "fault.shift.at=6"])
    faults = Faults(cfg.fault, 0, CPU)
    x, y = batch()
    flags = [float(faults.apply(s, x, y)[2]) for s in range(8)]
    assert flags == [0, 0, 0, 0, 1, 0, 1, 1]
    assert torch.equal(faults.apply(3, x, y)[0], x)
    assert faults.spans(8) == {"bad_batch": [(4, 5)], "shift": [(6, 8)]}
    assert np.isnan(float(Faults(compose([]).fault, 0, CPU).apply(0, x, y)[2]))  # none selected: not logged


# ---------------------------------------------------------------- config
def test_fault_group_is_multi_select_with_its_own_keys():
    cfg = compose(["fault=[lr_spike,bad_batch]", "fault.bad_batch.kind=labels"])
    check(cfg)
    assert selected_faults(cfg.fault) == ["bad_batch", "lr_spike"]  # the registry's order
    assert fault_label(cfg.fault) == "bad_batch+lr_spike" and fault_label(compose([]).fault) == "none"
    assert cfg.fault.bad_batch.kind == "labels" and cfg.fault.shift is None


@pytest.mark.parametrize("overrides,key", [
    (["fault=bad_batch", "fault.bad_batch.at=[]"], "fault.bad_batch.at"),
    (["fault=bad_batch", "fault.bad_batch.at=[-1]"], "fault.bad_batch.at"),
    (["fault=bad_batch", "fault.bad_batch.prob=1.5"], "fault.bad_batch.prob"),
    (["fault=bad_batch", "fault.bad_batch.kind=noise"], "fault.bad_batch.kind"),
    (["fault=lr_spike", "fault.lr_spike.at=0"], "fault.lr_spike.at"),
    (["fault=lr_spike", "fault.lr_spike.factor=0"], "fault.lr_spike.factor"),
    (["fault=lr_spike", "scheduler=onecycle"], "fault.lr_spike"),
    (["fault=shift", "fault.shift.kind=blur"], "fault.shift.kind"),
])
def test_fault_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        check(compose(overrides))
    assert err.value.key == key


def test_a_key_of_an_unselected_fault_is_one_line(tmp_path):
    one_line_error(cli("train.py", "fault.bad_batch.at=[3]", "trainer.device=cpu", cwd=tmp_path), 2,
                   "'fault.bad_batch.at'", "fault=[...,bad_batch]")


# ---------------------------------------------------------------- in a run
FAULTED = ["fault=[bad_batch,lr_spike,shift]", "fault.bad_batch.at=[2]", "fault.bad_batch.prob=0.1",
           "fault.lr_spike.at=5", "fault.lr_spike.length=2", "fault.shift.at=9", "fault.shift.kind=rescale"]


def test_a_faulted_run_is_tagged_records_each_step_and_marks_the_plot(tmp_path, monkeypatch):
    marked = {}
    norm_history = plots.norm_history

    def spy(*args, faults=None, **kwargs):
        marked.update(faults)
        return norm_history(*args, faults=faults, **kwargs)

    monkeypatch.setattr(plots, "norm_history", spy)
    trainer = Trainer(tiny_cfg(tmp_path, *FAULTED, "telemetry.plots=true", steps=12), tmp_path / "out")
    r = trainer.fit()
    run = client(r.tracking_uri).get_run(r.run_id)
    assert run.data.tags["fault"] == run.data.params["fault"] == "bad_batch+lr_spike+shift"
    bad = [s for s in range(12) if trainer.engine.faults.faults[0].active(s)]
    assert 2 in bad
    active = {s for s in bad} | {5, 6} | set(range(9, 12))
    assert history(r.tracking_uri, r.run_id, "fault/active") == [(s, float(s in active)) for s in range(12)]
    assert marked == {"bad_batch": [(s, s + 1) for s in bad], "lr_spike": [(5, 7)], "shift": [(9, 12)]}
    assert (tmp_path / "out" / "grad_norm.png").stat().st_size > 0


def test_a_run_without_faults_logs_no_fault_series(tmp_path):
    r = train(tiny_cfg(tmp_path, steps=3), tmp_path / "out")
    run = client(r.tracking_uri).get_run(r.run_id)
    assert run.data.tags["fault"] == "none" and history(r.tracking_uri, r.run_id, "fault/active") == []


def test_a_bad_batch_knocks_plain_sgd_over_and_clip_keeps_it(tmp_path):
    """The spike scenarios in miniature: one batch with pixels x 255 mid-run."""
    common = ["optimizer=sgd", "optimizer.lr=0.1", "fault=bad_batch", "fault.bad_batch.at=[20]"]
    hit = Trainer(tiny_cfg(tmp_path / "a", *common, steps=24), tmp_path / "a" / "out")
    hit.fit()
    clipped = Trainer(tiny_cfg(tmp_path / "b", *common, "stabilizer=clip", steps=24), tmp_path / "b" / "out")
    clipped.fit()
    pre = hit.history.column("grad/norm")
    assert pre[20] > 50 * np.median(pre[10:20])  # the spike
    assert np.all(clipped.history.column("grad/norm_after") <= 1.0 + 1e-5)


@pytest.mark.parametrize("kind", ["labels", "extreme"])
def test_faults_cost_no_host_sync(tmp_path, kind):
    trainer = Trainer(tiny_cfg(tmp_path, "fault=[bad_batch,lr_spike,shift]", "fault.bad_batch.prob=0.5",
                               f"fault.bad_batch.kind={kind}", "fault.lr_spike.at=3", "fault.shift.at=5",
                               "stabilizer=clip", "optimizer=sgd"), tmp_path / "out")
    batches = list(trainer.train_data.batches(32))[:8]
    trainer.engine.step(*batches[0])  # optimizer state exists
    with forbid_host_sync():
        for x, y in batches[1:]:
            trainer.engine.step(x, y)
    trainer.engine.recorder.flush()
    assert list(trainer.history.column("fault/active")[3:]) == [1.0] * 5
