"""Random and TPE (Bayesian) search over any config keys with Optuna, one MLflow parent run.

A search space is a list of ``--param`` specs, each ``KEY=KIND:ARGS``::

    optimizer.lr=loguniform:1e-4:1.0      float, sampled on a log scale (0 < low < high)
    stabilizer.clip.max_norm=uniform:0.1:10
    model.depth=int:4:24                   integer, both ends included
    optimizer=choice:sgd,adam              any Hydra value; a config group picks an option file,
    stabilizer=choice:none,clip,[warmup,clip]   and commas inside [...] belong to the value
    remedy=choice:clip,he_init,layernorm   named remedies (gradlab.remedies): each applies its own
                                           overrides, as defined in params.yaml's matrix.remedies

Each trial composes ``conf/`` with the fixed overrides plus the sampled values (Hydra's
compose API, as :mod:`gradlab.matrix` does), trains in-process as an MLflow child run of
the search's parent run (tags ``study`` and ``trial``), and reports the chosen metric, read
back from the run, to Optuna. ``test/...`` metrics evaluate the checkpoint on the test split first.

Why a diverged trial reports the worst possible value (-inf when maximizing, +inf when
minimizing) rather than ``TrialState.FAIL``: Optuna's samplers ignore failed trials, so TPE
would learn nothing from divergence and keep proposing learning rates in the region that
explodes; an infinitely bad value puts those points in TPE's "bad" group and steers it away.
Its metrics are also meaningless (the weights are NaN; the accuracy of a NaN model is
whatever class argmax picks first), so the worst value is the honest one. A trial that
raises is FAIL: out of device memory (a sampled model too large) is recorded and the search
goes on; any other error stops the search, since every later trial would meet it too.

Optuna's storage is in memory unless ``storage`` is a database URL; processes that pass
the same URL and study name join one study (``load_if_exists``), each with its own parent run.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .cli import describe_error
from .config import ConfigError, compose_config
from .remedies import Remedy, resolve

SAMPLERS = ("tpe", "random")
KINDS = ("uniform", "loguniform", "int", "choice")
DEFAULT_EXPERIMENT = "gradlab-search"
REMEDY = "remedy"  # the --param key that samples named remedies


class SearchSpecError(ValueError):
    """A bad search definition (a --param, --metric or a mismatched study): reported as one line, exit 2."""


# ---------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()
    text: str = ""  # as given on the command line, for messages
    remedies: tuple = ()  # key remedy: the Remedy of each choice

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")

    def distribution(self):
        """The Optuna distribution ``suggest`` samples from (to check a joined study's history against)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return FloatDistribution(self.low, self.high, log=self.kind == "loguniform")

    def overrides(self, value: Any) -> List[str]:
        """The Hydra overrides of a sampled value: a remedy's own, else ``key=value``."""
        if self.remedies:
            return list(self.remedy(value).overrides)
        return [f"{self.key}={value!r}" if isinstance(value, float) else f"{self.key}={value}"]

    def remedy(self, name: str) -> Remedy:
        return next(r for r in self.remedies if r.name == name)

    def describe(self, value: Any) -> str:
        return f"{self.key}={value}: {' '.join(self.overrides(value))}" if self.remedies else self.overrides(value)[0]

    def extremes(self) -> List[Any]:
        """Values that exercise the whole range: composing each one checks the spec before any run."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


def _split_top_level(text: str) -> List[str]:
    """Split at commas outside brackets, so ``none,[warmup,clip]`` is two values."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def parse_param(text: str) -> Param:
    def bad(why: str) -> SearchSpecError:
        return SearchSpecError(f"bad --param '{text}': {why}")

    key, sep, spec = text.partition("=")
    key, (kind, _, args) = key.strip(), spec.partition(":")
    if not sep or not key or " " in key:
        raise bad("expected KEY=KIND:ARGS, e.g. optimizer.lr=loguniform:1e-4:1")
    if kind not in KINDS:
        raise bad(f"unknown kind '{kind}' (one of {', '.join(KINDS)})")
    if kind == "choice":
        choices = tuple(c.strip() for c in _split_top_level(args))
        if len(choices) < 2 or not all(choices):
            raise bad("choice needs at least two non-empty values: choice:a,b")
        return Param(key, kind, choices=choices, text=text)
    bounds = args.split(":")
    try:
        low, high = (int(b) for b in bounds) if kind == "int" else (float(b) for b in bounds)
    except ValueError:
        number = "integers" if kind == "int" else "numbers"
        raise bad(f"{kind} needs two {number}: {kind}:LOW:HIGH") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise bad(f"needs finite LOW < HIGH, got {low} and {high}")
    if kind == "loguniform" and low <= 0:
        raise bad("loguniform needs LOW > 0")
    return Param(key, kind, low, high, text=text)


def with_remedies(p: Param, defined: Dict[str, Remedy]) -> Param:
    """``remedy=choice:...``: each choice resolved to a remedy of ``defined`` or a stabilizer value."""
    if p.kind != "choice":
        raise SearchSpecError(f"bad --param '{p.text}': remedies are sampled by name: remedy=choice:a,b")
    try:
        return replace(p, remedies=tuple(resolve(c, defined, "remedy") for c in p.choices))
    except ConfigError as exc:
        raise SearchSpecError(f"bad --param '{p.text}': {exc.message}") from None


def parse_space(texts: Sequence[str], remedies: Optional[Dict[str, Remedy]] = None) -> List[Param]:
    """The --param specs; ``remedies`` are the named remedies ``remedy=choice:...`` may pick from."""
    if not texts:
        raise SearchSpecError("no --param given: nothing to search over")
    params = [parse_param(t) for t in texts]
    params = [with_remedies(p, remedies or {}) if p.key == REMEDY else p for p in params]
    seen = set()
    for p in params:
        if p.key in seen:
            raise SearchSpecError(f"bad --param '{p.text}': '{p.key}' is searched twice")
        seen.add(p.key)
    return params


def check_space(params: Sequence[Param], fixed: Sequence[str]) -> None:
    """Compose every end of every range before anything runs, so an unknown key, a wrong type
    or an out-of-range value fails now, naming its --param, and not at trial 7.
    Params are added one at a time, so an error is charged to the first one that causes it."""
    compose_config(fixed)  # a bad fixed override fails here with gradlab's own one-line message
    base = list(fixed)
    for p in params:
        for value in p.extremes():
            try:
                compose_config([*base, *p.overrides(value)])
            except Exception as exc:  # noqa: BLE001 - reported as this --param's error, or re-raised
                line = describe_error(exc)
                if line is None:
                    raise
                raise SearchSpecError(f"bad --param '{p.text}': {line} (with {p.describe(value)})") from None
        base += p.overrides(p.extremes()[0])


# ---------------------------------------------------------------- running
@dataclass
class SearchSpec:
    params: List[Param]
    fixed: List[str]  # Hydra overrides for every trial
    metric: str = "val/accuracy"
    direction: Optional[str] = None  # default: maximize for *accuracy, else minimize
    sampler: str = "tpe"
    trials: int = 20  # run by this process (workers sharing a study each run this many)
    startup_trials: int = 10  # TPE: random trials before the model takes over
    seed: Optional[int] = None
    storage: Optional[str] = None  # Optuna RDB URL; None = in memory
    study_name: Optional[str] = None
    experiment: str = DEFAULT_EXPERIMENT

    def resolved_direction(self) -> str:
        return self.direction or ("maximize" if self.metric.endswith("accuracy") else "minimize")


def _sampler(spec: SearchSpec):
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)


def _redacted(url: Optional[str]) -> str:
    """The storage URL without its password (it is logged as a param)."""
    if not url:
        return "in-memory"
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: Optuna will reject it itself
        return url


STORAGE_ATTEMPTS = 5  # a worker that lost the race to create a new storage's schema tries again


def open_study(spec: SearchSpec):
    import optuna
    from optuna.distributions import check_distribution_compatibility

    name = spec.study_name or f"gradlab-{spec.sampler}-{time.strftime('%Y%m%d-%H%M%S')}"
    direction = spec.resolved_direction()
    study = None
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            study = optuna.create_study(study_name=name, storage=spec.storage, sampler=_sampler(spec),
                                        direction=direction, load_if_exists=True)
            break
        except Exception as exc:  # noqa: BLE001 - an unknown dialect, a refused connection: the URL is to blame
            # workers started together on a new database race to create its schema (or the study):
            # the loser's IntegrityError means the other one did it; try again
            if type(exc).__name__ != "IntegrityError" or attempt == STORAGE_ATTEMPTS - 1:
                raise SearchSpecError(f"--storage {_redacted(spec.storage)}: cannot open the study storage "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
            time.sleep(0.5 * (attempt + 1))
    if study.direction.name.lower() != direction:
        raise SearchSpecError(f"study '{name}' exists and is to {study.direction.name.lower()}, not {direction}")
    metric = study.user_attrs.get("metric")
    if metric is not None and metric != spec.metric:
        raise SearchSpecError(f"study '{name}' exists and optimizes '{metric}', not --metric '{spec.metric}'")
    study.set_user_attr("metric", spec.metric)
    known = {k: d for t in study.get_trials(deepcopy=False) for k, d in t.distributions.items()}
    for p in spec.params:  # Optuna would otherwise fail mid-search, at the first suggest
        try:
            if p.key in known:
                check_distribution_compatibility(known[p.key], p.distribution())
        except ValueError:
            raise SearchSpecError(f"bad --param '{p.text}': study '{name}' samples '{p.key}' from {known[p.key]}") from None
    return study


@dataclass
class TrialOutcome:
    value: float  # what Optuna is told
    run_id: str
    diverged: bool
    diverged_at_step: Optional[int]
    seconds: float


def run_trial(trial, spec: SearchSpec, parent, workdir: Path, study_name: str) -> TrialOutcome:
    """Sample, compose, train (+ evaluate for test/ metrics) one trial as a child run of ``parent``."""
    from mlflow import MlflowClient

    t0 = time.perf_counter()
    values = {p.key: p.suggest(trial) for p in spec.params}
    out_dir = workdir / f"trial{trial.number:04d}"
    overrides = [o for p in spec.params for o in p.overrides(values[p.key])]
    remedy = {k: v for p in spec.params if p.remedies for k, v in p.remedy(values[p.key]).tags().items()}
    cfg, result = parent.child([*spec.fixed, *overrides], out_dir, run_name=f"{study_name}-t{trial.number}",
                               tags={"study": study_name, "trial": trial.number, **remedy})
    uri = parent.uri
    if spec.metric.startswith("test/") and not result.diverged:
        from .evaluation import evaluate

        evaluate(result.checkpoint, None, device=cfg.trainer.device, tracking_uri=uri, out_dir=out_dir)
    client = MlflowClient(uri)
    worst = -math.inf if spec.resolved_direction() == "maximize" else math.inf
    if result.diverged:
        value = worst
    else:
        logged = client.get_run(result.run_id).data.metrics
        if spec.metric not in logged:
            per_layer = ("grad/layer/", "update_ratio/")
            raise SearchSpecError(f"--metric '{spec.metric}' is not logged by the runs (run {result.run_id} has: "
                                  f"{', '.join(sorted(k for k in logged if not k.startswith(per_layer)))})")
        value = logged[spec.metric] if math.isfinite(logged[spec.metric]) else worst
    client.log_metric(result.run_id, "search/objective", value, step=result.steps)
    return TrialOutcome(value, result.run_id, result.diverged, result.diverged_at_step, time.perf_counter() - t0)


def _trial_line(trial, outcome: TrialOutcome, spec: SearchSpec, done: int) -> str:
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    head = f"[{done}/{spec.trials}] trial {trial.number}: {params} ->"
    if outcome.diverged:
        return f"{head} diverged at step {outcome.diverged_at_step}, reported as {outcome.value} ({outcome.seconds:.1f}s)"
    return f"{head} {spec.metric} = {outcome.value:.4f} ({outcome.seconds:.1f}s)"


def trials_table(study, path: Path) -> Path:
    table = study.trials_dataframe(attrs=("number", "value", "params", "user_attrs", "state", "duration"))
    table["duration"] = table["duration"].dt.total_seconds()  # seconds, not "0 days 00:00:03.49"
    table.to_csv(path, index=False)
    return path


def run_search(spec: SearchSpec, uri: Optional[str] = None,
               log: Callable[[str], None] = lambda m: print(m, flush=True)) -> Dict[str, Any]:
    """Run ``spec.trials`` trials under one parent run; returns a summary of the study."""
    import optuna
    import torch
    from optuna.trial import TrialState

    from .runs import ParentRun

    check_space(spec.params, spec.fixed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from here instead
    study = open_study(spec)
    params = {"sampler": spec.sampler, "trials": str(spec.trials), "metric": spec.metric,
              "direction": spec.resolved_direction(), "seed": str(spec.seed), "study": study.study_name,
              "storage": _redacted(spec.storage), "overrides": json.dumps(spec.fixed),
              **({"startup_trials": str(spec.startup_trials)} if spec.sampler == "tpe" else {}),
              **{f"space.{p.key}": p.text.partition("=")[2] for p in spec.params}}
    with ParentRun(uri, spec.experiment, f"search-{study.study_name}", "search", params,
                   {"study": study.study_name, "sampler": spec.sampler}) as parent:
        log(f"search: {spec.sampler} over {', '.join(p.key for p in spec.params)}, {spec.trials} trials, "
            f"{spec.resolved_direction()} {spec.metric}; study '{study.study_name}' ({_redacted(spec.storage)}), "
            f"parent run {parent.run_id} in experiment '{spec.experiment}', {parent.uri}")
        if spec.sampler == "tpe" and len(study.trials) + spec.trials <= spec.startup_trials:
            log(f"search: note: all {spec.trials} trials fall within TPE's {spec.startup_trials} random start-up "
                "trials (lower --startup-trials to let the model steer)")
        t0 = time.perf_counter()
        outcomes: List[TrialOutcome] = []
        with tempfile.TemporaryDirectory(prefix="gradlab-search-") as workdir:
            for done in range(1, spec.trials + 1):
                trial = study.ask()
                try:
                    outcome = run_trial(trial, spec, parent, Path(workdir), study.study_name)
                except torch.OutOfMemoryError as exc:
                    study.tell(trial, state=TrialState.FAIL)
                    log(f"[{done}/{spec.trials}] trial {trial.number}: FAILED, out of memory ({str(exc).splitlines()[0]})")
                    continue
                except BaseException:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                for key, value in (("run_id", outcome.run_id), ("diverged", outcome.diverged),
                                   ("diverged_at_step", outcome.diverged_at_step)):
                    trial.set_user_attr(key, value)
                line = _trial_line(trial, outcome, spec, done)
                study.tell(trial, outcome.value)
                outcomes.append(outcome)
                log(line)
        wall = time.perf_counter() - t0
        summary = _log_summary(study, parent.logger, spec, outcomes, wall)
        log(summary["line"])
        return summary


def _log_summary(study, parent, spec: SearchSpec, outcomes: List[TrialOutcome], wall: float) -> Dict[str, Any]:
    """Best params/value, counts and the study's trials table (CSV) into the parent run."""
    from optuna.trial import TrialState

    now = int(time.time() * 1000)
    parent.log_metrics({"trials/complete": len(outcomes), "trials/failed": spec.trials - len(outcomes),
                        "trials/diverged": sum(o.diverged for o in outcomes), "time/search_s": wall}, step=0, timestamp_ms=now)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if math.isfinite(t.value)]
    summary: Dict[str, Any] = {"parent_run_id": parent.run_id, "study": study.study_name,
                               "run_ids": [o.run_id for o in outcomes], "wall_seconds": round(wall, 1),
                               "failed": spec.trials - len(outcomes), "best_value": None, "best_params": None}
    if complete:
        best = study.best_trial
        parent.log_params({f"best.{k}": str(v) for k, v in best.params.items()})
        parent.log_metrics({"best/value": best.value}, step=0, timestamp_ms=now)
        parent.set_tags({"best_trial": best.number, "best_run_id": best.user_attrs.get("run_id", "")})
        summary.update(best_value=best.value, best_params=best.params, best_trial=best.number,
                       best_run_id=best.user_attrs.get("run_id"))
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        summary["line"] = (f"search: best {spec.metric} = {best.value:.4f} (trial {best.number}, run "
                           f"{best.user_attrs.get('run_id')}): {params}; {len(outcomes)} trials here in {wall:.0f}s, "
                           f"{len(study.trials)} in the study; parent run {parent.run_id}")
    else:
        summary["line"] = f"search: no trial of study '{study.study_name}' converged ({wall:.0f}s); parent run {parent.run_id}"
    with tempfile.TemporaryDirectory() as tmp:
        parent.log_artifact(trials_table(study, Path(tmp) / "trials.csv"), "search")
    return summary
