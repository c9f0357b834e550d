"""The checkpoint file: everything a resume or an evaluation needs, in one place.

Layout (``FORMAT``): ``config`` (the resolved run config), ``engine`` (model, optimizer,
stabilizers, schedule, scaler, RNG: ``StepEngine.state_dict``), ``order`` (the data order),
``history`` (the host-side telemetry), and the run's bookkeeping (step, run id, tracking
URI, data checksum, divergence step, training seconds). Only tensors and plain Python
types, so it loads with ``torch.load(weights_only=True)``: loading never runs code from it.
Written to a temporary file in the same directory and renamed, so a reader never sees a
half-written checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from .registry import ConfigError

FORMAT = 1


def save(path: str | Path, payload: Dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **payload}, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, device: torch.device, key: str) -> Dict[str, Any]:
    """The checkpoint at ``path``; ConfigError(``key``) if it is missing or not a gradlab checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(key, f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure means the same thing to the user
        raise ConfigError(key, f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(key, f"{path} is not a gradlab checkpoint (format {FORMAT})")
    return state
