"""MLflow bookkeeping: one run per training job, metrics sent in batches.

Uses ``MlflowClient`` (no fluent global run) so Hydra multiruns, joblib workers and
nested matrix/search runs all work the same way. Metric points are queued and sent
with ``log_batch`` in chunks of up to 1000, asynchronously; ``close`` waits for every
chunk, so nothing logged is lost.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from omegaconf import OmegaConf

from .stabilizers import stabilizer_label

BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_BATCH = 100  # ... and on params/tags


def tracking_uri(uri: Optional[str] = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (absolute)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def ensure_store(uri: str) -> MlflowClient:
    """Create/upgrade the store now (before parallel jobs race on a new SQLite schema)."""
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)
    return client


def prepare_store(uri: Optional[str], experiment: Optional[str] = None) -> str:
    """Create/upgrade the store at ``uri`` (default: tracking_uri()) and the experiment; returns the URI."""
    uri = tracking_uri(uri)
    client = ensure_store(uri)
    if experiment:
        experiment_id(client, experiment)
    return uri


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another worker created it first
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    """The commit of the checkout this code runs from (not of the cwd, which may be anywhere)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(cfg) -> Dict[str, str]:
    """The resolved config as dotted-key params."""
    out: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def run_name(cfg) -> str:
    return cfg.tracking.run_name or f"{cfg.model.name}-{stabilizer_label(cfg.stabilizer)}-s{cfg.seed}"


def run_tags(cfg, device, data_checksum: str) -> Dict[str, str]:
    """What a training run is, as tags: the columns to filter and group by in the MLflow UI."""
    return {"model": cfg.model.name, "optimizer": cfg.optimizer.name, "data": cfg.data.name,
            "stabilizer": stabilizer_label(cfg.stabilizer), "scenario": cfg.scenario, "seed": cfg.seed,
            "scheduler": cfg.scheduler.name, "git_commit": git_commit(), "data_checksum": data_checksum,
            "config_hash": config_hash(flatten(cfg)), "device": str(device),
            **{str(k): str(v) for k, v in (cfg.tracking.tags or {}).items()}}


RUN_SPECIFIC_KEYS = ("seed", "trainer.checkpoint", "trainer.resume")  # besides tracking.*


def config_hash(params: Dict[str, str]) -> str:
    """12 hex digits naming a run's configuration without what differs between the seeds and
    reruns of one experiment (seed, file paths, tracking.*): every seed of a matrix cell, and
    the same cell run again, share it. ``params`` is ``flatten(cfg)`` or a run's logged params."""
    kept = {k: v for k, v in params.items() if k not in RUN_SPECIFIC_KEYS and not k.startswith("tracking.")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


class RunLogger:
    """A live MLflow run with a batched metric queue."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: List[Metric] = []
        self.operations = []
        self.logged_points = 0

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: Dict[str, str],
              parent_run_id: Optional[str] = None, run_id: Optional[str] = None) -> "RunLogger":
        client = ensure_store(uri)
        if run_id is None and not parent_run_id:
            # `mlflow run` pre-creates a run and passes its id; attach to it once (popped,
            # so later jobs of a multirun get runs of their own)
            run_id = os.environ.pop("MLFLOW_RUN_ID", None)
            if run_id is not None:
                client.set_tag(run_id, "mlflow.runName", run_name)
                for k, v in tags.items():
                    client.set_tag(run_id, k, str(v))
        if run_id is not None:  # resume into the same run
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id)
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

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
        self.pending += [Metric(k, float(v), timestamp_ms, int(s)) for k, v, s in points]
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
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
