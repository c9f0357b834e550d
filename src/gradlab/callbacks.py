"""Hydra callbacks (registered under ``hydra.callbacks`` in ``conf/config.yaml``).

``PrepareTrackingStore`` makes multiruns with a parallel launcher
(``python src/train.py -m hydra/launcher=joblib ...``) safe on a *new* SQLite store:
MLflow creates and migrates the schema lazily on first use, so several workers
opening a fresh ``mlflow.db`` at once race on the migrations (``duplicate column
name: step``) and jobs die. ``on_multirun_start`` runs once in the launching
process, before the sweeper or launcher starts any job: it creates/upgrades the
store and the experiment there, so every worker only ever finds a ready store.
"""
from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class PrepareTrackingStore(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        prepare_store(OmegaConf.select(config, "tracking.uri"),
                      OmegaConf.select(config, "tracking.experiment", default=None))


def prepare_store(uri: str | None, experiment: str | None = None) -> str:
    """Create/upgrade the store at ``uri`` (default: tracking_uri()) and the experiment; returns the URI."""
    from .tracking import ensure_store, experiment_id, tracking_uri

    uri = tracking_uri(uri)
    client = ensure_store(uri)
    if experiment:
        experiment_id(client, experiment)
    return uri
