"""End-to-end through the CLI entry points on synthetic data (no download)."""
import json

import pytest

from mlflow import MlflowClient

from conftest import run_script, store_uri


@pytest.mark.slow  # the default suite's time budget (README: Tests)
def test_train_then_evaluate_cli(tmp_path):
    uri = store_uri(tmp_path / "store")
    ckpt = tmp_path / "model.pt"
    p = run_script("train.py", "data=synthetic", "stabilizer=[warmup,clip]", "trainer.max_steps=20",
                   "trainer.device=cpu", f"tracking.uri={uri}", f"trainer.checkpoint={ckpt}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = run_script("evaluate.py", f"checkpoint={ckpt}", f"metrics_file={tmp_path}/m.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    client = MlflowClient(uri)
    run_ = client.get_run(metrics["run_id"])
    assert run_.data.tags["stabilizer"] == "warmup+clip"
    assert run_.info.run_name == f"mlp-warmup+clip-s0-{run_.info.run_id[:6]}"
    assert len(client.get_metric_history(run_.info.run_id, "grad/norm")) == 20
    assert "test/accuracy" in run_.data.metrics
