"""Resuming: which checkpoint a command continues (``trainer.resume=<path>|auto``), with which config.

The run continues with the checkpoint's config: resuming never changes the experiment.
The command line may change the budget (``trainer.max_steps``, ``trainer.epochs``) and
where and how a run writes (``RUN_KEYS``); any other key it sets must agree with the
checkpoint, else one line names the key. ``auto`` picks the newest interrupted run
(KILLED or FAILED: runs of dead processes are closed as KILLED when the store is opened)
with the same config hash and seed whose checkpoint still exists; with none, the command
starts a fresh run. Which MLflow run a resumed training writes into is decided in
``Trainer.start_run``: an interrupted run continues as itself, a finished one is left as
it was and continued as a new run that holds the whole history.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from . import checkpoint
from .config import compose_config, config_from_dict
from .errors import ConfigError
from .tracking import config_hash, ensure_store, flatten, tracking_uri

BUDGET_KEYS = ("trainer.max_steps", "trainer.epochs")  # the command may extend the run
HOW_KEYS = ("trainer.device", "trainer.threads", "optimizer.fused")  # the command may move it (kept unless set: they change the arithmetic)
RUN_KEYS = ("trainer.checkpoint", "trainer.checkpoint_every", "trainer.resume", "trainer.progress",
            "trainer.preflight", "trainer.strategy", "telemetry.plots", "telemetry.sharpness_every",
            "telemetry.sharpness_iters", "telemetry.warn_ratio", "telemetry.warn_loss",
            "telemetry.warn_attn_logit", "forensics.",
            "tracking.")  # what it observes and writes besides the training, where, and how it was launched:
# always the command's (a key ending in "." is a prefix); a checkpoint resumes under any strategy and
# world size (torchrun turns the gauge off: a single-process continuation turns it back on)


def _is_run_key(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RUN_KEYS)


def may_change(key: str) -> bool:
    return key in BUDGET_KEYS or key in HOW_KEYS or _is_run_key(key)


def resume_key(cfg) -> str:
    """Names the experiment a run continues: its config and seed, less what a resume may change."""
    params = {k: v for k, v in flatten(cfg).items() if k not in BUDGET_KEYS + HOW_KEYS}
    return config_hash({**params, "resume.seed": str(cfg.seed)})


def find_interrupted(cfg) -> Optional[Tuple[str, str]]:
    """(checkpoint path, run id) of the newest KILLED or FAILED run with this config and seed (the
    budget may differ), if its checkpoint exists."""
    client = ensure_store(tracking_uri(cfg.tracking.uri))  # also closes the runs of dead processes
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    query = (f"tags.`gradlab.resume_key` = '{resume_key(cfg)}' "
             "AND attributes.status != 'FINISHED' AND attributes.status != 'RUNNING'")
    for run in client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=20):
        path = run.data.tags.get("gradlab.checkpoint")
        if path and Path(path).is_file():
            return path, run.info.run_id
    return None


def _touched(cfg, overrides: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The keys (flattened) the command line sets: what differs from the defaults, and every key
    under an explicit override. ``overrides=None`` (a config built in code): every key."""
    mine = flatten(cfg)
    if overrides is None:
        return mine
    defaults = flatten(compose_config([]))
    explicit = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    return {k: v for k, v in mine.items()
            if defaults.get(k) != v or any(k == e or k.startswith(e + ".") for e in explicit)}


def resume_config(cfg, overrides: Optional[Sequence[str]] = None):
    """The config a ``trainer.resume`` command runs with (see the module docstring). ``overrides``:
    the command line's Hydra overrides, to tell what the user set from what are defaults."""
    path = cfg.trainer.resume
    if path == "auto":
        found = find_interrupted(cfg)
        if found is None:
            print("gradlab: trainer.resume=auto: no interrupted run of this config to resume; starting a new run",
                  file=sys.stderr)
            cfg = cfg.copy()
            OmegaConf.update(cfg, "trainer.resume", None)
            return cfg
        path = found[0]
    state = checkpoint.load(path, torch.device("cpu"), "trainer.resume")
    saved = config_from_dict(state["config"])
    stored, touched = flatten(saved), _touched(cfg, overrides)
    for key, value in touched.items():
        if not may_change(key) and stored.get(key) != value:
            raise ConfigError(key, f"is {stored.get(key)} in the checkpoint {path}: a resumed run continues the "
                                   f"checkpoint's experiment (only {', '.join(BUDGET_KEYS)} and where/how it writes "
                                   "may change; start a new run to change the rest)")
    for key in flatten(cfg):
        if _is_run_key(key) or (may_change(key) and key in touched):
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    OmegaConf.update(saved, "trainer.resume", str(path))
    if not cfg.tracking.uri:  # continue in the store the run lives in
        OmegaConf.update(saved, "tracking.uri", state["tracking_uri"])
    return saved
