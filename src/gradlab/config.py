"""The config: Hydra schemas assembled from the registries, composition, and every value rule.

Each option's schema is registered next to its code (``gradlab.models``, ``.stabilizers``,
``.optim``); this module stores them in Hydra's ConfigStore under the group ``schema/``
(so they never show up as selectable options), and each YAML option file in ``conf/``
names its schema in its defaults list. A typo, an unknown option, a wrong type or a key
that the selected option does not have fails at composition time, naming the key.
``check`` then applies every value rule (ranges, choices, NaN/inf, combinations), so a
config that composes and passes ``check`` cannot fail later for a config reason.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from . import distributed, faults, models, optim, stabilizers
from .data import DataConfig
from .errors import ConfigError
from .forensics import ForensicsConfig
from .registry import FAULTS, MODELS, OPTIMIZERS, SCHEDULERS, STABILIZERS, Registry, Schema, choice, need
from .telemetry import TelemetryConfig

__all__ = ["ConfigError", "Config", "check", "compose_config", "conf_dir", "register_configs"]

REGISTERING_MODULES = (faults, models, optim, stabilizers)  # importing them fills the registries
GROUPS: Dict[str, Registry] = {"model": MODELS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}

# Selected options of the multi-select ``stabilizer`` group keep their settings under their own key
# (stabilizer.clip.max_norm); unselected ones are null. Fields follow the registry's run order.
StabilizerConfig = make_dataclass(
    "StabilizerConfig", [(e.name, Optional[e.schema], None) for e in STABILIZERS], bases=(Schema,))
StabilizerConfig.__module__ = __name__  # a config pickles (torchrun's ranks share a resumed one)
# The multi-select ``fault`` group (injected failures, gradlab.faults), the same way: fault.bad_batch.at
FaultConfig = make_dataclass("FaultConfig", [(e.name, Optional[e.schema], None) for e in FAULTS], bases=(Schema,))
FaultConfig.__module__ = __name__


@dataclass
class LossConfig(Schema):
    label_smoothing: float = 0.0
    l1: float = 0.0  # coefficient of the L1 penalty on all weights
    z_loss: float = 0.0  # coefficient of PaLM's z-loss, mean log(Z)^2 of the output softmax (PaLM: 1e-4)

    def check(self) -> None:
        need(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        need(self.l1 >= 0, "l1", f"must be >= 0, got {self.l1}")
        need(self.z_loss >= 0, "z_loss", f"must be >= 0, got {self.z_loss}")


@dataclass
class TrainerConfig(Schema):
    epochs: int = 3
    max_steps: Optional[int] = None  # caps optimizer steps (smoke runs)
    batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    precision: str = choice("32", "bf16", "fp16")
    grad_scaler: bool = True  # fp16: dynamic loss scaling (torch's GradScaler); false: fp16 without it
    checkpoint: Optional[str] = None  # where the checkpoint goes (default: the run's output dir)/model.pt
    checkpoint_every: int = 500  # steps between crash-safety checkpoints (0: only at the end)
    log_checkpoint: bool = True  # upload the final checkpoint as a run artifact (matrix/search children: off)
    log_model: bool = False  # also log it as an MLflow model with a signature (the DVC baseline does)
    resume: Optional[str] = None  # a checkpoint to continue from, or auto: the last interrupted run of this config
    threads: int = 0  # torch intra-op threads (0: torch's default, one per core); results depend on it
    progress: bool = True  # progress bar (only on a terminal)
    preflight: bool = False  # the preflight report (gradlab.preflight) before the first update
    strategy: str = choice(*distributed.STRATEGIES)  # data parallel under torchrun: ddp | fsdp (FSDP2)

    def check(self) -> None:
        need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 (or null for no cap)")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        need(self.threads >= 0, "threads", f"must be >= 0 (0: torch's default), got {self.threads}")
        check_device(self.device, "device")
        need(self.precision != "fp16" or resolve_device(self.device).type == "cuda", "precision",
             "fp16 needs CUDA (use bf16 or 32 on the CPU)")
        missing = distributed.missing_launch_env()
        need(self.strategy == "none" or not missing, "strategy",
             f"{self.strategy} needs torchrun's environment ({', '.join(missing)} not set): launch with "
             f"torchrun --nproc_per_node=N src/train.py trainer.strategy={self.strategy} ...")
        need(self.grad_scaler or self.precision == "fp16", "grad_scaler",
             f"only fp16 has a GradScaler to turn off (precision={self.precision})")


@dataclass
class TrackingConfig(Schema):
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "gradlab"
    run_name: Optional[str] = None  # default: <model>-<stabilizers>-s<seed>
    parent_run_id: Optional[str] = None  # nest this run under a parent (matrix, search)
    tags: Any = field(default_factory=dict)  # extra tags, e.g. scenario=...
    system_metrics: bool = False  # MLflow's CPU/memory/GPU samples (system/*) every 10 s


@dataclass
class Config(Schema):
    data: DataConfig = MISSING
    model: Any = MISSING  # one of the MODELS schemas
    optimizer: Any = MISSING  # one of the OPTIMIZERS schemas
    stabilizer: StabilizerConfig = field(default_factory=StabilizerConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    scheduler: Any = MISSING  # one of the SCHEDULERS schemas
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    forensics: ForensicsConfig = field(default_factory=ForensicsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    scenario: str = "default"  # names the failure preset (set by experiment=...)

    def check(self) -> None:
        if self.stabilizer.warmup is not None and self.scheduler.name == "onecycle":
            raise ConfigError("stabilizer.warmup", "onecycle already warms up (scheduler.pct_start); drop one")
        spam = self.stabilizer.spam
        if spam is not None:
            need(self.optimizer.name in optim.MOMENT_OPTIMIZERS, "stabilizer.spam",
                 f"needs Adam's second moment: optimizer={'|'.join(optim.MOMENT_OPTIMIZERS)}, "
                 f"got optimizer={self.optimizer.name}")
            need(spam.reset_interval is None or spam.warmup_steps == 0 or self.scheduler.name != "onecycle",
                 "stabilizer.spam.reset_interval", "onecycle sets the LR from scratch every step, so SPAM's "
                 "warm-up after a reset cannot multiply it: use another scheduler or reset_interval=null")
        need(self.fault.lr_spike is None or self.scheduler.name != "onecycle", "fault.lr_spike",
             "onecycle sets the LR from scratch every step, so the spike cannot multiply it: use another scheduler")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.trainer.strategy == "fsdp":  # sharded weights: what needs them whole is not supported
            need(self.loss.l1 == 0, "loss.l1", "the L1 penalty needs the whole weights: not with trainer.strategy=fsdp "
                                               "(use ddp)")
            need(self.trainer.precision != "fp16", "trainer.precision",
                 "fp16's GradScaler is not supported with trainer.strategy=fsdp (use bf16)")


@dataclass
class EvalConfig(Schema):
    checkpoint: str = "models/model.pt"
    metrics_file: Optional[str] = None  # JSON for `dvc metrics show`
    batch_size: int = 1000
    device: str = "auto"
    tracking_uri: Optional[str] = None  # default: the one the checkpoint was trained with

    def check(self) -> None:
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check_device(self.device, "device")


@dataclass
class ForensicsRunConfig(Schema):
    """``python src/forensics.py``: investigate a run after the fact, from the snapshot it saved."""

    run_id: Optional[str] = None  # the run (its tag forensics/snapshot names the snapshot file)
    snapshot: Optional[str] = None  # ... or a snapshot / checkpoint file directly
    step: Optional[int] = None  # the update to re-run (default: the run's bad step)
    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else ./mlflow.db
    device: str = "auto"
    top_k: int = 16

    def check(self) -> None:
        need(self.run_id is not None or self.snapshot is not None, "run_id", "give run_id=<id> (or snapshot=<file>)")
        need(self.step is None or self.step >= 0, "step", f"must be >= 0, got {self.step}")
        need(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        check_device(self.device, "device")


_REGISTERED: set = set()  # (group, name, schema) already in Hydra's ConfigStore


def register_configs() -> None:
    """The schemas into Hydra's ConfigStore: the registries' entries that are new since the last
    call (a matrix worker composes hundreds of configs; storing all of them each time was a sixth
    of a composition)."""
    cs = ConfigStore.instance()
    entries = [("schema", "config", Config), ("schema", "evaluate", EvalConfig), ("schema", "forensics", ForensicsRunConfig)]
    entries += [(f"schema/{group}", entry.name, entry.schema) for group, registry in GROUPS.items() for entry in registry]
    for group, name, node in entries:
        if (group, name, node) not in _REGISTERED:
            cs.store(group=group, name=name, node=node)
            _REGISTERED.add((group, name, node))


# ---------------------------------------------------------------- devices
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(name: str, key: str) -> None:
    try:
        device = torch.device(name) if name != "auto" else None
    except RuntimeError:
        raise ConfigError(key, f"'{name}' is not a device (auto, cpu, cuda or cuda:N)") from None
    if device is not None and device.type not in ("cpu", "cuda"):
        raise ConfigError(key, f"'{name}' is not supported (auto, cpu, cuda or cuda:N)")
    if device is not None and device.type == "cuda":
        need(torch.cuda.is_available(), key, f"'{name}' requested but CUDA is not available")
        need(device.index is None or device.index < torch.cuda.device_count(), key,
             f"'{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")


# ---------------------------------------------------------------- value rules
def check(cfg: Any) -> None:
    """Every rule a schema's types cannot express: choices, finiteness, each schema's ``check``,
    and that a group's ``name`` is the option selected. Raises ConfigError naming the full key."""
    _check_node(OmegaConf.to_object(cfg), "")


def _check_value(value: Any, key: str, meta) -> None:
    if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not meta.get("inf"))):
        raise ConfigError(key, f"must be a finite number, got {value}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(v, f"{key}.{i}", {})
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(key, f"'{value}' is not one of {', '.join(meta['choices'])}")


def _check_node(node: Any, prefix: str) -> None:
    for f in fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if is_dataclass(value):
            _check_node(value, key + ".")
        else:
            _check_value(value, key, f.metadata)
    group = prefix.rstrip(".")
    if group in GROUPS and GROUPS[group].get(node.name) is None:
        raise ConfigError(f"{group}.name", f"'{node.name}' is not one of {', '.join(GROUPS[group].names())}")
    if group in GROUPS and GROUPS[group][node.name].schema is not type(node):
        raise ConfigError(f"{group}.name", f"'{node.name}' is not the selected option (select it with {group}={node.name})")
    try:
        node.check()
    except ConfigError as exc:
        raise ConfigError(prefix + exc.key, exc.message) from None


# ---------------------------------------------------------------- composition
def conf_dir() -> Path:
    """``conf/``: $GRADLAB_CONF_DIR, else the checkout this code runs from, else ./conf."""
    candidates = [os.environ.get("GRADLAB_CONF_DIR"), Path(__file__).resolve().parents[2] / "conf", Path.cwd() / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate).resolve()
    raise ConfigError("conf", "no conf/config.yaml found: run from the gradlab checkout or set GRADLAB_CONF_DIR")


def compose_config(overrides: Sequence[str], config_name: str = "config"):
    """The checked config for ``overrides``, composed from ``conf/`` with Hydra's compose API
    (what ``src/train.py`` gets for the same overrides). Raises Hydra/OmegaConf errors for
    unknown keys, options or wrong types, and ConfigError for everything ``check`` rejects
    and for a key set inside an option that is not selected."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():  # e.g. called from inside a Hydra app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="gradlab"):
        try:
            cfg = compose(config_name=config_name, overrides=list(overrides))
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is an override into an unselected option
            blame = diagnose_overrides(overrides, compose_fn=lambda o: compose(config_name, overrides=o))
            if blame is None:
                raise
            raise blame from exc
    check(cfg)
    return cfg


def diagnose_overrides(overrides: Sequence[str], compose_fn=None) -> Optional[ConfigError]:
    """After a failed composition, the error naming the override to blame, when Hydra's own does
    not: an override that does not parse (Hydra names the bad token, not the key), or one that
    sets a key inside an option that is not selected (``stabilizer.clip.max_norm=2`` without
    ``stabilizer=clip``: OmegaConf only raises a bare AssertionError for a merge into null).
    The latter is found by composing without the value overrides and looking each key's parents
    up in that config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        try:
            parser.parse_overrides([text])
        except Exception as exc:  # noqa: BLE001 - Hydra's parse errors come in several types
            why = str(exc).splitlines()[0].removeprefix("LexerNoViableAltException: ")
            return ConfigError(text.partition("=")[0].lstrip("~+"), f"cannot parse '{text}' ({why})")
    try:
        parsed = parser.parse_overrides(list(overrides))
        values = [o for o in parsed if "." in o.key_or_group and not o.is_sweep_override()]
        base = [o.input_line for o in parsed if o not in values]
        cfg = (compose_fn or compose_config)(base)
    except Exception:  # noqa: BLE001 - no diagnosis possible: the caller reports the original error
        return None
    for o in values:
        parts = o.key_or_group.split(".")
        for i in range(1, len(parts)):
            parent, name = ".".join(parts[:i - 1]), parts[i - 1]
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is not None and name in node and node[name] is None:
                option = ".".join(parts[:i])
                group, _, choice_name = option.rpartition(".")
                return ConfigError(o.key_or_group, f"'{option}' is not selected, so it has no keys to set "
                                                   f"(select it first, e.g. {group}=[...,{choice_name}])")
    return None


def config_from_dict(saved: Dict[str, Any]):
    """A typed, checked config from a saved (resolved, plain) one, e.g. a checkpoint's: the options
    are selected by name, then every saved value is merged in. Raises ConfigError when the saved
    config does not fit this gradlab (an option or key that no longer exists)."""
    def chosen(group: str) -> str:  # a multi-select group's selection, as an override
        names = [name for name, node in (saved.get(group) or {}).items() if node is not None] or ["none"]
        return f"{group}=[{','.join(names)}]"

    # how a process was launched is not part of the experiment: the next command's strategy applies
    saved = {**saved, "trainer": {k: v for k, v in saved.get("trainer", {}).items() if k != "strategy"}}
    try:
        base = compose_config([f"data={saved['data']['name']}", f"model={saved['model']['name']}",
                               f"optimizer={saved['optimizer']['name']}", f"scheduler={saved['scheduler']['name']}",
                               chosen("stabilizer"), chosen("fault")])
        OmegaConf.set_struct(base.tracking.tags, False)  # free-form (a matrix child's matrix=..., matrix/cell=...)
        cfg = OmegaConf.merge(base, saved)
    except Exception as exc:  # noqa: BLE001 - whatever Hydra/OmegaConf says, it is the same problem
        raise ConfigError("config", f"the saved config does not fit this gradlab ({str(exc).splitlines()[0]})") from None
    check(cfg)
    return cfg


def unknown_key(key: str, value: Any = None) -> Optional[str]:
    """Why no choice of options could take the override ``key=value`` (an option or a key that no
    schema has), else None. Unlike a composition error this is about every config at once:
    ``model.residual`` is a key of deep_mlp only, so it is not unknown; ``model.residul`` is."""
    parts = key.split(".")
    registry = {**GROUPS, "stabilizer": STABILIZERS}.get(key)
    if registry is not None:  # a group's option(s)
        bad = [n for n in (value if isinstance(value, list) else [value]) if n not in registry]
        return f"'{bad[0]}' is not a {key} option (one of {', '.join(registry.names())})" if bad else None
    schemas: List[Any] = [Config]
    for i, part in enumerate(parts):
        found = []
        for schema in schemas:
            hints = get_type_hints(schema)
            if schema is Config and part in GROUPS:
                found += [e.schema for e in GROUPS[part]]
            elif part in hints:
                found.append(_optional_inner(hints[part]))
        if not found:
            parent = ".".join(parts[:i])
            if len(parts) == 1 and (conf_dir() / part).is_dir():
                return None  # another group's choice (data=..., experiment=...): composition decides
            return f"no {parent} option has a key '{part}'" if parent in GROUPS else \
                f"'{parent or 'the config'}' has no key '{part}'"
        schemas = [s for s in found if is_dataclass(s)]
        if not schemas:
            return None  # a value (or an element of one) below an existing key
    return None


def _optional_inner(hint: Any) -> Any:
    """X for Optional[X], else the hint itself."""
    if get_origin(hint) is Union:
        inner = [a for a in get_args(hint) if a is not type(None)]
        return inner[0] if len(inner) == 1 else hint
    return hint


def scenario_names() -> List[str]:
    """The failure presets: conf/experiment/*.yaml."""
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


# ---------------------------------------------------------------- documentation
def _default(f) -> Any:
    from dataclasses import MISSING as NO_DEFAULT

    return f.default_factory() if f.default_factory is not NO_DEFAULT else f.default


def _hydra_value(value: Any) -> str:
    """A value as one writes it in a Hydra override."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def options_table() -> str:
    """The README's table of every option with its knobs and defaults, generated from the
    registries (``python -m gradlab.config``; tests/test_registry.py checks the README has it)."""
    rows = ["| group | option | knobs (default; choices) |", "|---|---|---|"]
    for group, registry in {**GROUPS, "stabilizer": STABILIZERS, "fault": FAULTS}.items():
        for entry in registry:
            knobs = []
            for f in fields(entry.schema):
                if f.name == "name":
                    continue
                shown = _hydra_value(_default(f))
                choices = f.metadata.get("choices")
                alternatives = " (" + "\\|".join(choices) + ")" if choices else ""  # \| : a | inside a table cell
                knobs.append(f"`{f.name}={shown}`{alternatives}")
            rows.append(f"| {group} | `{entry.name}` | {', '.join(knobs) or '—'} |")
    return "\n".join(rows)


def help_text(script: str) -> str:
    """``--help`` of the Hydra entry points: the selectable groups and options (from the registries
    and conf/), not Hydra's listing, which would show the internal schema/* groups."""
    conf = conf_dir()
    groups = {"data": sorted(p.stem for p in (conf / "data").glob("*.yaml")), **{g: r.names() for g, r in GROUPS.items()},
              "stabilizer": [*STABILIZERS.names(), "(several: stabilizer=[warmup,clip])"],
              "fault": [*FAULTS.names(), "(several: fault=[bad_batch,lr_spike])"], "experiment": scenario_names()}
    lines = [f"{script}: gradlab's {'training run' if script == 'train.py' else 'test-set evaluation'} "
             "(Hydra app; overrides: key=value, group=option)", "",
             f"Usage: python src/{script} [overrides] [--cfg job] [-m for sweeps] [--hydra-help]", ""]
    if script == "train.py":
        lines += ["Config groups (option names):"] + [f"  {g:<11} {', '.join(o)}" for g, o in groups.items()]
        lines += ["", "Every option's knobs and defaults: README 'Command-line forms', or python -m gradlab.config.",
                  "Examples:", "  python src/train.py stabilizer=clip",
                  "  python src/train.py experiment=explode_rnn 'stabilizer=[warmup,clip]' seed=1",
                  "  python src/train.py experiment=explode_rnn stabilizer=clip trainer.resume=auto"]
    else:
        lines += ["Keys: checkpoint, metrics_file, batch_size, device, tracking_uri",
                  "Example: python src/evaluate.py checkpoint=models/model.pt metrics_file=metrics/test.json"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_table())
