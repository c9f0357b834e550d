"""Typed schemas for every Hydra config group, and one-line config errors.

The schemas live in Hydra's ConfigStore under the separate group ``schema`` so
they never show up as selectable options; ``conf/config.yaml`` lists
``schema`` first in its defaults so every option file is validated against it.
A typo or a wrong type therefore fails at composition time, naming the key.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value that type-checks but makes no sense (reported like a schema error)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


# ---------------------------------------------------------------- data / model / optimizer
@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist | synthetic
    root: str = "data"  # where fetch/prepare write (relative to the project root)
    val_size: int = 5000  # held out from the training set, seeded
    sequence: str = "rows"  # how rnn/lstm read an image: rows (28 steps) | pixels (784 steps)
    synthetic_size: int = 2048  # training images when name=synthetic


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp | cnn | deep_mlp | rnn | lstm
    hidden_sizes: List[int] = field(default_factory=lambda: [512, 256])  # mlp
    depth: int = 20  # deep_mlp: hidden layers
    width: int = 256  # deep_mlp width
    residual: bool = False  # deep_mlp: x + f(x) blocks
    channels: List[int] = field(default_factory=lambda: [32, 64])  # cnn
    pool: str = "max"  # cnn: max | avg
    hidden: int = 128  # rnn/lstm hidden units
    nonlinearity: str = "tanh"  # rnn: tanh | relu
    recurrent_init: str = "default"  # rnn: default | orthogonal | identity
    recurrent_gain: float = 1.0  # rnn: scale of W_hh (rho)
    activation: str = "relu"  # relu | tanh | sigmoid | gelu
    init: str = "default"  # default | xavier | kaiming | orthogonal
    gain: float = 1.0  # multiplies the init scale; >1 shows what bad init does
    norm: str = "none"  # none | batchnorm | layernorm
    dropout: float = 0.0


@dataclass
class OptimizerConfig:
    name: str = "adam"  # sgd | adam | adamw | rmsprop
    lr: float = 1e-3
    momentum: float = 0.0  # sgd, rmsprop
    nesterov: bool = False  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam(w)
    eps: float = 1e-8
    alpha: float = 0.99  # rmsprop smoothing
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False  # AdamW-style decay (always on for adamw)


@dataclass
class SchedulerConfig:
    name: str = "none"  # none | step | cosine | onecycle | plateau
    step_size: int = 1  # step: epochs between decays
    gamma: float = 0.1  # step decay factor
    eta_min: float = 0.0  # cosine floor
    pct_start: float = 0.3  # onecycle: fraction of steps rising
    div_factor: float = 25.0  # onecycle: initial lr = lr / div_factor
    factor: float = 0.1  # plateau: lr multiplier on plateau
    patience: int = 1  # plateau: epochs without val-loss improvement


# ---------------------------------------------------------------- stabilizers (multi-select)
@dataclass
class NoneStabilizer:
    """Selecting ``none`` selects nothing; it exists so ``stabilizer=none`` reads naturally."""


@dataclass
class ClipConfig:
    max_norm: float = 1.0
    norm_type: float = 2.0  # any p >= 1, or inf


@dataclass
class ClipValueConfig:
    clip_value: float = 1.0


@dataclass
class AGCConfig:
    clipping: float = 0.01  # lambda
    eps: float = 1e-3
    exclude: List[str] = field(default_factory=lambda: ["auto"])  # "auto" = final classifier layer


@dataclass
class AutoClipConfig:
    percentile: float = 10.0
    window: int = 1000  # bounded history of total norms


@dataclass
class ZClipConfig:
    warmup_steps: int = 25
    alpha: float = 0.97
    z_thresh: float = 2.5
    mode: str = "zscore"  # zscore (adaptive threshold) | mean
    max_grad_norm: Optional[float] = None  # hard cap, also during warmup


@dataclass
class SpikeSkipConfig:
    window: int = 128
    threshold: float = 6.0  # z-score above which the update is skipped
    min_history: int = 20


@dataclass
class WarmupConfig:
    steps: int = 500


@dataclass
class StabilizerConfig:
    """Selected options are applied in this field order, whatever the order on the command
    line (Hydra merges a multi-select into one node): element-wise, then unit-wise, then
    global-norm clipping; spike_skip decides on the raw (pre-stabilizer) norm."""

    none: Optional[NoneStabilizer] = None
    warmup: Optional[WarmupConfig] = None
    clip_value: Optional[ClipValueConfig] = None
    agc: Optional[AGCConfig] = None
    clip: Optional[ClipConfig] = None
    autoclip: Optional[AutoClipConfig] = None
    zclip: Optional[ZClipConfig] = None
    spike_skip: Optional[SpikeSkipConfig] = None


# ---------------------------------------------------------------- run-level settings
@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    l1: float = 0.0  # coefficient of the L1 penalty on all weights


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: Optional[int] = None  # caps optimizer steps (smoke runs)
    batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    precision: str = "32"  # 32 | bf16 | fp16
    checkpoint: Optional[str] = None  # where the final checkpoint goes (default: the Hydra run dir)
    resume: Optional[str] = None  # checkpoint to continue from
    progress: bool = True  # progress bar (only on a terminal)


@dataclass
class TelemetryConfig:
    log_every: int = 50  # steps between device->host copies of the per-step history
    layer_every: int = 10  # steps between per-layer norm / update-ratio samples
    explosion_factor: float = 100.0  # norm growth that flags an explosion ...
    explosion_window: int = 100  # ... within this many steps
    plots: bool = True  # heatmap + norm plot artifacts


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment: str = "gradlab"
    run_name: Optional[str] = None  # default: <model>-<stabilizers>-s<seed>
    parent_run_id: Optional[str] = None  # nest this run under a parent (matrix, search)
    tags: Any = field(default_factory=dict)  # extra tags, e.g. scenario=...


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    stabilizer: StabilizerConfig = field(default_factory=StabilizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    scenario: str = "default"  # names the failure preset (set by experiment=...)


@dataclass
class EvalConfig:
    checkpoint: str = "models/model.pt"
    metrics_file: Optional[str] = None  # JSON for `dvc metrics show`
    batch_size: int = 1000
    device: str = "auto"
    tracking_uri: Optional[str] = None  # default: the one the checkpoint was trained with


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="schema", name="config", node=Config)
    cs.store(group="schema", name="evaluate", node=EvalConfig)


# ---------------------------------------------------------------- semantic checks
CHOICES = {
    "data.name": ("mnist", "fashion_mnist", "synthetic"),
    "data.sequence": ("rows", "pixels"),
    "model.name": ("mlp", "cnn", "deep_mlp", "rnn", "lstm"),
    "model.pool": ("max", "avg"),
    "model.nonlinearity": ("tanh", "relu"),
    "model.recurrent_init": ("default", "orthogonal", "identity"),
    "model.activation": ("relu", "tanh", "sigmoid", "gelu"),
    "model.init": ("default", "xavier", "kaiming", "orthogonal"),
    "model.norm": ("none", "batchnorm", "layernorm"),
    "optimizer.name": ("sgd", "adam", "adamw", "rmsprop"),
    "scheduler.name": ("none", "step", "cosine", "onecycle", "plateau"),
    "stabilizer.zclip.mode": ("zscore", "mean"),
    "trainer.precision": ("32", "bf16", "fp16"),
}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None) if node is not None else None
    return node


def check(cfg: Any) -> None:
    """Checks that a schema cannot express (choices, ranges, combinations)."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and str(value) not in allowed:
            raise ConfigError(key, f"'{value}' is not one of {', '.join(allowed)}")
    positive = ["optimizer.lr", "trainer.batch_size", "telemetry.log_every", "telemetry.layer_every"]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(key, f"must be > 0, got {_get(cfg, key)}")
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps", "must be > 0 (or null for no cap)")
    st = cfg.stabilizer
    if st.clip is not None and (st.clip.max_norm <= 0 or st.clip.norm_type < 1):
        raise ConfigError("stabilizer.clip", "needs max_norm > 0 and norm_type >= 1 (or inf)")
    if st.autoclip is not None and not 0 < st.autoclip.percentile <= 100:
        raise ConfigError("stabilizer.autoclip.percentile", "must be in (0, 100]")
    if st.warmup is not None and st.warmup.steps < 1:
        raise ConfigError("stabilizer.warmup.steps", "must be >= 1")
    if st.warmup is not None and cfg.scheduler.name == "onecycle":
        raise ConfigError("stabilizer.warmup", "onecycle already warms up (scheduler.pct_start); drop one")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError("model.dropout", "must be in [0, 1)")


# ---------------------------------------------------------------- one-line errors
def describe_error(exc: BaseException) -> Optional[str]:
    """Return a one-line description if ``exc`` is a config problem, else None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    key = _override_into_null(chain)
    if key is not None:
        group, _, option = key.partition(".")
        option = option.split(".")[0]
        return (f"invalid config '{key}': '{group}.{option}' is not selected, so it has no keys to set "
                f"(select it first, e.g. {group}=[...,{option}])")
    if not any(isinstance(e, (HydraException, OmegaConfBaseException, ConfigError)) for e in chain):
        return None
    for e in chain:  # the most precise message names the full key
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        if key and isinstance(e, (OmegaConfBaseException, ConfigError)):
            msg = str(e).splitlines()[0].strip()
            if isinstance(e, ConfigError):
                msg = msg.split(": ", 1)[-1]
            return f"invalid config '{key}': {msg}"
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


def _override_into_null(chain) -> Optional[str]:
    """The key of a command-line override that Hydra tried to merge into a null node
    (e.g. ``stabilizer.clip.max_norm=2`` without selecting ``clip``). OmegaConf reports this
    with a bare AssertionError; the override is read from Hydra's frame that applied it."""
    for e in chain:
        if not isinstance(e, AssertionError):
            continue
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "_apply_overrides_to_config":
                key = tb.tb_frame.f_locals.get("key")
                return str(key) if key else None
            tb = tb.tb_next
    return None


def fail(line: str, code: int) -> None:
    print(f"gradlab: {line}", file=sys.stderr)
    sys.exit(code)


def task(fn):
    """Decorate a Hydra task: config errors raised while it runs exit 2 and data errors
    exit 1, each as one line (Hydra would otherwise print its own wrapper first)."""
    import functools

    @functools.wraps(fn)
    def wrapper(cfg):
        from .data import DataError

        try:
            return fn(cfg)
        except DataError as exc:
            fail(str(exc), 1)
        except Exception as exc:  # noqa: BLE001
            line = describe_error(exc)
            if line is None:
                raise
            fail(line, 2)

    return wrapper


def run_cli(main_fn) -> None:
    """Run a ``@hydra.main`` function; config errors become one line and exit code 2."""
    import os

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let errors reach us instead of Hydra's printer
    try:
        main_fn()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - we re-raise anything not config-related
        if isinstance(exc, SystemExit):
            raise
        line = describe_error(exc)
        if line is None:
            raise
        fail(line, 2)
