"""Hydra callbacks (registered under ``hydra.callbacks`` in ``conf/config.yaml``).

``PrepareTrackingStore`` makes multiruns with a parallel launcher
(``python src/train.py -m hydra/launcher=joblib ...``) safe on a *new* SQLite store:
MLflow creates and migrates the schema lazily on first use, so several workers
opening a fresh ``mlflow.db`` at once race on the migrations (``duplicate column
name: step``) and jobs die. ``on_multirun_start`` runs once in the launching
process, before the sweeper or launcher starts any job: it creates/upgrades the
store and the experiment there, so every worker only ever finds a ready store.

It also settles ``MLFLOW_RUN_ID`` (set by ``mlflow run`` for the run it created): a job
that finds it attaches to that run, and joblib workers each inherit a copy, so two jobs
would write into one run. The multirun takes it out of the environment before any job
starts and makes that run the parent of every job instead.
"""
from __future__ import annotations

import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write


class PrepareTrackingStore(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .tracking import prepare_store

        prepare_store(OmegaConf.select(config, "tracking.uri"),
                      OmegaConf.select(config, "tracking.experiment", default=None))
        nest_under_mlflow_run(config)


def nest_under_mlflow_run(config: DictConfig) -> None:
    """Pop MLFLOW_RUN_ID and add ``tracking.parent_run_id=<it>`` to the overrides every job gets
    (Hydra reads ``hydra.overrides.task`` for the sweep after this callback returns)."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id is None or OmegaConf.select(config, "tracking.parent_run_id"):
        return
    with read_write(config.hydra.overrides):
        config.hydra.overrides.task.append(f"tracking.parent_run_id='{run_id}'")
