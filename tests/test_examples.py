"""The examples in examples/ run as the README shows them (on the synthetic stand-in here, a few
steps each), train, and leave one finished MLflow run with gradlab's series and record."""
from __future__ import annotations

import importlib.util
import subprocess

import pytest

from conftest import PYTHON, ROOT, cli_env, client

EXAMPLES = {"pytorch_loop.py": None, "lightning_gru.py": "lightning", "hf_vit.py": "transformers"}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example_runs_and_records_a_run(tmp_path, script):
    if EXAMPLES[script] and importlib.util.find_spec(EXAMPLES[script]) is None:
        pytest.skip(f"needs {EXAMPLES[script]}: pip install -e '.[{'hf' if script == 'hf_vit.py' else 'lightning'}]'")
    env = cli_env()
    env.pop("GRADLAB_DATA_MIRROR", None)  # the synthetic stand-in: no fetch
    proc = subprocess.run([PYTHON, str(ROOT / "examples" / script), "--steps", "12", "--stabilizers", "clip"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "synthetic: finished after 12 steps" in proc.stdout, proc.stdout
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("gradlab-examples").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["stabilizer"] == "clip"
    assert {"grad/norm", "grad/norm_after", "grad/clip_coef", "clip_rate", "test/accuracy"} <= set(run.data.metrics)
    assert len(c.get_metric_history(run.info.run_id, "grad/norm")) == 12
