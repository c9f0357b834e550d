"""Remedies: named sets of Hydra overrides, the thing the matrix compares and the search samples.

Most of what practitioners change when gradients explode is not a gradient transform: the
init, a normalization layer, residual connections, the activation, a smaller or gated model,
the optimizer, the learning rate or its schedule, the batch size. gradlab has each as a config
knob, so a remedy is just a name for the overrides that apply it::

    he_init: [model.init=kaiming, model.gain=1.0]
    lstm: [model=lstm]
    clip+layernorm: [stabilizer=clip, model.norm=layernorm]

A plain stabilizer value (``clip``, ``[warmup,clip]``) is a remedy too, named by itself, with
the override ``stabilizer=<value>``; ``none`` changes nothing (the failure as it is).

Its *kind* follows from the keys it sets (``remedy_kind``), so a report can group remedies
without a second place to keep labels in sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .config import unknown_key
from .registry import STABILIZERS, ConfigError

# the report's grouping, in its order
KINDS = ("baseline", "gradient-side", "initialization", "architecture", "optimization", "combined", "other")
INIT_KNOBS = {"init", "gain", "recurrent_init", "recurrent_gain"}  # model knobs that only set initial weights
LR_STABILIZERS = {"warmup"}  # in the stabilizer group (it runs in the step pipeline) but it schedules the LR
OPTIMIZATION_KEYS = {"trainer.batch_size", "trainer.epochs"}


@dataclass(frozen=True)
class Remedy:
    name: str
    overrides: Tuple[str, ...]

    @property
    def kind(self) -> str:
        return remedy_kind(self.overrides)

    def tags(self) -> Dict[str, str]:
        """What a run of this remedy is tagged with (besides the ``stabilizer`` tag every run has)."""
        return {"remedy": self.name, "remedy_kind": self.kind}


def parse(overrides: Sequence[str]) -> List[Any]:
    """Hydra's own parse of the overrides (a list value such as ``[warmup,clip]`` comes back a list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def stabilizer_kind(names: Sequence[str]) -> str:
    kinds = {"optimization" if n in LR_STABILIZERS else "gradient-side" for n in names if n != "none"}
    return kinds.pop() if len(kinds) == 1 else ("combined" if kinds else "baseline")


def _key_kind(key: str, value: Any) -> str:
    head, _, knob = key.partition(".")
    if head == "stabilizer":
        return stabilizer_kind([knob.split(".")[0]] if knob else value if isinstance(value, list) else [value])
    if head == "model":
        return "initialization" if knob in INIT_KNOBS else "architecture"
    if head in ("optimizer", "scheduler", "loss") or key in OPTIMIZATION_KEYS:
        return "optimization"
    return "other"


def remedy_kind(overrides: Sequence[str]) -> str:
    """baseline (changes nothing), one of the single kinds, or combined (keys of several kinds)."""
    kinds = {_key_kind(o.key_or_group.lstrip("+~"), o.value()) for o in parse(overrides)} - {"baseline"}
    return kinds.pop() if len(kinds) == 1 else ("combined" if kinds else "baseline")


def stabilizer_remedy(value: Any) -> Optional[Remedy]:
    """The remedy a plain stabilizer value stands for (``clip``, ``[warmup,clip]``, a YAML list), or None."""
    text = "[" + ",".join(str(v).strip() for v in value) + "]" if isinstance(value, (list, tuple)) else str(value).strip()
    names = [n.strip() for n in text.strip("[]").split(",")]
    if not text or not all(n in STABILIZERS for n in names):
        return None
    return Remedy(text, (f"stabilizer={text}",))


def overrides_list(value: Any, key: str) -> List[str]:
    """Hydra overrides as written in params.yaml: a list, or one string split like a command line."""
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return [str(v) for v in value]
    raise ConfigError(key, f"expected a list of Hydra overrides, got {value!r}")


def check_remedy(remedy: Remedy, key: str) -> Remedy:
    """Overrides that parse, and keys and options that some config has: a typo fails here, naming the
    remedy, and is not mistaken later for a remedy that does not apply to a scenario."""
    try:
        parsed = parse(remedy.overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra's parse errors come in several types
        raise ConfigError(key, f"cannot parse {list(remedy.overrides)} ({str(exc).splitlines()[0]})") from None
    for o in parsed:
        why = unknown_key(o.key_or_group.lstrip("+~"), o.value())
        if why:
            raise ConfigError(key, f"'{o.input_line}': {why}")
    return remedy


def define(value: Any, key: str = "matrix.remedies") -> Dict[str, Remedy]:
    """Remedies from ``matrix.remedies``: a mapping name -> overrides, or a list of plain stabilizer values."""
    if isinstance(value, dict):
        return {str(n): check_remedy(Remedy(str(n), tuple(overrides_list(o, f"{key}.{n}"))), f"{key}.{n}") for n, o in value.items()}
    out: Dict[str, Remedy] = {}
    for entry in value or []:
        remedy = stabilizer_remedy(entry)
        if remedy is None:
            raise ConfigError(key, f"{entry!r} is not a stabilizer value; define other remedies as a mapping "
                                   "(name: [overrides])")
        out[remedy.name] = remedy
    return out


def resolve(name: Any, defined: Dict[str, Remedy], key: str) -> Remedy:
    """A remedy by name: one of ``defined``, else a plain stabilizer value."""
    found = defined.get(str(name)) or stabilizer_remedy(name)
    if found is None:
        known = ", ".join(defined) or "none defined"
        raise ConfigError(key, f"'{name}' is neither a remedy of matrix.remedies ({known}) nor a stabilizer value")
    return found


def define_all(stabilizers: Any = None, remedies: Any = None) -> Dict[str, Remedy]:
    """``matrix.stabilizers`` (plain stabilizer values, the older form) and ``matrix.remedies`` as one
    ordered mapping; without either, just ``none``."""
    older, newer = define(stabilizers, "matrix.stabilizers"), define(remedies)
    twice = set(older) & set(newer)
    if twice:
        raise ConfigError(f"matrix.remedies.{sorted(twice)[0]}", "defined twice (also in matrix.stabilizers)")
    return {**older, **newer} or {"none": stabilizer_remedy("none")}


def load(params_file: str | Path = "params.yaml") -> Dict[str, Remedy]:
    """The remedies defined in a params file's ``matrix:`` (none when the file or the key is missing)."""
    path = Path(params_file)
    matrix = ((yaml.safe_load(path.read_text()) or {}) if path.exists() else {}).get("matrix") or {}
    return define_all(matrix.get("stabilizers"), matrix.get("remedies"))
