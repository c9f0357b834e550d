"""GradientMonitor in a plain PyTorch loop: the same telemetry as gradlab's own trainer for the
same model, seed and batches; no host sync per step; GradScaler skips, divergence and bad
settings handled as in src/train.py; the same run record in MLflow."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import artifact_paths, client, compose, history, tiny_cfg
from gradlab.data import EpochOrder
from gradlab.monitor import GradientMonitor
from gradlab.registry import ConfigError
from gradlab.telemetry import STEP_KEYS
from gradlab.training import Trainer
from test_stabilizers import ALL, SMALL, forbid_host_sync

STEPS = 12
CLIP = ["stabilizer=[clip]", "stabilizer.clip.max_norm=0.05"]  # small enough that every step clips
STACKS = {"clip": CLIP, "all": [f"stabilizer=[{','.join(ALL)}]", *[o for n in ALL for o in SMALL.get(n, [])]]}


def knobs(overrides) -> dict:
    """Hydra overrides of the stabilizer group -> GradientMonitor's ``stabilizers`` dict."""
    cfg = compose(overrides)
    return {name: dict(cfg.stabilizer[name]) for name in cfg.stabilizer if cfg.stabilizer[name] is not None}


def reference(tmp_path, overrides, steps=STEPS):
    """gradlab's own trainer on the tiny synthetic setup (not run yet), a copy of its model before
    the first step, and the batches it trains on, in order."""
    cfg = tiny_cfg(tmp_path / "ref", *overrides, "telemetry.log_every=5", "telemetry.layer_every=4", steps=steps)
    trainer = Trainer(cfg, tmp_path / "ref" / "out")
    order = EpochOrder(cfg.seed, len(trainer.train_data), cfg.trainer.batch_size)
    return trainer, copy.deepcopy(trainer.engine.model), list(order.batches(trainer.train_data))[:steps]


def user_steps(model, batches, monitor, optimizer):
    """A user's loop: nothing gradlab-specific but ``monitor.step(loss)``."""
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.step(loss)
        optimizer.step()


def assert_same_telemetry(mine, theirs, rel=1e-6, steps=True):
    """Every per-step series and the per-layer norms, row by row; ``steps``: numbered alike, too."""
    assert len(mine.steps) == len(theirs.steps) and (not steps or mine.steps == theirs.steps)
    for key in STEP_KEYS + ["lr"]:
        a = np.asarray(mine.lr) if key == "lr" else mine.column(key)
        b = np.asarray(theirs.lr) if key == "lr" else theirs.column(key)
        np.testing.assert_allclose(a, b, rtol=rel, atol=0, equal_nan=True, err_msg=key)
    np.testing.assert_allclose(mine.layer_grid(0), theirs.layer_grid(0), rtol=rel, atol=0, err_msg="per-layer norms")


@pytest.mark.parametrize("stack", list(STACKS))
def test_monitor_telemetry_equals_the_trainers(tmp_path, stack):
    trainer, model, batches = reference(tmp_path, STACKS[stack])
    trainer.fit()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(model, optimizer, knobs(STACKS[stack]), telemetry={"log_every": 5, "layer_every": 4},
                              tracking=False, out_dir=tmp_path / "mine")
    user_steps(model, batches, monitor, optimizer)
    result = monitor.finish()
    assert result.steps == STEPS and result.diverged_at_step is None
    assert_same_telemetry(monitor.history, trainer.history)
    assert (monitor.history.column("grad/clip_coef") < 1).all()  # the clip fired: post != pre
    for p, q in zip(model.parameters(), trainer.engine.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)  # and trained the same weights


def test_monitor_run_record_matches_the_trainers(tmp_path, tmp_store):
    over = ["stabilizer=[warmup,clip]", "stabilizer.warmup.steps=3"]
    trainer, model, batches = reference(tmp_path, over)
    trainer.fit()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(model, optimizer, knobs(over), telemetry={"log_every": 5, "layer_every": 4},
                              tracking={"uri": tmp_store, "experiment": "mine", "tags": {"team": "a"}},
                              out_dir=tmp_path / "mine")
    user_steps(model, batches, monitor, optimizer)
    result = monitor.finish()
    ours, theirs = client(tmp_store).get_run(result.run_id), client(trainer.cfg.tracking.uri).get_run(trainer.run_id)
    per_step = {k for k in theirs.data.metrics if k.startswith(("grad/", "update_ratio/", "train/loss", "lr"))}
    summary = {"clip_rate", "skip_count", "steps", "time/step_ms"}
    assert per_step | summary <= set(ours.data.metrics)
    for key in ("grad/norm", "grad/norm_after", "lr", "grad/layer/head"):
        a, b = history(tmp_store, result.run_id, key), history(trainer.cfg.tracking.uri, trainer.run_id, key)
        assert [s for s, _ in a] == [s for s, _ in b], key
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-6, err_msg=key)
    tags = ours.data.tags
    assert tags["stabilizer"] == "warmup+clip" and tags["integration"] == "pytorch" and tags["team"] == "a"
    assert tags["diverged"] == theirs.data.tags["diverged"] == "false"
    assert ours.data.params["stabilizer.clip.max_norm"] == "1.0" and ours.data.params["optimizer.name"] == "Adam"
    assert sorted(artifact_paths(tmp_store, result.run_id)) == ["plots/grad_layer_heatmap.png", "plots/grad_norm.png"]
    assert ours.info.status == "FINISHED"


def test_no_host_sync_added_per_step(tmp_path):
    _, model, batches = reference(tmp_path, STACKS["all"], steps=9)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(model, optimizer, knobs(STACKS["all"]), telemetry={"log_every": 50, "layer_every": 2},
                              tracking=False, out_dir=tmp_path / "mine")
    user_steps(model, batches[:2], monitor, optimizer)  # warm-up: optimizer state exists, spike_skip's one host read
    counters = [s["step"] for s in optimizer.state.values() if torch.is_tensor(s.get("step"))]
    with forbid_host_sync(counters):  # crosses zclip's warmup, autoclip's window wrap and layer steps
        user_steps(model, batches[2:], monitor, optimizer)
    monitor.flush()
    assert monitor.history.steps == list(range(9))


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skip_is_recorded_and_not_a_divergence(tmp_path, fused):
    """The AMP recipe: unscale_, monitor.step, scaler.step. A step the scaler skips (inf gradient)
    never calls optimizer.step() (a fused optimizer is called and its kernel skips the update): the
    monitor records it as skipped, and the run goes on."""
    _, model, batches = reference(tmp_path, CLIP, steps=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused or None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    monitor = GradientMonitor(model, optimizer, ["clip"], tracking=False, out_dir=tmp_path / "mine")
    for i, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i == 2:
            model.head.bias.grad.fill_(math.inf)
        scaler.unscale_(optimizer)
        monitor.step(loss)
        scaler.step(optimizer)
        scaler.update()
    result = monitor.finish()
    h = monitor.history
    assert list(h.column("grad/skipped")) == [0.0, 0.0, 1.0, 0.0]
    assert math.isinf(h.column("grad/norm")[2]) and h.column("grad/norm_after")[2] == 0.0
    assert result.diverged_at_step is None and result.metrics["skip_count"] == 1.0


def test_divergence_is_recorded_and_visible_to_the_loop(tmp_path):
    _, model, batches = reference(tmp_path, [], steps=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, optimizer, None, telemetry={"log_every": 3}, tracking=False,
                              out_dir=tmp_path / "mine")
    for i, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if i == 4:
            model.head.bias.grad[0] = math.nan  # applied: the weights are NaN from here on
        monitor.step(loss)
        optimizer.step()
        if monitor.diverged is not None:
            break
    result = monitor.finish()
    assert result.diverged_at_step == 4 and i == 5  # seen at the first flush after it (log_every=3)
    assert monitor.history.steps == [0, 1, 2, 3, 4]  # nothing recorded after it
    assert result.metrics["diverged_at_step"] == result.diverged_at_step
    assert [p.name for p in result.plots] == ["grad_layer_heatmap.png", "grad_norm.png"]


@pytest.mark.parametrize("stabilizers,telemetry,key", [
    (["clip", "clipp"], None, "stabilizers"),
    ({"clip": {"max_norm": -1}}, None, "stabilizer.clip.max_norm"),
    ({"clip": {"max_nrm": 1}}, None, "stabilizer.clip.max_nrm"),
    ({"zclip": {"mode": "median"}}, None, "stabilizer.zclip.mode"),
    ({"clip": {"max_norm": "big"}}, None, "stabilizer.clip.max_norm"),
    ({"clip": 0.5}, None, "stabilizer.clip"),
    (["clip"], {"log_every": 0}, "telemetry.log_every"),
    (["clip"], {"log_evry": 5}, "telemetry.log_evry"),
])
def test_bad_settings_are_one_config_error_naming_the_key(stabilizers, telemetry, key):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError) as err:
        GradientMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1), stabilizers, telemetry=telemetry,
                        tracking=False)
    assert err.value.key == key
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("schedule", ["exponential", "lambda"])
def test_warmup_multiplies_any_user_schedule(tmp_path, schedule):
    """warmup scales the LR the user's scheduler set (chainable or not) by (t+1)/steps during the
    step and puts it back after; a step GradScaler skips counts, and leaves the LR alone."""
    _, model, batches = reference(tmp_path, [], steps=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = (torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9) if schedule == "exponential"
                 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.9 ** t))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    monitor = GradientMonitor(model, optimizer, {"warmup": {"steps": 4}}, tracking=False, out_dir=tmp_path / "m")
    for i, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i == 1:
            model.head.bias.grad.fill_(math.inf)  # the scaler skips this step: no optimizer.step(), no hook
        scaler.unscale_(optimizer)
        monitor.step(loss)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    monitor.finish()
    expected = [0.1 * 0.9 ** t * min(1.0, (t + 1) / 4) for t in range(8)]
    np.testing.assert_allclose(monitor.history.lr, expected, rtol=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** 8, rel=1e-12)
    assert list(monitor.history.column("grad/skipped")) == [0, 1, 0, 0, 0, 0, 0, 0]


def test_spike_skip_undoes_the_users_optimizer_step(tmp_path):
    """The user's loop always calls optimizer.step(); a step spike_skip skips is undone bit for bit,
    also the very first one (decided on the host: the optimizer then has no state to restore, so
    the state the step created is removed again)."""
    from test_stabilizers import assert_same, snapshot

    _, model, batches = reference(tmp_path, [], steps=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(model, optimizer, {"spike_skip": {"threshold": 1e6}}, tracking=False,
                              out_dir=tmp_path / "m")
    for i, (x, y) in enumerate(batches):
        before = snapshot(model, optimizer)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if i in (0, 4):
            model.head.bias.grad[0] = math.nan
        monitor.step(loss)
        optimizer.step()
        if i in (0, 4):
            assert_same(model, optimizer, before)
    monitor.finish()
    assert list(monitor.history.column("grad/skipped")) == [1, 0, 0, 0, 1, 0]
    assert all(float(s["step"]) == 4 for s in optimizer.state.values())  # 6 steps, 2 undone


def test_context_manager_marks_a_crashed_loop_failed(tmp_path, tmp_store):
    _, model, batches = reference(tmp_path, [], steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="user bug"):
        with GradientMonitor(model, optimizer, ["clip"], tracking={"uri": tmp_store}, out_dir=tmp_path / "m") as monitor:
            user_steps(model, batches, monitor, optimizer)
            raise RuntimeError("user bug")
    run = client(tmp_store).get_run(monitor.result.run_id)
    assert run.info.status == "FAILED" and run.data.metrics["steps"] == 3.0
    assert run.info.experiment_id == client(tmp_store).get_experiment_by_name("gradlab").experiment_id
