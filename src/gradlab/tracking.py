"""MLflow bookkeeping: the store, one run per training job, metrics sent in batches.

Uses ``MlflowClient`` (no fluent global run) so Hydra multiruns, joblib workers and
nested matrix/search runs all work the same way. Metric points are queued and sent
with ``log_batch`` in chunks of up to 1000, asynchronously; ``flush``/``close`` wait for
every chunk, so nothing logged is lost.

The store is opened once per process (``ensure_store``): a SQLite store is created or
migrated under an inter-process file lock and switched to WAL mode, so any number of
independent processes can start on a new store at once; an HTTP server is probed with a
short timeout, so an unreachable one fails in seconds, not minutes; and runs left RUNNING
by a process that died (kill -9, a crashed machine) are closed as KILLED.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from .errors import StorageError

# A failed asynchronous batch is raised again when the run is flushed (RunLogger.flush), where the CLI
# reports it in one line; MLflow's queue would also print it, with its traceback text, as it happens.
logging.getLogger("mlflow.utils.async_logging.async_logging_queue").setLevel(logging.CRITICAL)

BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_BATCH = 100  # ... and on params/tags
DATASET_TRIES = 5  # RunLogger.log_dataset against a concurrent first insert of the same dataset


def _duplicate_key(err: Exception) -> bool:
    """Whether a store error is a unique-key clash (a concurrent insert won), not a real failure."""
    text = str(err).lower()
    return "duplicate key" in text or "unique constraint" in text


def tracking_uri(uri: Optional[str] = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (absolute)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


HEARTBEAT_S = 30  # a live run refreshes its heartbeat tag at most this often ...
STALE_AFTER_S = 15 * 60  # ... and one silent for this long (or whose process is gone) is closed as KILLED
HOST = socket.gethostname()
_ready: Set[str] = set()  # stores this process has opened


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (relative, or absolute with four slashes)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def ensure_store(uri: str) -> MlflowClient:
    """A client on a ready store at ``uri`` (see the module docstring); StorageError if it cannot be."""
    db = sqlite_path(uri)
    if db is not None:
        _check_writable(db)
        with FileLock(f"{db}.lock", timeout=300):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # creates / migrates the schema
            if uri not in _ready:
                with sqlite3.connect(db, timeout=30) as con:
                    con.execute("PRAGMA journal_mode=WAL")  # readers no longer block the writer
    else:
        if uri.startswith(("http://", "https://")):
            _probe(uri)
        client = MlflowClient(uri)
    if uri not in _ready:
        close_stale_runs(client)
        _ready.add(uri)
    return client


def checkpoint_wal(uri: str) -> None:
    """Fold the write-ahead log into the database file (what SQLite does when the last connection
    closes; MLflow keeps its pool open), so a copy of mlflow.db alone holds every closed run."""
    db = sqlite_path(uri)
    if db is not None and db.exists():
        with sqlite3.connect(db, timeout=30) as con:
            con.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _check_writable(db: Path) -> None:
    folder = db.parent.resolve()
    if not folder.is_dir():
        raise StorageError(f"{folder}: no such directory for the MLflow store {db.name}. Create it or choose "
                           f"another tracking.uri.")
    if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise StorageError(f"{db}: the MLflow store is read-only here. Choose a writable tracking.uri.")


def _probe(uri: str) -> None:
    """Fail within seconds on an unreachable server, and bound MLflow's own retries (by default
    7 retries with exponential backoff and 120 s timeouts, minutes before an error)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            pass
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StorageError(f"tracking server {uri} is not reachable ({reason}). Start it or choose another "
                           "tracking.uri.") from None


def close_stale_runs(client: MlflowClient) -> List[str]:
    """Close as KILLED the gradlab runs left RUNNING by a process that is gone: on this host, its
    pid no longer exists; anywhere, its heartbeat is older than STALE_AFTER_S. Returns their ids."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    closed = []
    for run in client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000) if experiments else []:
        tags = run.data.tags
        if "gradlab.pid" not in tags:
            continue  # not ours to judge
        beat = float(tags.get("gradlab.heartbeat", run.info.start_time / 1000))
        gone = tags.get("gradlab.host") == HOST and not _alive(int(tags["gradlab.pid"]))
        if gone or time.time() - beat > STALE_AFTER_S:
            client.set_tag(run.info.run_id, "gradlab.closed", f"KILLED by pid {os.getpid()}: its process was gone")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_store(uri: Optional[str], experiment: Optional[str] = None) -> str:
    """Create/upgrade the store at ``uri`` (default: tracking_uri()) and the experiment; returns the URI."""
    uri = tracking_uri(uri)
    client = ensure_store(uri)
    if experiment:
        experiment_id(client, experiment)
    return uri


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's UI: a model-training experiment


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if needed as a model-training experiment (MLflow 3's UI otherwise
    opens it in its GenAI view, on an empty traces page)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        except Exception:  # noqa: BLE001 - another worker created it first
            exp = client.get_experiment_by_name(name)
    if "mlflow.experimentKind" not in exp.tags:  # made by an older gradlab or another tool
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def launcher_run(client: MlflowClient, experiment: str, run_name: str, tags: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """`mlflow run` pre-creates a run (MLFLOW_RUN_ID) in the experiment it was given: Default unless
    `--experiment-name`. Taken once (popped, so later jobs of a multirun get runs of their own).
    Returns (run to adopt, launcher run to point at ours): a launcher run in our experiment is adopted;
    one elsewhere is left as a pointer, so the record itself lands in our experiment."""
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    if launcher is None:
        return None, None
    if client.get_run(launcher).info.experiment_id != experiment_id(client, experiment):
        return None, launcher
    client.log_batch(launcher, tags=[RunTag("mlflow.runName", run_name), *(RunTag(k, str(v)) for k, v in tags.items())])
    return launcher, None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the checkout this code runs from (not of the cwd, which may be anywhere); read
    once per process."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(cfg) -> Dict[str, str]:
    """The resolved config (or a saved plain one) as dotted-key params."""
    out: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg, "")
    return out


def run_name(cfg) -> str:
    from .stabilizers import stabilizer_label

    return cfg.tracking.run_name or f"{cfg.model.name}-{stabilizer_label(cfg.stabilizer)}-s{cfg.seed}"


ENV_TAGS = ("device", "torch_version", "threads", "cpu_capability", "parallel")  # what decides the arithmetic
# besides the config (parallel: the strategy and world size, set by the trainer)


def environment_tags(device) -> Dict[str, str]:
    """The conditions under which a run's numbers are bit-for-bit reproducible (README: Reproducibility)."""
    import torch

    return {"device": str(device), "torch_version": torch.__version__, "threads": str(torch.get_num_threads()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def ui_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run opens in the MLflow UI (`mlflow ui` for a local store), in its Model-training
    view: MLflow 3's UI starts in its GenAI view unless the URL (or a click on the toggle) says otherwise."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def source_tags() -> Dict[str, str]:
    """MLflow's own source tags (the runs table's Source column): the entry script and the commit."""
    import sys

    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    root = Path(__file__).resolve().parents[2]
    name = str(script.relative_to(root)) if script and script.is_relative_to(root) else (script.name if script else "python")
    commit = git_commit()
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL",
            **({"mlflow.source.git.commit": commit.removesuffix("-dirty")} if commit != "unknown" else {})}


def run_tags(cfg, device, data_checksum: str) -> Dict[str, str]:
    """What a training run is, as tags: the columns to filter and group by in the MLflow UI."""
    from .faults import fault_label
    from .stabilizers import stabilizer_label

    return {**source_tags(), "model": cfg.model.name, "optimizer": cfg.optimizer.name, "data": cfg.data.name,
            "stabilizer": stabilizer_label(cfg.stabilizer), "fault": fault_label(cfg.get("fault")),
            "scenario": cfg.scenario, "seed": cfg.seed,
            "scheduler": cfg.scheduler.name, "git_commit": git_commit(), "data_checksum": data_checksum,
            "config_hash": config_hash(flatten(cfg)), **environment_tags(device),
            **{str(k): str(v) for k, v in (cfg.tracking.tags or {}).items()}}


DERIVED_PARAMS = ("stabilizer", "fault")  # logged beside the config for MLflow's views; not config keys themselves
RUN_SPECIFIC_KEYS = ("seed", "trainer.checkpoint", "trainer.checkpoint_every", "trainer.resume", "trainer.progress",
                     "trainer.log_checkpoint", "trainer.log_model", "trainer.strategy",
                     "trainer.preflight", "telemetry.sharpness_every", "telemetry.sharpness_iters",
                     "telemetry.warn_ratio", "telemetry.warn_loss",
                     "telemetry.warn_attn_logit")  # besides tracking.* and forensics.*:
# what a run observes and writes, not how it trains


def config_hash(params: Dict[str, str]) -> str:
    """12 hex digits naming a run's configuration without what differs between the seeds and
    reruns of one experiment (seed, file paths, tracking.*, forensics.*): every seed of a matrix cell, and
    the same cell run again, share it. ``params`` is ``flatten(cfg)`` or a run's logged params."""
    kept = {k: v for k, v in params.items()
            if k not in RUN_SPECIFIC_KEYS + DERIVED_PARAMS and not k.startswith(("tracking.", "forensics."))}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


class RunLogger:
    """A live MLflow run with a batched metric queue. Points whose (key, step) the run already
    holds can be skipped (``skip_logged``), so a resumed run never stores a step twice."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: List[Metric] = []
        self.operations = []
        self.logged_points = 0
        self.skip: Dict[str, Set[int]] = {}
        self.beat = 0.0
        self.closed = False

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: Dict[str, str],
              parent_run_id: Optional[str] = None, run_id: Optional[str] = None,
              unique_name: bool = False) -> "RunLogger":
        """A new run, or ``run_id`` continued. ``unique_name``: the name gets the run id's first
        characters (two runs of the same cell must not look alike in the runs table)."""
        client = ensure_store(uri)
        launcher = None
        if run_id is None and not parent_run_id:
            run_id, launcher = launcher_run(client, experiment, run_name, tags)
        extra: Dict[str, Any] = {"gradlab.host": HOST, "gradlab.pid": os.getpid()}
        if run_id is not None:  # resume into the same run
            client.update_run(run_id, status="RUNNING")
            logger = cls(client, run_id)
        else:
            tags = {k: str(v) for k, v in tags.items()}  # the REST store (an HTTP server) takes strings only
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags)
            logger = cls(client, run.info.run_id)
            if unique_name:
                extra["mlflow.runName"] = f"{run_name}-{run.info.run_id[:6]}"
            if launcher:
                extra["gradlab.launched_by"] = launcher
                client.set_tag(launcher, "gradlab.moved_to", f"{run.info.run_id} (experiment '{experiment}')")
        logger.set_tags(extra)
        logger.heartbeat()
        return logger

    def log_dataset(self, name: str, digest: str, source: str, sizes: Dict[str, int]) -> None:
        """The data the run trained on, as an MLflow dataset input (the runs table's Datasets column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                          profile=json.dumps({"num_rows": sizes}))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
        for attempt in range(DATASET_TRIES):
            try:
                self.client.log_inputs(self.run_id, inputs)
                return
            except MlflowException as err:
                # MLflow's SQL store looks the dataset up, then inserts it: two runs starting at once on the
                # same data can both miss it, and the second insert breaks the unique key (PostgreSQL's
                # "duplicate key", SQLite's "UNIQUE constraint"). The transaction was rolled back, so
                # trying again finds the dataset the other run created and only links it.
                if attempt == DATASET_TRIES - 1 or not _duplicate_key(err):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def heartbeat(self, force: bool = True) -> None:
        """Tell other processes this run is alive (see close_stale_runs)."""
        now = time.time()
        if force or now - self.beat > HEARTBEAT_S:
            self.client.set_tag(self.run_id, "gradlab.heartbeat", f"{now:.0f}")
            self.beat = now

    def skip_logged(self) -> Dict[str, Set[int]]:
        """Remember every (key, step) the run already holds: those points are not sent again."""
        for key in self.client.get_run(self.run_id).data.metrics:
            self.skip[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return self.skip

    def log_params(self, params: Dict[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAM_BATCH])

    def set_tags(self, tags: Dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + PARAM_BATCH])

    def log_points(self, points: Iterable[tuple], timestamp_ms: int) -> None:
        """Queue (key, value, step) points; full chunks go out asynchronously."""
        if self.skip:
            points = [p for p in points if int(p[2]) not in self.skip.get(p[0], ())]
        self.pending += [Metric(k, float(v), timestamp_ms, int(s)) for k, v, s in points]
        self.heartbeat(force=False)
        while len(self.pending) >= BATCH:
            self._send(self.pending[:BATCH])
            self.pending = self.pending[BATCH:]

    def log_metrics(self, metrics: Dict[str, float], step: int, timestamp_ms: int) -> None:
        self.log_points([(k, v, step) for k, v in metrics.items()], timestamp_ms)

    def _send(self, chunk: List[Metric]) -> None:
        self.operations.append(self.client.log_batch(self.run_id, metrics=chunk, synchronous=False))
        self.logged_points += len(chunk)

    def flush(self) -> None:
        """Send what is queued and wait until every chunk is stored. The last partial chunk
        goes synchronously: a run that never filled a chunk then never starts MLflow's async
        queue, whose shutdown idles up to a second in ``set_terminated``."""
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.logged_points += len(self.pending)
            self.pending = []
        for op in self.operations:
            if op is not None:
                op.wait()
        self.operations = []

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.closed:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
        self.closed = True
        checkpoint_wal(self.client.tracking_uri)

    def close_after_error(self, status: str) -> None:
        """Close after an error without hiding it: a store that fails too (a full disk) is left as it is."""
        try:
            self.close(status)
        except Exception:  # noqa: BLE001 - the original error is what the user must see
            self.closed = True


class NullRun:
    """The run as the ranks other than 0 see it under torchrun: its id, and nothing to log
    (rank 0 logs the global values for all of them). Same methods as RunLogger's."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def _nothing(self, *args, **kwargs) -> None:
        return None

    log_points = log_metrics = log_params = set_tags = log_artifact = _nothing
    flush = heartbeat = skip_logged = close = close_after_error = _nothing
