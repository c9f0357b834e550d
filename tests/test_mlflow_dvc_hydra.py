"""MLflow, DVC and Hydra used the way their users expect: runs land in the right experiment and say
what happened without being opened, matrix children keep the store small, `dvc exp run -S key=value`
works, Hydra's --help shows only gradlab's groups and its run log holds gradlab's messages."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, artifact_paths, cli, cli_env, client, compose, store_uri, tiny_overrides
from gradlab.runs import ParentRun
from gradlab.training import train


def test_mlflow_run_lands_in_the_gradlab_experiment(tmp_path, monkeypatch):
    """`mlflow run . -e main` pre-creates its run in the Default experiment; the record goes to
    `gradlab`, and the launcher's run points at it."""
    uri = store_uri(tmp_path / "store")
    c = client(uri)
    launcher = c.create_run("0").info.run_id  # experiment 0: Default
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    r = train(compose(tiny_overrides(tmp_path, steps=4)), tmp_path / "out")
    run = c.get_run(r.run_id)
    assert c.get_experiment(run.info.experiment_id).name == "gradlab" and r.run_id != launcher
    assert run.data.tags["gradlab.launched_by"] == launcher
    assert c.get_run(launcher).data.tags["gradlab.moved_to"].startswith(r.run_id)
    assert "MLFLOW_RUN_ID" not in os.environ  # taken once: a multirun's next job gets a run of its own


def test_launcher_run_in_the_gradlab_experiment_is_adopted(tmp_path, monkeypatch):
    uri = store_uri(tmp_path / "store")
    c = client(uri)
    from gradlab.tracking import experiment_id

    launcher = c.create_run(experiment_id(c, "gradlab")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    r = train(compose(tiny_overrides(tmp_path, steps=4)), tmp_path / "out")
    assert r.run_id == launcher


def test_outcome_tag(tmp_path):
    """outcome: diverged | stalled | rescued | ok, readable as a column in the runs table."""
    cases = {"diverged": ["optimizer=sgd", "optimizer.lr=1e10", "scenario=blowup"],
             "rescued": ["optimizer=sgd", "optimizer.lr=0.5", "scenario=calm", "stabilizer=clip"],
             "stalled": ["optimizer=sgd", "optimizer.lr=1e-9", "optimizer.momentum=0"],
             "ok": []}
    for outcome, overrides in cases.items():
        r = train(compose(tiny_overrides(tmp_path / outcome, *overrides, steps=30)), tmp_path / outcome / "out")
        assert client(r.tracking_uri).get_run(r.run_id).data.tags["outcome"] == outcome, (outcome, r.val_accuracy)


def test_matrix_and_search_children_keep_checkpoints_out_of_the_store(tmp_path):
    uri = store_uri(tmp_path / "store")
    base = tiny_overrides(tmp_path, steps=4)
    with ParentRun(uri, "kids", "parent", "matrix", {}) as parent:
        _, quiet = parent.child(base, tmp_path / "quiet")
        _, kept = parent.child([*base, "trainer.log_checkpoint=true"], tmp_path / "kept")
    assert "checkpoint/model.pt" not in artifact_paths(uri, quiet.run_id)
    assert quiet.checkpoint.exists()  # still on disk for the matrix's evaluation
    assert "checkpoint/model.pt" in artifact_paths(uri, kept.run_id)


@pytest.mark.slow
def test_log_model_is_an_mlflow_model_with_a_signature(tmp_path):
    import mlflow
    import numpy as np

    r = train(compose(tiny_overrides(tmp_path, "trainer.log_model=true", steps=4)), tmp_path / "out")
    mlflow.set_tracking_uri(r.tracking_uri)
    info = mlflow.models.get_model_info(f"runs:/{r.run_id}/model")
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 28, 28)
    model = mlflow.pyfunc.load_model(f"runs:/{r.run_id}/model")
    out = model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32))
    assert np.asarray(out).shape == (3, 10)


def test_system_metrics_on_request(tmp_path, monkeypatch):
    from gradlab import training

    monkeypatch.setattr(training, "SYSTEM_METRICS_EVERY_S", 0.05)  # the tiny run lasts about 0.3 s
    cfg = compose(tiny_overrides(tmp_path, "tracking.system_metrics=true", "telemetry.plots=true", steps=200))
    r = train(cfg, tmp_path / "out")
    metrics = client(r.tracking_uri).get_run(r.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)


def test_help_shows_gradlab_groups_not_the_internal_schema():
    rc, out, err = cli("train.py", "--help")
    assert rc == 0 and "schema" not in out + err
    for group in ("model", "optimizer", "stabilizer", "experiment"):
        assert f"  {group}" in out
    assert "deep_mlp" in out and "spike_skip" in out


def test_hydra_run_log_holds_gradlabs_messages(tmp_path):
    rc, out, err = cli("train.py", *tiny_overrides(tmp_path, steps=4), cwd=tmp_path)
    assert rc == 0, err[-2000:]
    (log,) = list((tmp_path / "outputs").glob("*/*/train.log"))
    text = log.read_text()
    assert "[gradlab][INFO]" in text and "from scratch" in text and "ok, 4 steps" in text


def test_progress_lines_without_a_terminal(tmp_path, monkeypatch, capsys):
    """dvc repro, CI or a log file: a line every PROGRESS_EVERY_S, so the stage is never silent long."""
    import logging

    from gradlab import training

    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("gradlab").addHandler(handler)
    logging.getLogger("gradlab").setLevel(logging.INFO)
    try:
        train(compose(tiny_overrides(tmp_path, "telemetry.log_every=5", "telemetry.sharpness_every=0",
                                     "trainer.progress=true", steps=20)),
              tmp_path / "out")
    finally:
        logging.getLogger("gradlab").removeHandler(handler)
    lines = [r.getMessage() for r in records if r.getMessage().startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["5/20", "10/20", "15/20", "16/20", "20/20"]
    assert "train/loss" in lines[0] and "grad/norm" in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GRADLAB_DATA_MIRROR"), reason="set GRADLAB_DATA_MIRROR to the MNIST IDX files")
def test_dvc_exp_run_with_natural_params_then_exp_show(tmp_path):
    """`dvc exp run -S train.seed=1 -S train.stabilizer=clip` in a clone; `dvc exp show` has its test accuracy."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    env = cli_env(GRADLAB_DATA_MIRROR=os.environ["GRADLAB_DATA_MIRROR"], MLFLOW_TRACKING_URI=store_uri(tmp_path / "s"),
                  PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
    dvc = [str(Path(PYTHON).parent / "dvc")]
    proc = subprocess.run([*dvc, "exp", "run", "evaluate", "-S", "train.seed=1", "-S", "train.stabilizer=clip",
                           "-S", 'train.extra="trainer.max_steps=30"'], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shown = subprocess.run([*dvc, "exp", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    text = json.dumps(json.loads(shown.stdout))
    assert '"accuracy"' in text and "metrics/test.json" in text
    exps = [e for e in json.loads(shown.stdout) if e.get("experiments")]
    assert exps, shown.stdout[-2000:]
    shutil.rmtree(repo, ignore_errors=True)
