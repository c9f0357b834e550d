"""The checkpoint file: everything a resume or an evaluation needs, in one place, safe to load.

Layout (``FORMAT``): ``config`` (the resolved run config), ``engine`` (model, optimizer,
stabilizers, schedule, scaler, RNG: ``StepEngine.state_dict``), ``order`` (the data order),
``history`` (the host-side telemetry), and the run's bookkeeping (step, run id, tracking
URI, data checksum, divergence step, training seconds).

Safety: only tensors and plain Python types, loaded with ``torch.load(weights_only=True)``,
so loading never runs code from the file. Integrity: the payload is serialized once, its
SHA-256 stored beside it, and checked before the payload is read, so a flipped byte is an
error naming the file, not a silently different model. Atomicity: written to a unique
temporary file in the same directory and renamed, so a reader (or a crash, or a full
disk) never leaves a half-written checkpoint under the real name.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from .errors import ConfigError, DataError, StorageError

FORMAT = 2


def save(path: str | Path, payload: Dict[str, Any]) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    wrapper = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(),
               "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    out = io.BytesIO()
    torch.save(wrapper, out)  # in memory first: a failed write is then an OSError that says why
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(out.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}). Free space or point "
                           f"trainer.checkpoint elsewhere; the previous checkpoint there (if any) is intact.") from None
    return path


def load(path: str | Path, device: torch.device, key: str) -> Dict[str, Any]:
    """The verified payload at ``path``. Missing: ConfigError(``key``); unreadable, not a gradlab
    checkpoint or altered since it was written: DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, f"no checkpoint at {path}")
    fix = "Use another checkpoint, or train again (the file was not written by this gradlab, or was damaged)."
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickle that needs code, a truncated zip, random bytes: all unreadable
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}). {fix}") from None
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT or not torch.is_tensor(wrapper.get("payload")):
        raise DataError(f"{path}: not a gradlab checkpoint (format {FORMAT}). {fix}")
    data = wrapper["payload"].numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != wrapper.get("sha256"):
        raise DataError(f"{path}: the checkpoint's content does not match its checksum (altered or damaged). {fix}")
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}). {fix}") from None
