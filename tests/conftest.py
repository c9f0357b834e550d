"""Shared helpers for gradlab's tests.

* ``compose(overrides)``: conf/config.yaml composed exactly as ``src/train.py`` would.
* ``tmp_store``: a fresh SQLite MLflow store under the test's tmp dir.
* ``tiny_cfg(tmp_path, *overrides)``: a seconds-long CPU run on synthetic data that writes
  only into ``tmp_path``.

Every test runs with its tmp dir as the working directory, so nothing (mlflow.db,
mlruns/, outputs/) lands in the repository.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SRC = ROOT / "src"
PYTHON = sys.executable

if str(SRC) not in sys.path:  # the venv installs gradlab, but a bare checkout works too
    sys.path.insert(0, str(SRC))

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # offline machine: no telemetry attempts

import torch  # noqa: E402

from gradlab.config import register_configs  # noqa: E402

register_configs()

# Tiny models on a shared 2-core machine: one intra-op thread is ~50x faster than two
# threads contending with other processes (and results don't depend on it).
torch.set_num_threads(1)

# A tiny model and batch keep each optimizer step at a few milliseconds on a 2-core CPU.
TINY = ["model.hidden_sizes=[32]", "trainer.batch_size=32", "data.synthetic_size=512"]


# ---------------------------------------------------------------- config composition
def compose(overrides: Sequence[str] = ()):
    """conf/config.yaml composed with ``overrides`` (the schemas are registered first)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# ---------------------------------------------------------------- MLflow store
_TEMPLATE: Dict[str, Path] = {}


def _template_db() -> Path:
    """An empty, fully migrated MLflow SQLite store, created once per session: creating a
    store runs every schema migration (seconds), copying one takes milliseconds."""
    if "db" not in _TEMPLATE:
        from gradlab.tracking import ensure_store

        d = Path(tempfile.mkdtemp(prefix="gradlab-store-"))
        ensure_store(f"sqlite:///{d / 'mlflow.db'}")
        _TEMPLATE["db"] = d / "mlflow.db"
    return _TEMPLATE["db"]


def store_uri(directory: Path) -> str:
    """A new MLflow store in ``directory``; returns its ``sqlite:///`` URI."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "mlflow.db"
    if not db.exists():
        shutil.copyfile(_template_db(), db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session", autouse=True)
def _remove_template_store():
    yield
    if "db" in _TEMPLATE:
        shutil.rmtree(_TEMPLATE["db"].parent, ignore_errors=True)


@pytest.fixture
def tmp_store(tmp_path) -> str:
    """``sqlite:///<tmp>/store/mlflow.db``, an empty MLflow store for this test."""
    return store_uri(tmp_path / "store")


# ---------------------------------------------------------------- working directory / env
@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Run in tmp_path; never write into the user's MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # trainer.deterministic=true flips process-wide torch flags: restore them for the next test
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


@contextlib.contextmanager
def in_dir(path: Path):
    """Work in ``path`` for a block (module-scoped fixtures: the autouse chdir is per test)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


# ---------------------------------------------------------------- tiny runs
def tiny_overrides(tmp_path: Path, *overrides: str, steps: int = 12) -> List[str]:
    # the tiny MLP's width is an mlp knob: left out when the overrides pick another model
    other_model = any(o.startswith(("model=", "experiment=")) for o in overrides)
    tiny = [t for t in TINY if not (other_model and t.startswith("model."))]
    return ["data=synthetic", f"trainer.max_steps={steps}", "trainer.device=cpu", "telemetry.plots=false",
            f"tracking.uri={store_uri(Path(tmp_path) / 'store')}", f"trainer.checkpoint={Path(tmp_path) / 'model.pt'}",
            "trainer.progress=false", *tiny, *overrides]


def tiny_cfg(tmp_path: Path, *overrides: str, steps: int = 12):
    """A composed config for a tiny CPU run on synthetic data, everything under ``tmp_path``
    (store: ``tmp_path/store/mlflow.db``, checkpoint: ``tmp_path/model.pt``). Later
    overrides win, so ``trainer.max_steps=...`` or ``trainer.checkpoint=...`` may be passed."""
    return compose(tiny_overrides(tmp_path, *overrides, steps=steps))


# ---------------------------------------------------------------- MLflow reading
def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def history(uri: str, run_id: str, key: str) -> List[tuple]:
    """[(step, value)] of one metric, in step order."""
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def artifact_paths(uri: str, run_id: str, path: Optional[str] = None) -> List[str]:
    c = client(uri)
    out = []
    for f in c.list_artifacts(run_id, path):
        out += artifact_paths(uri, run_id, f.path) if f.is_dir else [f.path]
    return out


# ---------------------------------------------------------------- subprocesses
def cli_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("HYDRA_FULL_ERROR", None)  # run_cli sets it itself; test what users get
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.setdefault("OMP_NUM_THREADS", "1")  # see torch.set_num_threads(1) above
    env.update(extra)
    return env


def run_script(script: str, *args: str, cwd: Path, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """``python src/<script> args...`` in ``cwd`` (Hydra writes its outputs/ there)."""
    return subprocess.run([PYTHON, str(SRC / script), *args], cwd=str(cwd), env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def capture(fn) -> tuple:
    """Run ``fn()`` as an entry point would run: (exit code, stdout, stderr); a traceback lands in stderr."""
    import contextlib
    import io
    import traceback

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            fn()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - a traceback is what the caller asserts against
            traceback.print_exc(file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


def cli(script: str, *args: str, cwd: Optional[Path] = None) -> tuple:
    """``python src/<script> args...`` run in this process (no interpreter start-up): returns
    (exit code, stdout, stderr). For one-line-error checks; signals and concurrency need
    real processes (run_script)."""
    import runpy

    argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [str(SRC / script), *args]
    try:
        if cwd is not None:
            os.chdir(cwd)
        return capture(lambda: runpy.run_path(str(SRC / script), run_name="__main__"))
    finally:
        sys.argv = argv
        os.chdir(old_cwd)


def one_line_error(result: tuple, code: int, *fragments: str) -> str:
    """Assert ``result`` (from cli/run_script) is exactly one stderr line, exit ``code``, no traceback,
    containing every fragment; returns the line."""
    rc, stdout, stderr = result
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert rc == code, (rc, stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("gradlab: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
