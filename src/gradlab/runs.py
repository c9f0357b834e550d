"""Parent runs and their child training runs: the one place the matrix and the search open them.

A parent run (``kind=matrix`` or ``kind=search``) is created after the store is
created/upgraded (so parallel children never race on a new SQLite schema); each child
is a training run composed from Hydra overrides and nested under it with
``tracking.parent_run_id``. Children may train in other processes, so
:func:`train_child` takes plain values, not the parent object.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from .config import compose_config
from .tracking import RunLogger, git_commit, prepare_store


class ParentRun:
    """An MLflow parent run, as a context manager: closed with ``status`` (FINISHED unless the
    caller changes it) on a clean exit, FAILED when an exception leaves the block."""

    def __init__(self, uri: Optional[str], experiment: str, name: str, kind: str, params: Dict[str, str],
                 tags: Optional[Dict[str, Any]] = None):
        self.uri = prepare_store(uri, experiment)
        self.experiment = experiment
        self.logger = RunLogger.start(self.uri, experiment, name,
                                      {"kind": kind, "git_commit": git_commit(), **(tags or {})})
        self.logger.log_params(params)
        self.run_id = self.logger.run_id
        self.status = "FINISHED"

    def __enter__(self) -> "ParentRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.logger.close(self.status)
        else:  # stopped by a signal (SystemExit, KeyboardInterrupt): KILLED, MLflow's status for it
            self.logger.close_after_error("FAILED" if issubclass(exc_type, Exception) else "KILLED")

    def child(self, overrides: Sequence[str], out_dir: Path, run_name: Optional[str] = None,
              tags: Optional[Dict[str, Any]] = None):
        return train_child(overrides, out_dir, self.run_id, self.uri, self.experiment, run_name, tags)


def child_config(overrides: Sequence[str], out_dir: Path, parent_run_id: str, uri: str, experiment: str,
                 run_name: Optional[str] = None, tags: Optional[Dict[str, Any]] = None, resume: Optional[Path] = None):
    """The checked config of a child run. Children keep their checkpoint locally, not as an artifact
    (a 72-run matrix would store hundreds of MB), unless ``trainer.log_checkpoint=true`` is given, and
    do not replay their bad step (forensics costs 20-80 s per diverged run: ``forensics.investigate=true``).
    Paths, the URI and names are set on the composed config rather than passed as overrides: no
    Hydra quoting trouble with odd characters. ``resume``: the checkpoint an interrupted child
    continues from."""
    cfg = compose_config(["trainer.log_checkpoint=false", "forensics.investigate=false", *overrides])  # explicit wins
    OmegaConf.update(cfg, "trainer.checkpoint", str(Path(out_dir) / "model.pt"))
    if resume is not None:
        OmegaConf.update(cfg, "trainer.resume", str(resume))
    OmegaConf.update(cfg, "tracking.uri", uri)
    OmegaConf.update(cfg, "tracking.experiment", experiment)
    OmegaConf.update(cfg, "tracking.parent_run_id", parent_run_id)
    if run_name:
        OmegaConf.update(cfg, "tracking.run_name", run_name)
    cfg.tracking.tags = {**cfg.tracking.tags, **(tags or {})}
    return cfg


def train_child(overrides: Sequence[str], out_dir: Path, parent_run_id: str, uri: str, experiment: str,
                run_name: Optional[str] = None, tags: Optional[Dict[str, Any]] = None,
                resume: Optional[Path] = None, test: bool = False) -> Tuple[Any, Any]:
    """Compose and train one child run; returns (config, TrainResult). ``test``: the run logs its
    test-set result itself (``TrainResult.test_accuracy``)."""
    from .training import train

    cfg = child_config(overrides, out_dir, parent_run_id, uri, experiment, run_name, tags, resume)
    return cfg, train(cfg, Path(out_dir), test=test)
