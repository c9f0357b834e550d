"""End-to-end training on synthetic data into a temporary MLflow store: what a run logs,
clipping, determinism, divergence as a result, and bit-exact resume."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT, artifact_paths, cli_env, client, history, run_script, store_uri, tiny_cfg
from gradlab import checkpoint
from gradlab.evaluation import evaluate
from gradlab.training import Trainer, train

STEP_SERIES = ["grad/norm", "grad/norm_after", "grad/clip_coef", "train/loss", "lr"]


def head_sha() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------- one run, everything it logs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """stabilizer=[clip,warmup] (given out of schema order on purpose), 23 steps, layer_every 4,
    log_every 5 (several flushes and a partial one); then evaluate()."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    cwd = os.getcwd()
    os.chdir(tmp)  # module-scoped: the autouse chdir fixture is function-scoped
    try:
        cfg = tiny_cfg(tmp, "stabilizer=[clip,warmup]", "stabilizer.warmup.steps=5",
                       "telemetry.log_every=5", "telemetry.layer_every=4", steps=23)
        result = train(cfg, tmp / "out")
        metrics_file = tmp / "metrics" / "test.json"
        ev = evaluate(result.checkpoint, metrics_file, batch_size=100, device="cpu")
    finally:
        os.chdir(cwd)
    return {"cfg": cfg, "result": result, "eval": ev, "metrics_file": metrics_file, "tmp": tmp}


def test_run_tags_and_name(tiny_run):
    r = tiny_run["result"]
    run = client(r.tracking_uri).get_run(r.run_id)
    tags = run.data.tags
    assert run.info.run_name == f"mlp-warmup+clip-s0-{run.info.run_id[:6]}"
    assert tags["model"] == "mlp"
    assert tags["optimizer"] == "adam"
    assert tags["data"] == "synthetic"
    assert tags["stabilizer"] == "warmup+clip"  # schema order, whatever the command-line order
    assert tags["seed"] == "0"
    assert tags["data_checksum"] == "synthetic-512-256-1234"
    assert tags["diverged"] == "false"
    # the commit of the code that ran, even though the run's cwd is a tmp dir outside the repo
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"]), tags["git_commit"]
    assert tags["git_commit"].startswith(head_sha())
    assert run.info.status == "FINISHED"


def test_run_names_are_unique_and_the_outcome_dataset_and_selection_are_recorded(tiny_run):
    """Two runs of one cell must not look alike in the runs table; the outcome is a tag column; the
    data is an MLflow dataset input; the stabilizer selection is a param (compare / parallel coordinates)."""
    r = tiny_run["result"]
    c = client(r.tracking_uri)
    run = c.get_run(r.run_id)
    assert run.data.tags["outcome"] in ("ok", "stalled")  # the default scenario: no remedy to credit
    assert run.data.params["stabilizer"] == "warmup+clip"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic" and dataset.dataset.digest == run.data.tags["data_checksum"]
    assert json.loads(dataset.dataset.profile)["num_rows"] == {"train": 512, "val": 256, "test": 256}
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_name_single_stabilizer_and_none(tmp_path):
    cfg = tiny_cfg(tmp_path, "stabilizer=clip", "seed=3", steps=2)
    r = train(cfg, tmp_path / "out")
    run = client(r.tracking_uri).get_run(r.run_id)
    assert run.info.run_name == f"mlp-clip-s3-{run.info.run_id[:6]}"
    assert run.data.tags["stabilizer"] == "clip"
    assert run.data.tags["seed"] == "3"
    cfg = tiny_cfg(tmp_path / "b", steps=2)
    r = train(cfg, tmp_path / "out_b")
    run = client(r.tracking_uri).get_run(r.run_id)
    assert run.info.run_name == f"mlp-none-s0-{run.info.run_id[:6]}"
    assert run.data.tags["stabilizer"] == "none"


def test_step_series_have_one_point_per_optimizer_step(tiny_run):
    r = tiny_run["result"]
    assert r.steps == 23
    for key in STEP_SERIES:
        h = history(r.tracking_uri, r.run_id, key)
        assert [s for s, _ in h] == list(range(23)), key
        assert all(math.isfinite(v) for _, v in h), key
    # warmup: lr ramps linearly (t+1)/5 * 1e-3 over 5 steps, then stays at the base lr
    lrs = [v for _, v in history(r.tracking_uri, r.run_id, "lr")]
    np.testing.assert_allclose(lrs[:6], [2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3], rtol=1e-6)
    assert lrs[-1] == pytest.approx(1e-3)


def test_per_layer_series_every_layer_every(tiny_run):
    r = tiny_run["result"]
    keys = client(r.tracking_uri).get_run(r.run_id).data.metrics
    layers = sorted(k for k in keys if k.startswith("grad/layer/"))
    assert layers == ["grad/layer/head", "grad/layer/layers.0.0"]
    for key in layers + ["update_ratio/head", "update_ratio/layers.0.0"]:
        h = history(r.tracking_uri, r.run_id, key)
        assert len(h) == math.ceil(23 / 4), key
        assert [s for s, _ in h] == [0, 4, 8, 12, 16, 20], key
        assert all(math.isfinite(v) and v > 0 for _, v in h), key
    # layer norms are the pre-stabilizer norms: their L2 sum is the global pre-clip norm
    norm = dict(history(r.tracking_uri, r.run_id, "grad/norm"))
    head = dict(history(r.tracking_uri, r.run_id, "grad/layer/head"))
    body = dict(history(r.tracking_uri, r.run_id, "grad/layer/layers.0.0"))
    for s in head:
        assert math.hypot(head[s], body[s]) == pytest.approx(norm[s], rel=1e-5)


def test_epoch_metrics_and_artifacts(tiny_run):
    r = tiny_run["result"]
    uri = r.tracking_uri
    # 512 images / batch 32 = 16 steps per epoch: one full epoch (logged at step 16) and the
    # partial one at the end of the run (step 23)
    for key in ["train/accuracy", "val/accuracy", "val/loss"]:
        h = history(uri, r.run_id, key)
        assert [s for s, _ in h] == [16, 23], key
        assert all(math.isfinite(v) for _, v in h), key
    for key in ["train/accuracy", "val/accuracy"]:
        assert all(0.0 <= v <= 1.0 for _, v in history(uri, r.run_id, key))
    arts = artifact_paths(uri, r.run_id)
    assert "config.yaml" in arts
    assert "checkpoint/model.pt" in arts
    assert r.checkpoint.exists()


def test_evaluate_logs_into_the_training_run(tiny_run):
    r, ev = tiny_run["result"], tiny_run["eval"]
    uri = r.tracking_uri
    runs = client(uri).search_runs([client(uri).get_run(r.run_id).info.experiment_id])
    assert len(runs) == 1  # no new run was created by evaluate()
    metrics = client(uri).get_run(r.run_id).data.metrics
    assert metrics["test/accuracy"] == pytest.approx(ev["test/accuracy"])
    assert metrics["test/loss"] == pytest.approx(ev["test/loss"])
    assert [s for s, _ in history(uri, r.run_id, "test/accuracy")] == [23]
    assert 0.0 <= ev["test/accuracy"] <= 1.0 and math.isfinite(ev["test/loss"])
    assert "plots/confusion_matrix.png" in artifact_paths(uri, r.run_id)
    assert client(uri).get_run(r.run_id).info.status == "FINISHED"
    data = json.loads(tiny_run["metrics_file"].read_text())
    assert data["run_id"] == r.run_id
    assert data["test"]["accuracy"] == pytest.approx(ev["test/accuracy"])
    assert data["test"]["loss"] == pytest.approx(ev["test/loss"])
    assert data["steps"] == 23 and data["diverged"] is False


@pytest.mark.parametrize("lr", ["0.05", "1e10"], ids=["finished", "diverged"])
def test_a_run_logs_its_test_result_as_evaluate_would(tmp_path, lr):
    """Trainer(test=True) (a matrix cell) records the test set from the weights in memory before its
    run closes: the same accuracy and loss as evaluate() from the checkpoint, one point each at the
    run's last step, the confusion plot, and the run still FINISHED."""
    cfg = tiny_cfg(tmp_path, "optimizer=sgd", f"optimizer.lr={lr}", steps=12)
    r = train(cfg, tmp_path / "out", test=True)
    uri = r.tracking_uri
    logged = client(uri).get_run(r.run_id)
    assert logged.info.status == "FINISHED"
    assert [s for s, _ in history(uri, r.run_id, "test/accuracy")] == [r.steps]
    assert "plots/confusion_matrix.png" in artifact_paths(uri, r.run_id)
    assert r.test_accuracy == logged.data.metrics["test/accuracy"]
    ev = evaluate(r.checkpoint, device="cpu", out_dir=tmp_path / "ev")
    assert ev["test/accuracy"] == r.test_accuracy
    assert ev["test/loss"] == pytest.approx(logged.data.metrics["test/loss"], nan_ok=True)
    assert r.diverged == (lr == "1e10")


# ---------------------------------------------------------------- clipping in a real run
def test_clip_bounds_every_applied_norm(tmp_path):
    # sgd at lr 0.5 drives the global norm well above max_norm=1 on this data
    cfg = tiny_cfg(tmp_path, "stabilizer=clip", "optimizer=sgd", "optimizer.lr=0.5", steps=20)
    r = train(cfg, tmp_path / "out")
    assert not r.diverged
    pre = [v for _, v in history(r.tracking_uri, r.run_id, "grad/norm")]
    post = [v for _, v in history(r.tracking_uri, r.run_id, "grad/norm_after")]
    coef = [v for _, v in history(r.tracking_uri, r.run_id, "grad/clip_coef")]
    assert len(pre) == len(post) == len(coef) == 20
    assert all(p <= 1.0 + 1e-6 for p in post)
    assert sum(n > 1.0 for n in pre) >= 5  # clipping actually fired, repeatedly
    for n, p, c in zip(pre, post, coef):
        assert p == pytest.approx(min(n, 1.0), rel=1e-5)
        assert c == pytest.approx(min(1.0, 1.0 / n), rel=1e-5)
    clip_rate = client(r.tracking_uri).get_run(r.run_id).data.metrics["clip_rate"]
    assert clip_rate == pytest.approx(sum(n > 1.0 for n in pre) / 20)


# ---------------------------------------------------------------- determinism
def test_deterministic_runs_are_identical(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = tiny_cfg(tmp_path / name, "trainer.deterministic=true", "stabilizer=[zclip]",
                       "stabilizer.zclip.warmup_steps=4", steps=12)
        runs.append(train(cfg, tmp_path / name / "out"))
    for key in ("train/loss", "grad/norm", "grad/norm_after"):
        a, b = (history(r.tracking_uri, r.run_id, key) for r in runs)
        assert len(a) == 12 and a == b, key  # exact float equality


# ---------------------------------------------------------------- divergence is a result
def test_divergence_is_recorded_not_raised(tmp_path):
    # lr 1e10 overflows the weights within a couple of steps: the loss becomes NaN
    cfg = tiny_cfg(tmp_path, "optimizer=sgd", "optimizer.lr=1e10", "telemetry.log_every=5", steps=20)
    r = train(cfg, tmp_path / "out")
    assert r.diverged
    at = r.diverged_at_step
    assert at is not None and 1 <= at < 5
    run = client(r.tracking_uri).get_run(r.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["diverged"] == "true"
    assert run.data.metrics["diverged_at_step"] == at
    assert r.steps == at + 1
    for key in ("train/loss", "grad/norm", "grad/norm_after", "lr"):
        h = history(r.tracking_uri, r.run_id, key)
        assert [s for s, _ in h] == list(range(at + 1)), key  # kept up to the step, nothing after
    loss = [v for _, v in history(r.tracking_uri, r.run_id, "train/loss")]
    norm = [v for _, v in history(r.tracking_uri, r.run_id, "grad/norm")]
    assert all(math.isfinite(v) for v in loss[:at]) and all(math.isfinite(v) for v in norm[:at])
    assert not (math.isfinite(loss[at]) and math.isfinite(norm[at]))
    assert "checkpoint/model.pt" in artifact_paths(r.tracking_uri, r.run_id)
    state = checkpoint.load(r.checkpoint, torch.device("cpu"), "checkpoint")
    assert state["diverged_at_step"] == at


def test_cli_exits_zero_on_divergence(tmp_path):
    uri = store_uri(tmp_path / "store")
    proc = run_script("train.py", "data=synthetic", "trainer.device=cpu", "trainer.max_steps=10",
                      "telemetry.plots=false", "optimizer=sgd", "optimizer.lr=1e20", "model.hidden_sizes=[32]",
                      f"tracking.uri={uri}", f"trainer.checkpoint={tmp_path / 'model.pt'}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diverged at step" in proc.stdout
    runs = client(uri).search_runs([client(uri).get_experiment_by_name("gradlab").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.tags["diverged"] == "true" and runs[0].info.status == "FINISHED"
    assert "diverged_at_step" in runs[0].data.metrics


# ---------------------------------------------------------------- bit-exact resume
RESUME_CASES = {
    "zclip+spike_skip": ["stabilizer=[zclip,spike_skip]", "stabilizer.zclip.warmup_steps=5",
                         "stabilizer.spike_skip.min_history=5", "stabilizer.spike_skip.window=8"],
    "autoclip": ["stabilizer=[autoclip]", "stabilizer.autoclip.window=8", "stabilizer.autoclip.percentile=50"],
    # crosses resets at 7, 14, 21 and their LR warm-ups, and AdaGC's warm-up, on StableAdamW
    "adagc+spam": ["optimizer=stable_adamw", "stabilizer=[adagc,spam]", "stabilizer.adagc.warmup_steps=5",
                   "stabilizer.spam.reset_interval=7", "stabilizer.spam.warmup_steps=3",
                   "stabilizer.spam.clip_delay=2", "stabilizer.spam.threshold=2"],
    "sgd+gauge": ["optimizer=sgd", "telemetry.sharpness_every=5"],  # the gauge's warm start is in the checkpoint
    # injected faults on both sides of the split (their steps come from the seed and the step alone),
    # and a model whose probes (attention logits) are part of the history
    "faults+vit": ["model=vit", "model.dim=16", "model.heads=2", "model.qk_norm=true", "loss.z_loss=1e-3",
                   "fault=[bad_batch,lr_spike,shift]", "fault.bad_batch.at=[14]", "fault.bad_batch.prob=0.2",
                   "fault.bad_batch.kind=labels", "fault.lr_spike.at=10", "fault.lr_spike.length=4",
                   "fault.shift.at=18", "stabilizer=clip"],
}
EXTRA_KEYS = {"faults+vit": ["fault/active", "attn/logit_max/0", "attn/logit_max/1", "lr"]}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_exact(tmp_path, case):
    # 16 steps per epoch: the straight run crosses an epoch boundary, the split at 12 is mid-epoch,
    # after every stabilizer's warmup, with the history windows (8) already wrapped
    n = 24
    common = [*RESUME_CASES[case], "scheduler=none", "telemetry.log_every=5", "telemetry.layer_every=3"]
    straight = train(tiny_cfg(tmp_path / "straight", *common, steps=n), tmp_path / "straight" / "out")

    split = tmp_path / "split"
    half = train(tiny_cfg(split, *common, f"trainer.checkpoint={split / 'half.pt'}", steps=n // 2), split / "out1")
    assert half.steps == n // 2
    resumed = train(tiny_cfg(split, *common, f"trainer.resume={split / 'half.pt'}",
                             f"trainer.checkpoint={split / 'full.pt'}", steps=n), split / "out2")
    # the finished 12-step run is left as it was; its continuation is a new run holding the whole history
    assert resumed.run_id != half.run_id and resumed.steps == n
    c = client(resumed.tracking_uri)
    assert c.get_run(resumed.run_id).data.tags["resumed_from"] == half.run_id
    assert c.get_run(resumed.run_id).data.tags["resume/changed"] == "trainer.max_steps: 12 -> 24"
    assert [s for s, _ in history(half.tracking_uri, half.run_id, "grad/norm")] == list(range(n // 2))

    for key in ("train/loss", "grad/norm", "grad/norm_after", "grad/skipped", *EXTRA_KEYS.get(case, [])):
        a = history(straight.tracking_uri, straight.run_id, key)
        b = history(resumed.tracking_uri, resumed.run_id, key)
        assert [s for s, _ in a] == list(range(n)), key
        assert a == b, key  # bit-for-bit (exact float equality, step by step)
    every = int(c.get_run(resumed.run_id).data.params["telemetry.sharpness_every"])
    for key in ("sharpness/lambda_max", "sharpness/stability_ratio"):  # the gauge resumes warm, as it was
        a = history(straight.tracking_uri, straight.run_id, key)
        assert [s for s, _ in a] == list(range(0, n, every)), key
        assert a == history(resumed.tracking_uri, resumed.run_id, key), key
    sa = checkpoint.load(straight.checkpoint, torch.device("cpu"), "checkpoint")
    sb = checkpoint.load(resumed.checkpoint, torch.device("cpu"), "checkpoint")
    assert torch.equal(sa["history"]["rows"].nan_to_num(), sb["history"]["rows"].nan_to_num())
    for k, v in sa["engine"]["model"].items():
        assert torch.equal(v, sb["engine"]["model"][k]), k
    assert client(resumed.tracking_uri).get_run(resumed.run_id).info.status == "FINISHED"


def test_z_loss_adds_palm_log_z_squared_to_the_objective(tmp_path):
    """loss.z_loss = c: backward differentiates CE + c * mean(logsumexp(logits)^2); the logged loss is the CE."""
    from gradlab.engine import objective

    trainer = Trainer(tiny_cfg(tmp_path, "loss.z_loss=0.01", steps=1), tmp_path / "out")
    model, cfg_loss = trainer.engine.model, trainer.cfg.loss
    x, y = next(trainer.train_data.batches(32))
    logits = model(x)
    ce = torch.nn.functional.cross_entropy(logits, y)
    got = torch.autograd.grad(objective(ce, logits, model, cfg_loss), list(model.parameters()), retain_graph=True)
    z = torch.log(torch.exp(logits.double()).sum(-1))
    want = torch.autograd.grad(ce + 0.01 * (z ** 2).mean().float(), list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    trainer.engine.step(x, y)
    trainer.engine.recorder.flush()
    assert trainer.history.column("train/loss")[0] == pytest.approx(float(ce.detach()), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA")
def test_fp16_without_grad_scaler_applies_an_overflowed_step(tmp_path):
    """trainer.grad_scaler=false (fp16_overflow's failure): no loss scaling, an inf step is applied
    and the run is diverged; with the GradScaler (the default) the same step is skipped."""
    common = ["trainer.device=cuda", "trainer.precision=fp16", "optimizer=sgd", "fault=bad_batch",
              "fault.bad_batch.at=[4]", "fault.bad_batch.kind=extreme", "fault.bad_batch.factor=1e5"]
    bare = Trainer(tiny_cfg(tmp_path / "a", *common, "trainer.grad_scaler=false", steps=8), tmp_path / "a" / "out")
    assert not bare.engine.scaler.is_enabled()
    assert bare.fit().diverged_at_step == 4
    scaled = Trainer(tiny_cfg(tmp_path / "b", *common, steps=8), tmp_path / "b" / "out")
    r = scaled.fit()
    assert not r.diverged and scaled.history.column("grad/skipped")[4] == 1.0


def test_resume_from_missing_checkpoint_is_a_config_error(tmp_path):
    from gradlab.config import ConfigError

    with pytest.raises(ConfigError) as err:
        Trainer(tiny_cfg(tmp_path, f"trainer.resume={tmp_path / 'nope.pt'}"), tmp_path / "out")
    assert err.value.key == "trainer.resume"


# ---------------------------------------------------------------- real MNIST, end to end
@pytest.mark.skipif(not os.environ.get("GRADLAB_DATA_MIRROR"), reason="set GRADLAB_DATA_MIRROR to the MNIST IDX files")
def test_real_mnist_pipeline(tmp_path):
    uri = store_uri(tmp_path / "store")
    ckpt = tmp_path / "models" / "model.pt"
    env = cli_env(GRADLAB_DATA_MIRROR=os.environ["GRADLAB_DATA_MIRROR"])
    proc = run_script("train.py", "stabilizer=clip", "trainer.max_steps=300", "trainer.device=cpu",
                      f"data.root={tmp_path / 'data'}", f"tracking.uri={uri}", f"trainer.checkpoint={ckpt}",
                      cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "data" / "prepared" / "mnist-val5000-seed0.pt").exists()
    metrics_file = tmp_path / "metrics" / "test.json"
    proc = run_script("evaluate.py", f"checkpoint={ckpt}", f"metrics_file={metrics_file}", "device=cpu",
                      cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = client(uri).search_runs([client(uri).get_experiment_by_name("gradlab").experiment_id])[0]
    rid = run.info.run_id
    assert run.info.run_name == f"mlp-clip-s0-{run.info.run_id[:6]}" and run.data.tags["data"] == "mnist"
    pre = [v for _, v in history(uri, rid, "grad/norm")]
    post = [v for _, v in history(uri, rid, "grad/norm_after")]
    assert len(pre) == len(post) == 300
    assert all(p <= 1.0 + 1e-6 for p in post)
    assert any(n > 1.0 for n in pre)
    acc = run.data.metrics["test/accuracy"]
    assert acc > 0.9
    assert json.loads(metrics_file.read_text())["test"]["accuracy"] == pytest.approx(acc)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GRADLAB_DATA_MIRROR"), reason="set GRADLAB_DATA_MIRROR to the MNIST IDX files")
@pytest.mark.parametrize("preset", ["explode_deep_mlp", "explode_rnn", "explode_high_lr"])
def test_real_mnist_preset_explodes_and_clip_rescues_it(tmp_path, preset):
    """The README's 5-seed claim, for seed 0: no stabilizer fails, clipping reaches >= 90%."""
    from gradlab.config import compose_config

    results = {}
    for stabilizer in ("none", "clip"):
        cfg = compose_config([f"experiment={preset}", f"stabilizer={stabilizer}", "trainer.device=cpu",
                              "trainer.progress=false", "telemetry.plots=false", f"data.root={tmp_path / 'data'}",
                              f"tracking.uri={store_uri(tmp_path / 'store')}",
                              f"trainer.checkpoint={tmp_path / stabilizer / 'model.pt'}"])
        r = train(cfg, tmp_path / stabilizer)
        results[stabilizer] = (r, evaluate(r.checkpoint, device="cpu")["test/accuracy"])
    none, none_acc = results["none"]
    assert none.diverged or none_acc < 0.5
    assert none.explosion_step is not None
    clipped, clip_acc = results["clip"]
    assert not clipped.diverged and clip_acc >= 0.9


def test_a_run_with_free_form_tags_resumes(tmp_path):
    """A matrix or search child carries tracking.tags (matrix=..., matrix/cell=...); its checkpoint
    resumes like any other (a matrix cell whose job died continues from it)."""
    cfg = tiny_cfg(tmp_path, steps=6)
    cfg.tracking.tags = {"matrix": "parent", "matrix/cell": 3}
    first = train(cfg, tmp_path / "first")
    again = train(tiny_cfg(tmp_path, f"trainer.resume={first.checkpoint}", steps=10), tmp_path / "again")
    assert again.steps == 10
    assert [s for s, _ in history(first.tracking_uri, again.run_id, "grad/norm")] == list(range(10))


def test_a_run_stops_within_two_steps_of_its_divergence(tmp_path):
    """No training on NaN until the next flush (log_every 50 > the 40-step budget here): the loop
    reads the engine's divergence flag (one step late on CUDA) and stops; MLflow's history ends at
    the divergence step."""
    trainer = Trainer(tiny_cfg(tmp_path, "optimizer=sgd", "optimizer.lr=1e12", "telemetry.log_every=50", steps=40),
                      tmp_path / "out")
    result = trainer.fit()
    assert result.diverged and result.diverged_at_step < 10
    assert trainer.engine.step_count <= result.diverged_at_step + 2
    assert [s for s, _ in history(result.tracking_uri, result.run_id, "grad/norm")][-1] == result.diverged_at_step
