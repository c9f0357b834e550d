"""Seeing it coming: the preflight report, the in-training sharpness gauge (no host sync, no effect
on the training itself) and the early warning; the false-alarm suite on real MNIST (slow)."""
from __future__ import annotations

import io

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from conftest import artifact_paths, cli, client, history, one_line_error, store_uri, tiny_cfg, tiny_overrides
from gradlab.foresight import HEALTHY_SUITE, Forecast, WarningWatch
from gradlab.preflight import OK, WILL_DIVERGE, growth, layer_scales, preflight, recurrent_growth
from gradlab.telemetry import STEP_KEYS, History
from gradlab.training import Trainer, train
from test_stabilizers import forbid_host_sync

UNSTABLE_SGD = ["optimizer=sgd", "optimizer.momentum=0.0", "optimizer.lr=20"]  # ratio >> 1 on the tiny MLP


# ---------------------------------------------------------------- preflight
def test_growth_is_the_largest_later_over_earlier_ratio():
    assert growth([4.0, 1.0, 3.0, 2.0]) == (3.0, 1, 2)
    assert growth([1.0, 2.0, math.nan, 8.0]) == (8.0, 0, 3)
    assert growth([3.0, 2.0, 1.0]) == (1.0, 0, 0)


def test_layer_scales_leave_the_model_alone():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scales = layer_scales(model, x, y)
    assert [s.name for s in scales] == ["1", "2", "4"]
    assert all(s.act_rms > 0 and s.grad_rms > 0 for s in scales)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recurrent_growth_is_the_largest_singular_value_of_the_jacobian(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "model=rnn", "model.hidden=12", "model.recurrent_gain=1.5",
                               "model.nonlinearity=relu"), tmp_path / "out")
    model = trainer.engine.model
    x = trainer.train_data.x[:4]
    expected = []
    for seq in model.as_sequence(x):
        def last(h0, seq=seq):
            return model.rnn(seq[None], h0.view(1, 1, -1))[1].flatten()
        jac = torch.autograd.functional.jacobian(last, torch.zeros(12))
        expected.append(float(torch.linalg.matrix_norm(jac, ord=2)))
    got = float(recurrent_growth(model, x, samples=4, iters=50, generator=torch.Generator().manual_seed(0)))
    assert got == pytest.approx(max(expected), rel=0.01)
    assert recurrent_growth(Trainer(tiny_cfg(tmp_path / "b"), tmp_path / "b" / "out").engine.model, x) is None


def test_preflight_verdicts(tmp_path):
    unstable = preflight(Trainer(tiny_cfg(tmp_path / "a", *UNSTABLE_SGD), tmp_path / "a" / "out"))
    assert unstable.ratio > 1 and unstable.verdict == WILL_DIVERGE
    assert unstable.table().splitlines()[-1] == "verdict: will diverge"
    sharp = next(r for r in unstable.risks if r.name == "sharpness")
    assert "optimizer.lr=" in sharp.remedy and "stabilizer=clip" in sharp.remedy
    bounded = preflight(Trainer(tiny_cfg(tmp_path / "b", *UNSTABLE_SGD, "stabilizer=clip"), tmp_path / "b" / "out"))
    assert bounded.verdict == OK
    assert next(r for r in bounded.risks if r.name == "sharpness").bounded_by == "clip"
    assert bounded.ratio == pytest.approx(unstable.ratio, rel=1e-3)  # the same measurement, judged bounded
    default = preflight(Trainer(tiny_cfg(tmp_path / "c"), tmp_path / "c" / "out"))
    assert default.verdict == OK and default.ratio < 1


def test_preflight_does_not_change_the_run(tmp_path):
    runs = [train(tiny_cfg(tmp_path / name, "trainer.deterministic=true", f"trainer.preflight={flag}"),
                  tmp_path / name / "out") for name, flag in (("off", "false"), ("on", "true"))]
    for key in ("train/loss", "grad/norm"):
        a, b = (history(r.tracking_uri, r.run_id, key) for r in runs)
        assert a == b, key
    on = runs[1]
    run = client(on.tracking_uri).get_run(on.run_id)
    assert run.data.tags["preflight/verdict"] == "OK"
    assert "preflight/stability_ratio" in run.data.metrics and "preflight/act_rms/head" in run.data.metrics
    assert "preflight.txt" in artifact_paths(on.tracking_uri, on.run_id)


def test_diagnose_cli(tmp_path):
    uri = store_uri(tmp_path / "store")
    rc, out, err = cli("diagnose.py", *tiny_overrides(tmp_path, *UNSTABLE_SGD), f"tracking.uri={uri}", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert lines[-2] == "verdict: will diverge" and lines[-1].startswith("run ")
    assert any(ln.startswith("sharpness ") and "will diverge" in ln for ln in lines)
    run = client(uri).get_run(lines[-1].split()[1])
    assert run.data.tags["kind"] == "preflight" and run.data.tags["preflight/verdict"] == "will diverge"
    assert run.data.metrics["preflight/stability_ratio"] > 1


def test_diagnose_cli_bad_config_is_one_line(tmp_path):
    result = cli("diagnose.py", *tiny_overrides(tmp_path), "telemetry.sharpness_every=-1", cwd=tmp_path)
    one_line_error(result, 2, "telemetry.sharpness_every")


# ---------------------------------------------------------------- the gauge
def test_gauge_every_n_steps(tmp_path):
    r = train(tiny_cfg(tmp_path, "optimizer=sgd", "telemetry.sharpness_every=4", "telemetry.log_every=5"),
              tmp_path / "out")
    lam = history(r.tracking_uri, r.run_id, "sharpness/lambda_max")
    ratio = history(r.tracking_uri, r.run_id, "sharpness/stability_ratio")
    assert [s for s, _ in lam] == [0, 4, 8] == [s for s, _ in ratio]
    limit = (2 + 2 * 0.9) / 0.05  # sgd defaults: lr 0.05, momentum 0.9
    assert all(q == pytest.approx(v / limit, rel=1e-5) for (_, v), (_, q) in zip(lam, ratio))
    assert all(v > 0 for _, v in lam)
    assert "sharpness/recurrent_growth" not in client(r.tracking_uri).get_run(r.run_id).data.metrics


def test_gauge_does_not_change_the_training(tmp_path):
    common = ["trainer.deterministic=true", "model=rnn", "model.hidden=16", "optimizer=adam"]
    runs = [train(tiny_cfg(tmp_path / str(n), *common, f"telemetry.sharpness_every={n}"), tmp_path / str(n) / "out")
            for n in (0, 2)]
    for key in ("train/loss", "grad/norm", "grad/norm_after"):
        a, b = (history(r.tracking_uri, r.run_id, key) for r in runs)
        assert a == b, key
    growth_points = history(runs[1].tracking_uri, runs[1].run_id, "sharpness/recurrent_growth")
    assert [s for s, _ in growth_points] == list(range(0, 12, 2))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("model", ["mlp", "rnn"])
def test_no_host_sync_with_the_gauge_on(tmp_path, model, optimizer):
    over = [f"optimizer={optimizer}", "telemetry.sharpness_every=2", "telemetry.log_every=50"]
    if model == "rnn":
        over += ["model=rnn", "model.hidden=16"]
    trainer = Trainer(tiny_cfg(tmp_path, *over), tmp_path / "out")
    engine, foresight = trainer.engine, trainer.foresight
    batches = list(trainer.order.batches(trainer.train_data))[:8]
    for step, (x, y) in enumerate(batches[:2]):  # warm-up: optimizer state, the gauge's cold start
        foresight.before_step(step, x, y)
        engine.step(x, y)
    counters = [s["step"] for s in engine.optimizer.state.values() if torch.is_tensor(s.get("step"))]
    with forbid_host_sync(counters):
        for step, (x, y) in enumerate(batches[2:], start=2):
            foresight.before_step(step, x, y)  # measures at 2, 4, 6
            engine.step(x, y)
    measured = foresight.gauge.flush()
    assert [m[0] for m in measured] == [0, 2, 4, 6]
    assert all(np.isfinite(m[2][:2]).all() for m in measured)


# ---------------------------------------------------------------- the warning
def watch(overrides=(), bound=None, layers=("a", "b")):
    from conftest import compose

    return WarningWatch(compose(["data=synthetic", *overrides]), list(layers), bound)


UNSTABLE_ROW = np.array([2.2, 1.1, math.nan, 0.2, 0.8])  # lambda, ratio, growth, layer shares


def test_stability_warning_at_initialization_names_the_layer_carrying_the_eigenvector():
    assert watch(["optimizer=sgd"]).from_gauge(0, 2.0, np.array([1.9, 0.95, math.nan, 0.7, 0.3])) is None
    hit = watch(["optimizer=sgd"]).from_gauge(0, 2.0, UNSTABLE_ROW)
    assert hit.step == 0 and hit.layer == "b" and "stability ratio 1.1 >= 1 at initialization" in hit.reason


def test_stability_warning_later_needs_two_measurements_in_a_row():
    w = watch(["optimizer=sgd"])
    below = np.array([1.0, 0.5, math.nan, 0.5, 0.5])
    assert [w.from_gauge(s, 2.0, r) for s, r in ((0, below), (10, UNSTABLE_ROW), (20, below))] == [None] * 3
    assert w.from_gauge(30, 2.0, UNSTABLE_ROW) is None
    hit = w.from_gauge(40, 2.0, np.full(5, math.nan))  # NaN: the measurement itself blew up
    assert hit.step == 40 and "two measurements in a row" in hit.reason and hit.layer == "n/a"
    again = watch(["optimizer=sgd"])
    again.load_state_dict(w.state_dict())  # the run of measurements above survives a resume
    assert again.from_gauge(50, 2.0, UNSTABLE_ROW) is not None


def test_no_stability_warning_under_a_bound_or_with_adam():
    assert watch(["optimizer=sgd"], bound="clip").from_gauge(0, 2.0, UNSTABLE_ROW) is None
    assert watch(["optimizer=adam"]).from_gauge(0, 2.0, UNSTABLE_ROW) is None


# ---------------------------------------------------------------- the forecast: the LR to come
@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer steps here
@pytest.mark.parametrize("overrides,start", [
    (["optimizer=sgd", "fault=[lr_spike]", "fault.lr_spike.at=30", "fault.lr_spike.length=5"], 10),
    (["optimizer=sgd", "stabilizer=warmup", "stabilizer.warmup.steps=20", "scheduler=cosine"], 3),
    (["optimizer=adamw", "scheduler=onecycle"], -10),  # 10 steps before the end: ahead stops at the last step
])
def test_schedule_ahead_is_the_schedule_to_come(tmp_path, overrides, start):
    trainer = Trainer(tiny_cfg(tmp_path, *overrides, steps=60), tmp_path / "out")
    schedule = trainer.engine.schedule
    start %= schedule.total_steps
    for _ in range(start):
        schedule.step()
    before = schedule.state_dict()
    seen = schedule.ahead(40)
    assert schedule.state_dict() == before  # the real schedulers were not stepped
    real = [schedule.lr]
    for _ in range(min(40, schedule.total_steps - 1 - start)):
        schedule.step()
        real.append(schedule.lr)
    assert seen == real and len(seen) > 1


FORECAST_ROW = np.array([2.2, 0.05, math.nan, 0.2, 0.8])  # lambda 2.2 under a limit of 44 now


def test_stability_forecast_warns_before_the_lr_rises():
    spike = Forecast(lr=0.05, peak=1.0, at=300, limit=2.0)  # the limit at the peak: under lambda
    assert watch(["optimizer=sgd"]).from_gauge(0, 44.0, FORECAST_ROW) is None  # the present alone: stable
    hit = watch(["optimizer=sgd"]).from_gauge(0, 44.0, FORECAST_ROW, spike)
    assert hit.step == 0 and hit.reason.startswith("stability forecast: LR x20 at step 300 (lr 1) crosses the limit: "
                                                   "ratio 1.1 >= 1 at initialization")
    w = watch(["optimizer=sgd"])
    assert w.from_gauge(100, 44.0, FORECAST_ROW, spike) is None  # later: two in a row, as for the present ratio
    assert w.forecast_only  # ... the second one soon after (Foresight asks the gauge to confirm)
    both = watch(["optimizer=sgd"])  # the present LR over the limit too: not forecast-only
    assert both.from_gauge(100, 2.0, UNSTABLE_ROW, spike) is None and not both.forecast_only
    for state in (w.state_dict(), both.state_dict()):  # checkpoints are read weights-only: plain Python values
        saved = io.BytesIO()
        torch.save(state, saved)
        assert torch.load(io.BytesIO(saved.getvalue()), weights_only=True)["forecast_only"] is state["forecast_only"]
    hit = w.from_gauge(200, 44.0, FORECAST_ROW, spike)
    assert hit.step == 200 and "at two measurements in a row" in hit.reason and hit.layer == "b"
    flat = Forecast(lr=0.05, peak=0.05, at=0, limit=44.0)  # no rise: the present rule, unchanged
    assert watch(["optimizer=sgd"]).from_gauge(0, 44.0, FORECAST_ROW, flat) is None
    present = watch(["optimizer=sgd"])
    assert present.from_gauge(100, 2.0, UNSTABLE_ROW, flat) is None and present.above and not present.forecast_only
    assert watch(["optimizer=sgd"], bound="clip").from_gauge(0, 44.0, FORECAST_ROW, spike) is None
    assert watch(["optimizer=adam"]).from_gauge(0, 44.0, FORECAST_ROW, spike) is None


def test_a_scheduled_lr_spike_is_warned_before_it(tmp_path):
    over = ["optimizer=sgd", "fault=[lr_spike]", "fault.lr_spike.at=8", "fault.lr_spike.factor=2000",
            "telemetry.sharpness_every=3"]
    r = train(tiny_cfg(tmp_path, *over, steps=14), tmp_path / "out")
    # gauges at 0 (sees steps 0-6) and 3 (sees step 8, where only the LR to come crosses the limit: measured
    # again one step later, CONFIRM x 3 rounded up to 1), 4: the second in a row; then every 3 steps again
    assert r.warning_step == 4
    gauged = [s for s, _ in history(r.tracking_uri, r.run_id, "sharpness/lambda_max")]
    assert gauged[:4] == [0, 3, 4, 6] and all(b - a == 3 for a, b in zip(gauged[3:], gauged[4:]))
    tags = client(r.tracking_uri).get_run(r.run_id).data.tags
    assert tags["warning/reason"].startswith("stability forecast: LR x2e+03 at step 8")
    forecast = history(r.tracking_uri, r.run_id, "sharpness/forecast_ratio")
    ratio = dict(history(r.tracking_uri, r.run_id, "sharpness/stability_ratio"))
    assert forecast[0][1] == pytest.approx(ratio[0]) and forecast[1][1] == pytest.approx(2000 * ratio[3], rel=1e-6)


def loss_history(losses) -> History:
    h = History(layers=["a", "b"])
    rows = np.full((len(losses), len(STEP_KEYS)), 1.0)
    rows[:, STEP_KEYS.index("train/loss")] = losses
    h.steps, h.rows = list(range(len(losses))), [rows]
    h.layer_grad = [np.tile([1.0, 1.0], (len(losses), 1))]
    h.layer_grad[0][:, 1] = np.linspace(1, 50, len(losses))
    return h


def test_loss_warning_when_the_loss_climbs_above_its_start():
    w = watch(["optimizer=adam"], bound="clip")  # applies to every run
    assert w.from_loss(loss_history([2.3] * 5 + list(np.linspace(2.3, 0.5, 30)))) is None
    climbing = [2.3] * 5 + [2.0, 2.5, 3.0, 3.5, 3.6, 3.7, 3.8, 4.0, 5.0, 6.0]
    hit = w.from_loss(loss_history(climbing))
    med = [np.median(climbing[i - 4:i + 1]) for i in range(4, len(climbing))]
    assert hit.step == 4 + next(i for i, m in enumerate(med) if m >= 1.5 * 2.3)
    assert hit.layer == "b" and "1.5 x its start" in hit.reason


def test_attention_warning_when_a_logit_saturates_the_softmax():
    w = watch(["optimizer=adam"], bound="clip", layers=("patch", "blocks.0.attn.qkv", "blocks.1.attn.qkv"))
    h = loss_history([2.3] * 8)
    h.probes = ["attn/logit_max/0", "attn/logit_max/1"]
    h.probe_rows = [np.array([[1.5, 1.4], [12.0, 41.0], [30.0, 99.9], [50.0, 180.0], [900.0, 3e4], [1e3, 4e4],
                              [1e3, 4e4], [1e3, 4e4]])]
    hit = w.from_attention(h)
    assert hit.step == 3 and hit.layer == "blocks.1.attn.qkv"
    assert hit.reason.startswith("attention logit 180 >= 100 in block 1: the softmax saturates")
    h.probe_rows = [np.array([[1.5, 1.4]] * 4 + [[np.nan, 2.0]] + [[3.0, 2.0]] * 3)]
    assert w.from_attention(h).step == 4  # a NaN logit saturates it too
    h.probe_rows = [np.array([[1.5, 1.4]] * 8)]
    assert w.from_attention(h) is None and watch().from_attention(loss_history([2.3] * 8)) is None  # no probes


def test_warning_tags_on_an_unstable_run(tmp_path):
    r = train(tiny_cfg(tmp_path, *UNSTABLE_SGD), tmp_path / "out")
    assert r.warning_step == 0
    run = client(r.tracking_uri).get_run(r.run_id)
    tags = run.data.tags
    assert tags["warning/step"] == "0" and tags["warned"] == "true"
    assert tags["warning/reason"].startswith("stability ratio")
    assert tags["warning/layer"] in ("layers.0.0", "head")
    assert run.data.metrics["warning/step"] == 0
    quiet = train(tiny_cfg(tmp_path / "quiet"), tmp_path / "quiet" / "out")
    assert quiet.warning_step is None
    assert client(quiet.tracking_uri).get_run(quiet.run_id).data.tags["warned"] == "false"


def test_attention_warning_from_a_transformer_run(tmp_path):
    """The ViT's attention probes reach the warning through the recorder (threshold lowered to what a
    fresh ViT's logits already reach, ~1-2); the default threshold stays silent on the same run."""
    low = train(tiny_cfg(tmp_path / "low", "model=vit", "telemetry.warn_attn_logit=0.5", steps=6), tmp_path / "low" / "o")
    tags = client(low.tracking_uri).get_run(low.run_id).data.tags
    assert low.warning_step == 0 and tags["warning/reason"].startswith("attention logit ")
    assert tags["warning/layer"].startswith("blocks.")
    default = train(tiny_cfg(tmp_path / "default", "model=vit", steps=6), tmp_path / "default" / "o")
    assert default.warning_step is None


# ---------------------------------------------------------------- real MNIST (slow)
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GRADLAB_DATA_MIRROR"), reason="set GRADLAB_DATA_MIRROR to the MNIST IDX files")
@pytest.mark.parametrize("overrides", HEALTHY_SUITE, ids=[" ".join(o) for o in HEALTHY_SUITE])
def test_no_warning_on_healthy_runs(tmp_path, overrides):
    from gradlab.config import compose_config

    cfg = compose_config([*overrides, "trainer.deterministic=true", "trainer.threads=1", "trainer.progress=false",
                          "telemetry.plots=false", f"data.root={os.environ.get('GRADLAB_DATA_ROOT', tmp_path / 'data')}",
                          f"tracking.uri={store_uri(tmp_path / 'store')}", f"trainer.checkpoint={tmp_path / 'model.pt'}"])
    r = train(cfg, tmp_path / "out")
    assert not r.diverged and r.warning_step is None


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GRADLAB_DATA_MIRROR"), reason="set GRADLAB_DATA_MIRROR to the MNIST IDX files")
@pytest.mark.parametrize("preset,expected", [("explode_deep_mlp", WILL_DIVERGE), ("explode_high_lr", WILL_DIVERGE)])
def test_preflight_on_the_presets(tmp_path, preset, expected):
    from gradlab.config import compose_config

    common = ["trainer.progress=false", f"data.root={os.environ.get('GRADLAB_DATA_ROOT', tmp_path / 'data')}"]
    alone = preflight(Trainer(compose_config([f"experiment={preset}", *common]), tmp_path / "a"))
    rescued = preflight(Trainer(compose_config([f"experiment={preset}", "stabilizer=clip", *common]), tmp_path / "b"))
    assert alone.verdict == expected and rescued.verdict == OK


def test_loss_warning_on_a_nan_row_names_no_layer_it_cannot_know():
    h = loss_history([2.3] * 10 + [math.nan])
    h.layer_grad[0][-1] = math.nan  # the diverged step: every layer's norm is NaN
    hit = watch(["optimizer=adam"]).from_loss(h)
    assert hit.step == 10 and hit.layer == "n/a"
