"""Registries: the one place each option name is declared, with its config schema.

A model, stabilizer, fault, optimizer or scheduler registers itself where it is defined::

    @STABILIZERS.register("clip", ClipConfig, order=40)
    class ClipNorm(Stabilizer): ...

and everything else derives from that: the schemas Hydra validates against
(``gradlab.config``), the choices a config check accepts, the run order of the
stabilizers, the README's tables and the tests' lists (checked by
``tests/test_registry.py``). Schemas are dataclasses; a field's value rules live in
the schema's ``check()``, choices in the field itself (:func:`choice`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from .errors import ConfigError


def choice(*options: str):
    """A string field limited to ``options``; the first is the default."""
    return field(default=options[0], metadata={"choices": tuple(options)})


def infinite_ok(default: float):
    """A float field that may be +inf (e.g. a norm type); every other float must be finite."""
    return field(default=default, metadata={"inf": True})


def need(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless ``condition`` holds (for schemas' ``check``)."""
    if not condition:
        raise ConfigError(key, message)


class Schema:
    """Base of every config dataclass: ``check`` holds the value rules a type cannot express.
    Keys it names are relative to the schema (``max_norm``, not ``stabilizer.clip.max_norm``)."""

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any  # the class or builder; None for options that are settings only (e.g. warmup)
    schema: type
    order: int = 0  # stabilizers: position in the run order


class Registry:
    """Option name -> (object, schema), in run order (``order``, then registration)."""

    def __init__(self, group: str):
        self.group = group
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, schema: type, order: int = 0) -> Callable:
        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.group} '{name}' registered twice")
            self._entries[name] = Entry(name, obj, schema, order)
            return obj

        return add

    def add(self, name: str, schema: type, order: int = 0) -> None:
        """An option that is a setting only (its code reads the config, no object to build)."""
        self.register(name, schema, order)(None)

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.order))

    def names(self) -> List[str]:
        return [e.name for e in self]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def get(self, name: str) -> Optional[Entry]:
        return self._entries.get(name)

    def of_schema(self, schema: type) -> Optional[Entry]:
        return next((e for e in self._entries.values() if e.schema is schema), None)


MODELS = Registry("model")
STABILIZERS = Registry("stabilizer")
FAULTS = Registry("fault")  # injected failures (gradlab.faults)
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
