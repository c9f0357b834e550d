"""Exit codes and one-line errors, shared by every entry point (src/*.py, pipelines/*.py).

A config or command-line mistake is one line on stderr naming the key, exit code 2; a data
or I/O problem is one line naming the file and the fix, exit code 1. Anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, List, NoReturn, Optional

from .data import DataError
from .registry import ConfigError

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


def task(fn: Callable) -> Callable:
    """Decorate a Hydra task: the config's value rules run first (before any work), then
    config errors raised while it runs exit 2 and data errors exit 1, each as one line."""

    @functools.wraps(fn)
    def wrapper(cfg):
        from .config import check

        try:
            check(cfg)
            return fn(cfg)
        except DataError as exc:
            fail(str(exc), EXIT_DATA)
        except Exception as exc:  # noqa: BLE001 - anything not config-related is re-raised
            line = describe_error(exc)
            if line is None:
                raise
            fail(line, EXIT_CONFIG)

    return wrapper


def _command_line_overrides() -> List[str]:
    return [a for a in sys.argv[1:] if not a.startswith("-")]


def run_cli(main_fn: Callable[[], object]) -> None:
    """Run an entry point (a ``@hydra.main`` function or an argparse ``main``): config errors
    become one line and exit 2, data errors one line and exit 1."""
    from .config import diagnose_overrides

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let errors reach us instead of Hydra's printer
    try:
        main_fn()
    except DataError as exc:
        fail(str(exc), EXIT_DATA)
    except Exception as exc:  # noqa: BLE001 - we re-raise anything not config-related
        # Hydra does not always name the override to blame (a bare AssertionError, a parse error)
        blame = None if isinstance(exc, ConfigError) else diagnose_overrides(_command_line_overrides())
        line = describe_error(blame or exc)
        if line is None:
            raise
        fail(line, EXIT_CONFIG)
