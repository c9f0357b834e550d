"""gradlab on the engines a lab already runs, for real: submitit jobs for the matrix, an MLflow
tracking server on PostgreSQL, an Optuna study shared through PostgreSQL, torchrun from the CLI.

Marked ``cluster`` (``make test-cluster``; CI runs it after ``make test``): each test starts real
processes (a PostgreSQL cluster made with initdb/pg_ctl in a temporary directory, ``mlflow
server``, submitit's local executor, torchrun). A test whose engine is not installed is skipped
with the reason (``apt-get install postgresql``, ``pip install -e '.[cluster]'``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, SRC, TINY, cli_env, client, history, store_uri
from gradlab.matrix import run_matrix, spec_from_dict
from gradlab.report import select_runs, write_report

pytestmark = pytest.mark.cluster

SCENARIOS = [  # as tests/test_report.py: calm trains and clip fires, blowup diverges without a remedy
    {"name": "calm", "experiment": None, "overrides": ["optimizer=sgd", "optimizer.lr=0.5"]},
    {"name": "blowup", "experiment": None, "overrides": ["optimizer=sgd", "optimizer.lr=1e10"]}]
COMMON = ["data=synthetic", "trainer.max_steps=8", "trainer.device=cpu", "trainer.deterministic=true",
          "trainer.threads=1", "telemetry.plots=false", "telemetry.log_every=4", "trainer.progress=false", *TINY]
SPEC = spec_from_dict({"experiment": "cluster-matrix", "scenarios": SCENARIOS, "stabilizers": ["none", "clip"],
                       "seeds": [0, 1], "overrides": COMMON})
TABLE = ["test_accuracy_mean", "test_accuracy_std", "divergence_rate", "diverged_at_step_median", "grad_norm_max",
         "clip_rate"]


def submitit_spec(**kw):
    pytest.importorskip("submitit", reason="submitit is not installed: pip install -e '.[cluster]'")
    from gradlab.cluster import ClusterSpec

    return ClusterSpec(executor="local", **kw)


def matrix_report(tmp: Path, name: str, uri: str, spec=SPEC, **kw):
    result = run_matrix(spec, tmp / f"{name}.json", uri=uri, log=kw.pop("log", lambda line: None), **kw)
    return result, write_report(select_runs(tmp / f"{name}.json"), tmp / name).table


def steps_of(uri: str, run_id: str, key: str = "grad/norm") -> list:
    return [s for s, _ in history(uri, run_id, key)]


# ---------------------------------------------------------------- the matrix as submitit jobs
def test_matrix_on_submitit_gives_the_loops_report(tmp_path):
    """8 cells in 2 local submitit jobs: one parent, every child under it, and the same report
    table (accuracies to the last digit, same seeds, pinned threads) as the in-process loop."""
    cluster = submitit_spec(jobs=2)
    uri = store_uri(tmp_path / "store")
    loop, expected = matrix_report(tmp_path, "loop", uri)
    jobs, table = matrix_report(tmp_path, "jobs", uri, cluster=cluster, workdir=tmp_path / "work")
    for column in TABLE:
        assert table[column].equals(expected[column]), column
    assert len(jobs["run_ids"]) == 8 and not jobs["failed"]
    c = client(uri)
    for run_id in jobs["run_ids"]:
        assert c.get_run(run_id).data.tags["mlflow.parentRunId"] == jobs["parent_run_id"]
    assert c.get_run(jobs["parent_run_id"]).data.params["executor"] == "local"
    assert len(list((tmp_path / "work" / "submitit").rglob("*_0_log.out"))) == 2  # two jobs, not eight


def test_a_killed_cell_is_run_again_and_the_report_is_complete(tmp_path):
    """kill -9 the process training a cell (found by its run's gradlab.pid tag) after its first
    checkpoint: the job dies, the cell goes out again, continues from its checkpoint in the same
    MLflow run, and every cell ends with one point per step."""
    cluster = submitit_spec(jobs=2, retries=2)
    uri = store_uri(tmp_path / "store")
    spec = spec_from_dict({"experiment": "kill", "scenarios": SCENARIOS[:1], "stabilizers": ["none", "clip"],
                           "seeds": [0, 1], "overrides": [*COMMON, "trainer.max_steps=400", "trainer.epochs=100",
                                                          "trainer.checkpoint_every=20", "telemetry.log_every=10"]})
    lines, out = [], {}

    def run():
        out["result"], out["table"] = matrix_report(tmp_path, "kill", uri, spec, cluster=cluster,
                                                    workdir=tmp_path / "work", log=lines.append)

    thread = threading.Thread(target=run)
    thread.start()
    killed = kill_a_running_cell(uri, "kill", thread)
    thread.join(timeout=600)
    result = out["result"]
    assert killed is not None, lines
    assert not result["failed"] and len(result["run_ids"]) == 4, ([f.get("error") for f in result["failed"]], lines)
    assert any("ended early" in line for line in lines) and any("submitting them again" in line for line in lines)
    assert killed in result["run_ids"]  # continued in the same run
    for run_id in result["run_ids"]:
        assert steps_of(uri, run_id) == list(range(400))
    tags = client(uri).get_run(killed).data.tags
    assert tags["resume/count"] == "1" and int(tags["resume/from_step"]) >= 20
    assert out["table"].test_accuracy_mean.notna().all()


def kill_a_running_cell(uri: str, experiment: str, thread: threading.Thread, points: int = 40):
    """The run id of a child killed with SIGKILL once it has logged ``points`` steps."""
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline:
        c = client(uri)
        exp = c.get_experiment_by_name(experiment)
        runs = c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' AND tags.matrix != ''") if exp else []
        for run in runs:
            if len(c.get_metric_history(run.info.run_id, "grad/norm")) >= points:
                os.kill(int(run.data.tags["gradlab.pid"]), signal.SIGKILL)
                return run.info.run_id
        time.sleep(0.1)
    return None


# ---------------------------------------------------------------- MLflow on PostgreSQL
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A throwaway PostgreSQL cluster (initdb/pg_ctl) and ``mlflow server`` on it, on free ports."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[cluster]'")
    from gradlab.errors import StorageError
    from gradlab.server import free_port, pg_bin, start_pair

    try:
        pg_bin("initdb")
    except StorageError as exc:
        pytest.skip(f"{exc}: the PostgreSQL tests need it")
    pg_data = Path(tempfile.mkdtemp(prefix="gradlab-pg-"))  # not under pytest's 0700 tmp: PostgreSQL's user reads it
    pg_data.chmod(0o755)
    pg, srv = start_pair(tmp_path_factory.mktemp("server"), free_port(), free_port(), pg_data=pg_data / "data")
    yield {"pg": pg, "server": srv, "uri": srv.uri}
    srv.stop()
    pg.stop()
    shutil.rmtree(pg_data, ignore_errors=True)


def train_process(tmp: Path, uri: str, seed: int, steps: int, **env) -> subprocess.Popen:
    args = ["data=synthetic", f"trainer.max_steps={steps}", "trainer.epochs=100000", "trainer.device=cpu", "telemetry.plots=false",
            "trainer.progress=false", "telemetry.log_every=10", f"seed={seed}", "stabilizer=clip", *TINY,
            f"trainer.checkpoint={tmp / f'model{seed}.pt'}", "tracking.experiment=many-writers"]
    return subprocess.Popen([PYTHON, str(SRC / "train.py"), *args], cwd=tmp, env=cli_env(MLFLOW_TRACKING_URI=uri, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_eight_trainings_and_a_matrix_log_into_the_server(server, tmp_path):
    """8 training processes started at once plus a small matrix, all on MLFLOW_TRACKING_URI=http://...:
    every run has exactly one grad/norm point per step, and compare.py builds the report from the server."""
    uri = server["uri"]
    procs = [train_process(tmp_path, uri, seed, 60) for seed in range(8)]
    matrix = subprocess.Popen([PYTHON, str(ROOT / "pipelines" / "matrix.py"), "--params", str(ROOT / "params.yaml"),
                               "--scenarios", "explode_high_lr",
                               "--stabilizers", "none", "clip", "--seeds", "0", "--out", str(tmp_path / "runs.json"),
                               "--", "data=synthetic", "trainer.max_steps=20", "telemetry.plots=false", *TINY],
                              cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    for p in [*procs, matrix]:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("many-writers").experiment_id])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert steps_of(uri, run.info.run_id) == list(range(60))
    listed = json.loads((tmp_path / "runs.json").read_text())
    assert listed["tracking_uri"] == uri and len(listed["run_ids"]) == 2
    for record in listed["runs"]:
        assert record["steps"] >= 10 and steps_of(uri, record["run_id"]) == list(range(record["steps"]))
    report = subprocess.run([PYTHON, str(ROOT / "pipelines" / "compare.py"), "--runs", str(tmp_path / "runs.json"),
                             "--out", str(tmp_path / "reports")], cwd=tmp_path, env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "reports" / "report.md").read_text()
    assert "explode_high_lr" in text and "clip" in text
    assert "report/report.md" in {a.path for a in c.list_artifacts(listed["parent_run_id"], "report")}


def test_a_database_outage_loses_no_point(server, tmp_path):
    """PostgreSQL restarted twice under a live run: the server answers 500 meanwhile, the client's
    bounded retries carry the batches over, and the run still has one point per step."""
    uri = server["uri"]
    proc = train_process(tmp_path, uri, 11, 3000, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    c = client(uri)
    deadline = time.monotonic() + 300
    run_id = None
    while run_id is None and time.monotonic() < deadline and proc.poll() is None:
        exp = c.get_experiment_by_name("many-writers")
        running = c.search_runs([exp.experiment_id], "tags.seed = '11'") if exp else []
        run_id = running[0].info.run_id if running and c.get_metric_history(running[0].info.run_id, "grad/norm") else None
        time.sleep(0.2)
    assert run_id is not None, proc.communicate()[1][-3000:]
    for _ in range(2):
        server["pg"].restart()
        time.sleep(1.0)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert c.get_run(run_id).info.status == "FINISHED"
    assert steps_of(uri, run_id) == list(range(3000))


def test_a_server_that_goes_away_is_one_line(server, tmp_path):
    """The server down for good mid-run: after the bounded retries, one line naming the server, exit 1."""
    from gradlab.server import MlflowServer, free_port

    other = MlflowServer(server["pg"].url("mlflow"), str(tmp_path / "art"), free_port(), tmp_path / "log").start()
    proc = train_process(tmp_path, other.uri, 12, 100000, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                         MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    time.sleep(12)
    other.stop()
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln]
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and len(lines) == 1 and other.uri in lines[0], err[-3000:]


def test_optuna_study_shared_by_two_workers(server, tmp_path):
    """Two search processes join one study through the PostgreSQL storage URL; every trial of the
    study is an MLflow child run of its worker's parent run."""
    import optuna

    storage = server["pg"].url("optuna")
    cmd = [PYTHON, str(ROOT / "pipelines" / "search.py"), "--sampler", "random", "--trials", "3", "--storage", storage,
           "--study-name", "shared", "--tracking-uri", server["uri"], "--param", "optimizer.lr=loguniform:1e-3:1",
           "--", "data=synthetic", "trainer.max_steps=10", "telemetry.plots=false", "trainer.device=cpu", *TINY]
    workers = [subprocess.Popen([*cmd[:2], "--seed", str(i), *cmd[2:]], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 6 and sorted(t.number for t in trials) == list(range(6))
    c = client(server["uri"])
    parents = set()
    for t in trials:
        run = c.get_run(t.user_attrs["run_id"])
        assert run.data.tags["study"] == "shared" and run.data.tags["trial"] == str(t.number)
        parents.add(run.data.tags["mlflow.parentRunId"])
    assert len(parents) == 2


# ---------------------------------------------------------------- torchrun from the command line
def test_torchrun_cli_logs_one_run(tmp_path):
    """``torchrun --nproc_per_node=2 src/train.py trainer.strategy=ddp``: one MLflow run (rank 0's),
    one point per step, one checkpoint; the same command line as a single process otherwise."""
    uri = store_uri(tmp_path / "store")
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SRC / "train.py"), "trainer.strategy=ddp", "data=synthetic", "trainer.max_steps=30",
                           "trainer.device=cpu", "stabilizer=clip", "telemetry.plots=true", f"tracking.uri={uri}",
                           f"trainer.checkpoint={tmp_path / 'model.pt'}", *TINY],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished: 30 steps") == 1  # rank 0 reports, once
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("gradlab").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["parallel"] == "ddp x2 (gloo)"
    assert steps_of(uri, runs[0].info.run_id) == list(range(30))
    assert (tmp_path / "model.pt").is_file()
    assert {"plots/grad_norm.png", "checkpoint/model.pt"} <= {a.path for d in ("plots", "checkpoint")
                                                              for a in c.list_artifacts(runs[0].info.run_id, d)}
