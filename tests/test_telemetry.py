"""Explosion telemetry: the early warning, the per-layer record, the plots, and what a
run that hits NaN/inf mid-way leaves behind."""
from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from conftest import artifact_paths, client, history, tiny_cfg
from gradlab.evaluation import evaluate
from gradlab.telemetry import History, STEP_KEYS, _growth_crossing, detect_explosion
from gradlab.training import Trainer, train


# ---------------------------------------------------------------- the detector on known sequences
def test_growth_crossing_finds_the_first_step_past_the_factor():
    values = np.array([1.0, 2.0, 1.5, 3.0, 40.0, 150.0, 1e6])
    assert _growth_crossing(values, 100.0, 10) == (5, 150.0)  # 150 / min(1, 2, 1.5, 3, 40)
    assert _growth_crossing(values, 100.0, 2)[0] == 6  # window 2: 150 / min(3, 40) < 100, 1e6 / 40 > 100
    assert _growth_crossing(values, 1e9, 10) == (None, 0.0)


def test_growth_crossing_treats_inf_as_a_crossing_and_skips_nan_and_zero():
    assert _growth_crossing(np.array([1.0, np.nan, 2.0, np.inf]), 100.0, 5)[0] == 3
    assert _growth_crossing(np.array([0.0, 0.0, 5.0]), 100.0, 5) == (None, 0.0)  # no positive baseline yet
    assert _growth_crossing(np.array([1.0, np.nan, np.nan]), 100.0, 5) == (None, 0.0)


def _history(global_norms, layer_norms):
    h = History()
    n = len(global_norms)
    rows = np.full((n, len(STEP_KEYS)), 1.0)
    rows[:, STEP_KEYS.index("grad/norm")] = global_norms
    h.steps, h.rows, h.lr = list(range(n)), [rows], [0.1] * n
    h.layer_grad = [np.asarray(layer_norms, dtype=float)]
    return h


def test_first_layer_is_the_one_that_crossed_first():
    # layer b crosses 100x at step 4 (not yet enough for the global norm); layer a jumps at step 5
    a = [1, 1, 1, 1, 1, 500, 1e4]
    b = [1, 1, 1, 20, 120, 130, 140]
    g = [math.hypot(x, y) for x, y in zip(a, b)]
    e = detect_explosion(_history(g, np.stack([a, b], 1)), ["a", "b"], 100.0, 10)
    assert e.step == 5 and e.first_layer == "b" and e.layer_step == 4


def test_first_layer_falls_back_to_the_largest_growth():
    # no single layer grows 100x, but together they push the global norm past 10x
    a = [1, 1, 1, 30]
    b = [1, 1, 1, 8]
    g = [math.hypot(x, y) for x, y in zip(a, b)]
    e = detect_explosion(_history(g, np.stack([a, b], 1)), ["a", "b"], 10.0, 10)
    assert e.step == 3 and e.first_layer == "a"


# ---------------------------------------------------------------- a real exploding run
@pytest.fixture(scope="module")
def explosion(tmp_path_factory):
    """The explode_deep_mlp preset with no stabilizer, shrunk to seconds (synthetic data,
    width 64) and with a small lr so the norm grows over several steps before the NaN."""
    tmp = tmp_path_factory.mktemp("explosion")
    cfg = tiny_cfg(tmp, "experiment=explode_deep_mlp", "model.width=64", "optimizer.lr=0.001",
                   "telemetry.plots=true", "telemetry.layer_every=3", steps=40)
    return train(cfg, tmp / "out")


def test_explosion_is_flagged_before_the_nan(explosion):
    r = explosion
    assert r.diverged and r.explosion_step is not None
    assert r.explosion_step < r.diverged_at_step
    assert r.explosion_first_layer and r.explosion_first_layer.startswith(("stem", "blocks.", "head"))
    run = client(r.tracking_uri).get_run(r.run_id)
    assert run.data.tags["exploding"] == "true"
    assert run.data.tags["explosion/step"] == str(r.explosion_step)
    assert run.data.tags["explosion/first_layer"] == r.explosion_first_layer
    assert run.data.metrics["explosion/step"] == r.explosion_step
    norms = [v for _, v in history(r.tracking_uri, r.run_id, "grad/norm")]
    assert all(math.isfinite(v) for v in norms[: r.explosion_step + 1])  # flagged while still finite


def test_explosion_run_has_both_plots(explosion):
    r = explosion
    arts = artifact_paths(r.tracking_uri, r.run_id)
    for name in ("plots/grad_layer_heatmap.png", "plots/grad_norm.png"):
        assert name in arts
        local = client(r.tracking_uri).download_artifacts(r.run_id, name)
        img = mpimg.imread(local)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400


def test_per_layer_points_every_layer_every_steps(explosion):
    r = explosion
    steps = r.steps  # kept up to and including the divergence step
    metrics = client(r.tracking_uri).get_run(r.run_id).data.metrics
    layers = [k for k in metrics if k.startswith("grad/layer/")]
    assert len(layers) == 21  # stem, 19 blocks, head
    for key in layers + [k for k in metrics if k.startswith("update_ratio/")]:
        h = history(r.tracking_uri, r.run_id, key)
        assert [s for s, _ in h] == list(range(0, steps, 3)), key


# ---------------------------------------------------------------- NaN mid-run
def test_nan_mid_run_leaves_a_complete_readable_record(tmp_path):
    """A weight turned inf after 7 healthy steps: the run is a recorded result with every
    metric up to that step, both plots, a checkpoint that evaluates, and strict JSON."""
    cfg = tiny_cfg(tmp_path, "telemetry.plots=true", "telemetry.log_every=4", steps=20)
    trainer = Trainer(cfg, tmp_path / "out")
    engine = trainer.engine
    step = engine.step

    def poisoned_step(x, y):
        if engine.step_count == 7:
            with torch.no_grad():
                engine.model.head.weight[0, 0] = float("inf")
        step(x, y)

    engine.step = poisoned_step
    r = trainer.fit()
    assert r.diverged and r.diverged_at_step == 7 and r.steps == 8
    uri = r.tracking_uri
    run = client(uri).get_run(r.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "true"
    loss = history(uri, r.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(8))
    assert all(math.isfinite(v) for _, v in loss[:7]) and not math.isfinite(loss[7][1])
    norm = history(uri, r.run_id, "grad/norm")
    assert not math.isfinite(norm[7][1]) or norm[7][1] > 1e300  # NaN, or inf stored as float max
    arts = artifact_paths(uri, r.run_id)
    assert {"plots/grad_layer_heatmap.png", "plots/grad_norm.png", "checkpoint/model.pt"} <= set(arts)
    metrics_file = tmp_path / "m.json"
    ev = evaluate(r.checkpoint, metrics_file, device="cpu")
    data = json.loads(metrics_file.read_text())  # strict JSON: a NaN test loss is written as null
    assert data["diverged"] is True and data["steps"] == 8
    assert 0.0 <= ev["test/accuracy"] <= 1.0
