"""Exit codes and one-line errors, shared by every entry point (src/*.py, pipelines/*.py).

A config or command-line mistake is one line on stderr naming the key, exit code 2; a data
or I/O problem is one line naming the file and the fix, exit code 1. Anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import Callable, List, NoReturn, Optional

from .errors import ConfigError, DataError, StorageError

EXIT_DATA = 1  # a data file or path is missing, corrupt or unwritable
EXIT_CONFIG = 2  # bad config or command-line input


def fail(line: str, code: int) -> NoReturn:
    print(f"gradlab: {line}", file=sys.stderr)
    sys.exit(code)


def _chain(exc: BaseException) -> List[BaseException]:
    chain: List[BaseException] = []
    e: Optional[BaseException] = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def describe_error(exc: BaseException) -> Optional[str]:
    """A one-line description if ``exc`` is a config problem, else None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    chain = _chain(exc)
    for e in chain:  # ours first: it names the full key
        if isinstance(e, ConfigError):
            return f"invalid config '{e.key}': {e.message}"
    if not any(isinstance(e, (HydraException, OmegaConfBaseException)) for e in chain):
        return None
    for e in chain:
        key = getattr(e, "full_key", None)
        if key and isinstance(e, OmegaConfBaseException):
            return f"invalid config '{key}': {str(e).splitlines()[0].strip()}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if any(ln.startswith("Available options") for ln in lines):
        idx = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        opts = []
        for ln in lines[idx + 1:]:
            if ln.startswith("Config search path"):  # Hydra appends its search path after the options
                break
            opts.append(ln)
        return f"{lines[0]} (available: {', '.join(opts)})"
    return " ".join(lines[:2])


def describe_io_error(exc: BaseException) -> Optional[str]:
    """One line for an error the user fixes outside gradlab: a data file, a path that cannot be
    written (disk full, read-only), a tracking store that fails or cannot be reached."""
    if isinstance(exc, (DataError, StorageError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}. Free space or fix the path's permissions; what was logged before is kept."
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException) and str(exc).startswith("API request to"):
        return server_gone(str(exc))
    if isinstance(exc, MlflowException):
        text = str(exc).lower()
        if any(s in text for s in ("disk is full", "readonly database", "unable to open database", "disk i/o")):
            return (f"the MLflow store failed to write ({str(exc).splitlines()[0][:200]}). Free space or choose a "
                    "writable tracking.uri; what was logged before is kept.")
    return None


def server_gone(text: str) -> str:
    """One line for a tracking server that stopped answering mid-run (after MLflow's bounded retries)."""
    server = re.match(r"API request to (\S+?//[^/\s]+)(\S*)", text)
    reasons = (re.search(p, text) for p in (r"\[Errno [^\]]+\][^\"')]*", r"Read timed out", r"too many \d+ error"))
    why = next((m.group(0).strip() for m in reasons if m), text[:160])
    return (f"the tracking server {server.group(1)} stopped answering ({why} "
            f"on {server.group(2) or '/'}). What reached it is kept; when it is back, run the same command with "
            "trainer.resume=auto to continue from the last checkpoint.")


def task(fn: Callable) -> Callable:
    """Decorate a Hydra task: the config's value rules run first (before any work), then
    config errors raised while it runs exit 2 and data errors exit 1, each as one line."""

    @functools.wraps(fn)
    def wrapper(cfg):
        from .config import check

        try:
            check(cfg)
            return fn(cfg)
        except Exception as exc:  # noqa: BLE001 - anything we cannot describe in one line is re-raised
            fail_for(exc)

    return wrapper


def fail_for(exc: BaseException) -> NoReturn:
    """Exit with one line if ``exc`` is a config (2) or data/IO (1) problem; else re-raise it."""
    io_line = describe_io_error(exc)
    if io_line is not None:
        fail(io_line, EXIT_DATA)
    line = describe_error(exc)
    if line is None:
        raise exc
    fail(line, EXIT_CONFIG)


def _command_line_overrides() -> List[str]:
    return [a for a in sys.argv[1:] if not a.startswith("-")]


def run_cli(main_fn: Callable[[], object], hydra: bool = False) -> None:
    """Run an entry point (a ``@hydra.main`` function with ``hydra=True``, or an argparse ``main``):
    config errors become one line and exit 2, data and I/O errors one line and exit 1."""
    from .config import diagnose_overrides, help_text

    if hydra and {"--help", "-h"} & set(sys.argv[1:]):
        print(help_text(os.path.basename(sys.argv[0])))
        return
    if not hydra and not logging.getLogger().handlers:  # Hydra apps get Hydra's logging (and its run's .log file)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let errors reach us instead of Hydra's printer
    try:
        main_fn()
    except Exception as exc:  # noqa: BLE001 - we re-raise anything we cannot describe in one line
        # Hydra does not always name the override to blame (a bare AssertionError, a parse error)
        blame = None
        if hydra and describe_io_error(exc) is None and not isinstance(exc, ConfigError):
            blame = diagnose_overrides(_command_line_overrides())
        fail_for(blame or exc)
