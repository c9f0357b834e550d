"""The benchmark matrix: scenarios x remedies x seeds, one MLflow parent run.

The matrix is defined under ``matrix:`` in ``params.yaml``::

    matrix:
      experiment: gradlab-matrix
      remedies:                          # name: the Hydra overrides that apply it
        he_init: [model.init=kaiming, model.gain=1.0]
        lstm: [model=lstm]
        clip+layernorm: [stabilizer=clip, model.norm=layernorm]
      scenarios:
        - explode_high_lr                 # a preset name: runs every remedy of matrix.remedies
        - name: explode_rnn               # or a mapping, with the scenario's own remedy list
          remedies: [none, clip, "[warmup,clip]", lstm]
      seeds: [0, 1, 2]
      overrides: [trainer.deterministic=true]   # Hydra overrides for every run
      jobs: 1                                   # parallel training processes
      ensemble: none                            # seeds | remedies: vmapped ensembles (gradlab.ensemble)

A remedy named in a list is one of ``matrix.remedies`` or a plain stabilizer value (``clip``,
``"[warmup,clip]"``: the override ``stabilizer=<value>``); the older ``stabilizers: [...]`` list
still works and defines such remedies. A scenario is a preset name (``experiment=<name>``) or a
mapping ``{name: rnn_pixels, experiment: explode_rnn, overrides: [data.sequence=pixels],
remedies: [...]}`` (the runs are then tagged ``scenario=rnn_pixels``).

Every (scenario, remedy) cell is composed before anything runs (:func:`plan`). A scenario
that does not compose is an error; a remedy whose overrides do not compose with a scenario
(``model.residual=true`` on the RNN: its schema has no such key) is *not applicable* there:
recorded with the composition error as the reason, in ``reports/matrix_runs.json`` and on the
parent run (``matrix/not_applicable.json``), and shown as such by the report. A remedy whose
keys no config has at all (a typo) is an error before that (:func:`gradlab.remedies.check_remedy`).

Every run's config is composed with Hydra's compose API from
``experiment=<scenario> <remedy overrides> seed=<s> <overrides...>``, nested under the
matrix's parent run (tags ``matrix=<parent>``, ``remedy``, ``remedy_kind``) by
:mod:`gradlab.runs`, trained and then evaluated on the test split with
:func:`gradlab.evaluation.evaluate`, both in-process. The run ids go to
``reports/matrix_runs.json`` for ``pipelines/compare.py``.

Why an in-process loop (and not DVC matrix stages or a Hydra multirun)
----------------------------------------------------------------------
* **One parent run, one store set-up.** The loop creates/upgrades the MLflow store once,
  opens the parent run, and hands its id to every child. DVC ``matrix:`` stages would be
  72 independent stages with no place to create the parent first or to collect the run ids
  afterwards (each stage would need its own output file and a gather stage); a Hydra
  multirun can nest the runs only if something outside it creates the parent first.
* **Train *and* evaluate per run.** Each combination is ``train()`` then ``evaluate()`` on
  the checkpoint; a Hydra sweep runs one task function per job, so the evaluation would need
  a second sweep or a second entry point.
* **Cheap per run.** Composing a config costs milliseconds; starting a Python process that
  imports torch and MLflow costs seconds. With ~400-step runs on a 2-core CPU the
  per-process start-up of a multirun or of 72 DVC stages is a noticeable share of the time.
* **One DVC stage, one cache decision.** ``params.yaml``'s ``matrix`` key is the single
  user-editable definition; DVC re-runs the matrix when it (or the code/data) changes and
  the report stage when the run list changes. DVC matrix stages would re-run single cells
  selectively, but they also cache per cell and fragment the MLflow bookkeeping.
* **A cluster when one machine is not enough**: ``executor: local|slurm`` hands the cells to
  submitit in ``jobs`` jobs instead (``gradlab.cluster``), with the same parent run, records and
  run list.
* **Parallelism is optional**: ``jobs: N`` runs the combinations in N worker processes
  (joblib/loky, ``torch`` threads split between them); the store is created before the
  workers start, so they never race on SQLite migrations. The default ``jobs: 1`` uses
  both cores for one run at a time, which on a 2-core CPU is as fast as two 1-thread jobs
  and keeps the run-to-run arithmetic (thread count) fixed, so seeds reproduce exactly.
"""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from .cli import describe_error
from .config import ConfigError, compose_config
from .remedies import Remedy, define_all, overrides_list, resolve, stabilizer_remedy

DEFAULT_EXPERIMENT = "gradlab-matrix"
NONE = stabilizer_remedy("none")
EXECUTORS = ("loop", "local", "slurm")  # local/slurm: gradlab.cluster
ENSEMBLE_MODES = ("none", "seeds", "remedies")  # matrix.ensemble (gradlab.ensemble)


# ---------------------------------------------------------------- the matrix definition
@dataclass
class Scenario:
    name: str  # the scenario tag the runs get
    overrides: List[str]
    remedies: Optional[List[Remedy]] = None  # None: every remedy of the matrix


@dataclass
class Combination:
    index: int
    scenario: Scenario
    remedy: Remedy
    seed: int

    @property
    def overrides(self) -> List[str]:
        return [*self.scenario.overrides, *self.remedy.overrides, f"seed={self.seed}"]

    def describe(self) -> str:
        return f"{self.scenario.name} remedy={self.remedy.name} seed={self.seed}"


@dataclass
class MatrixSpec:
    experiment: str = DEFAULT_EXPERIMENT
    scenarios: List[Scenario] = field(default_factory=list)
    remedies: Dict[str, Remedy] = field(default_factory=lambda: {"none": NONE})
    seeds: List[int] = field(default_factory=lambda: [0])
    overrides: List[str] = field(default_factory=list)
    jobs: int = 1
    executor: str = "loop"  # loop (this process), or local / slurm: submitit jobs (gradlab.cluster)
    ensemble: str = "none"  # seeds: a cell's seeds as one vectorized ensemble; remedies: per scenario

    def remedies_of(self, scenario: Scenario) -> List[Remedy]:
        return list(self.remedies.values()) if scenario.remedies is None else scenario.remedies

    def cells(self) -> List[Tuple[Scenario, Remedy]]:
        return [(sc, remedy) for sc in self.scenarios for remedy in self.remedies_of(sc)]

    def combinations(self, cells: Optional[Sequence[Tuple[Scenario, Remedy]]] = None) -> List[Combination]:
        """Every seed of every cell (default: of every cell, applicable or not)."""
        runs = [(sc, remedy, seed) for sc, remedy in (self.cells() if cells is None else cells) for seed in self.seeds]
        return [Combination(i, *run) for i, run in enumerate(runs)]

    def resolve(self, names: Sequence[Any], key: str) -> List[Remedy]:
        return [resolve(n, self.remedies, key) for n in names]


def _scenario(value: Any, spec: MatrixSpec) -> Scenario:
    if isinstance(value, str):
        return Scenario(value, [f"experiment={value}"])
    if not (isinstance(value, dict) and "name" in value):
        raise ConfigError("matrix.scenarios", f"entry {value!r} is neither a preset name nor "
                                              "{name: ..., experiment: ..., overrides: [...], remedies: [...]}")
    name = str(value["name"])
    unknown = set(value) - {"name", "experiment", "overrides", "remedies"}
    if unknown:
        raise ConfigError(f"matrix.scenarios.{name}.{sorted(unknown)[0]}", "unknown key")
    preset = value.get("experiment", name)  # experiment: null for a scenario made of overrides only
    base = [f"experiment={preset}"] if preset else []
    remedies = value.get("remedies")
    return Scenario(name, [*base, *overrides_list(value.get("overrides"), f"matrix.scenarios.{name}.overrides"),
                           f"scenario={name}"],
                    None if remedies is None else spec.resolve(remedies, f"matrix.scenarios.{name}.remedies"))


def spec_from_dict(d: Dict[str, Any]) -> MatrixSpec:
    known = {"experiment", "scenarios", "remedies", "stabilizers", "seeds", "overrides", "jobs", "executor", "ensemble"}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"matrix.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(sorted(known))})")
    scenarios = d.get("scenarios") or []
    if not scenarios:
        raise ConfigError("matrix.scenarios", "needs at least one scenario")
    seeds = d.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError("matrix.seeds", f"expected a list of integers >= 0, got {d.get('seeds')!r}")
    jobs = d.get("jobs", 1) or 1
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError("matrix.jobs", f"must be an integer >= 1, got {jobs!r}")
    executor = d.get("executor") or "loop"
    if executor not in EXECUTORS:
        raise ConfigError("matrix.executor", f"'{executor}' is not one of {', '.join(EXECUTORS)}")
    ensemble = check_ensemble(d.get("ensemble") or "none", executor)
    spec = MatrixSpec(experiment=str(d.get("experiment") or DEFAULT_EXPERIMENT), ensemble=ensemble,
                      remedies=define_all(d.get("stabilizers"), d.get("remedies")), seeds=seeds,
                      overrides=overrides_list(d.get("overrides"), "matrix.overrides"), jobs=jobs, executor=executor)
    spec.scenarios = [_scenario(s, spec) for s in scenarios]
    return spec


def check_ensemble(value: Any, executor: str) -> str:
    """``matrix.ensemble``: none; seeds (each cell's seeds as one ensemble: gradlab.ensemble); remedies
    (per scenario, the seeds of every remedy that leaves the model, data, batch and loss alone)."""
    if value not in ENSEMBLE_MODES:
        raise ConfigError("matrix.ensemble", f"'{value}' is not one of {', '.join(ENSEMBLE_MODES)}")
    if value != "none" and executor != "loop":
        raise ConfigError("matrix.ensemble", f"ensembles train in the loop executor, not '{executor}'")
    return value


def load_spec(params_file: str | Path = "params.yaml", key: str = "matrix") -> MatrixSpec:
    """The matrix under ``key`` (``matrix``, or a profile such as ``matrix_gpu``); the profile's
    remedies extend the default matrix's, so the named remedies are defined once."""
    path = Path(params_file)
    if not path.exists():
        raise ConfigError(key, f"{path} not found")
    params = yaml.safe_load(path.read_text()) or {}
    if key not in params:
        profiles = ", ".join(k for k in params if k.startswith("matrix")) or "none"
        raise ConfigError(key, f"no '{key}:' key in {path} (matrices there: {profiles})")
    d = dict(params[key] or {})
    if key != "matrix" and isinstance(params.get("matrix"), dict):
        d["remedies"] = {**(params["matrix"].get("remedies") or {}), **(d.get("remedies") or {})}
    return spec_from_dict(d)


def narrow(spec: MatrixSpec, scenarios: Optional[Sequence[str]] = None,
           remedies: Optional[Sequence[str]] = None) -> MatrixSpec:
    """The command line's selection: scenarios by name (one the spec defines keeps its definition
    and remedy list, any other is a preset name), and the remedies every scenario then runs."""
    if scenarios:
        defined = {sc.name: sc for sc in spec.scenarios}
        spec.scenarios = [defined.get(name) or _scenario(name, spec) for name in scenarios]
    if remedies:
        chosen = spec.resolve(remedies, "--remedies")
        for sc in spec.scenarios:
            sc.remedies = chosen
    return spec


# ---------------------------------------------------------------- composing every cell first
def plan(spec: MatrixSpec, log: Callable[[str], None] = lambda m: None) -> Tuple[List[Combination], List[Dict]]:
    """The runs of every applicable cell, and the cells that are not applicable (with the reason),
    from composing each cell once before anything runs. The scenario itself (remedy ``none``) must
    compose: that error is the matrix's, not the remedy's."""
    applicable, not_applicable = [], []
    seed = f"seed={spec.seeds[0]}"  # seeds only differ in the seed, which spec_from_dict checked
    for sc in spec.scenarios:
        compose_config([*sc.overrides, seed, *spec.overrides])
        for remedy in spec.remedies_of(sc):
            try:
                compose_config([*sc.overrides, *remedy.overrides, seed, *spec.overrides])
                applicable.append((sc, remedy))
            except Exception as exc:  # noqa: BLE001 - a config error is this cell's verdict, anything else a bug
                reason = describe_error(exc)
                if reason is None:
                    raise
                not_applicable.append({"scenario": sc.name, "remedy": remedy.name, "remedy_kind": remedy.kind,
                                       "overrides": list(remedy.overrides), "reason": reason})
                log(f"matrix: not applicable: {sc.name} / {remedy.name} ({reason})")
    used = {r.name for _, r in applicable}
    for name in dict.fromkeys(c["remedy"] for c in not_applicable if c["remedy"] not in used):
        log(f"matrix: warning: remedy '{name}' applies to no scenario of this matrix (check its overrides)")
    return spec.combinations(applicable), not_applicable


# ---------------------------------------------------------------- running
def _finite(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


def run_one(combo: Combination, spec_overrides: Sequence[str], experiment: str, parent_run_id: str,
            uri: str, workdir: str, threads: Optional[int] = None, resume: Optional[Path] = None) -> Dict:
    """Train + evaluate one combination (continuing from ``resume``, the checkpoint of an
    interrupted attempt); returns its record (never raises for a failed run)."""
    from .runs import train_child

    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    record: Dict[str, Any] = {"index": combo.index, "scenario": combo.scenario.name, "remedy": combo.remedy.name,
                              "remedy_kind": combo.remedy.kind, "seed": combo.seed,
                              "overrides": [*combo.overrides, *spec_overrides]}
    try:
        out_dir = Path(workdir) / f"run{combo.index:03d}"
        cfg, result = train_child([*combo.overrides, *spec_overrides], out_dir, parent_run_id, uri, experiment,
                                  run_name=f"{combo.scenario.name}-{combo.remedy.name}-s{combo.seed}",
                                  tags={"matrix": parent_run_id, "matrix/cell": combo.index, **combo.remedy.tags()},
                                  resume=resume, test=True)
        record.update(run_id=result.run_id, steps=result.steps, diverged=result.diverged,
                      diverged_at_step=result.diverged_at_step, explosion_step=result.explosion_step,
                      val_accuracy=_finite(result.val_accuracy), test_accuracy=_finite(result.test_accuracy),
                      status="FINISHED")
    except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the other runs
        record["status"] = "FAILED"
        record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    finally:
        record["wall_seconds"] = round(time.perf_counter() - t0, 3)
    return record


def _line(rec: Dict, total: int) -> str:
    head = f"[{rec['index'] + 1}/{total}] {rec['scenario']} remedy={rec['remedy']} seed={rec['seed']}:"
    if rec["status"] != "FINISHED":
        return f"{head} {rec['status']} ({rec.get('error')})"
    state = f"diverged at step {rec['diverged_at_step']}" if rec["diverged"] else f"{rec['steps']} steps"
    acc = rec.get("test_accuracy")
    return f"{head} {state}, test accuracy {acc:.4f} ({rec['wall_seconds']:.1f}s)" if acc is not None else \
        f"{head} {state}, test accuracy n/a ({rec['wall_seconds']:.1f}s)"


def _parent_params(spec: MatrixSpec, combos: List[Combination], jobs: int, executor: str) -> Dict[str, str]:
    used = {r.name: list(r.overrides) for _, r in spec.cells()}
    return {"scenarios": json.dumps([s.name for s in spec.scenarios]), "remedies": json.dumps(used),
            "cells": json.dumps({sc.name: [r.name for r in spec.remedies_of(sc)] for sc in spec.scenarios}),
            "seeds": json.dumps(spec.seeds), "overrides": json.dumps(spec.overrides), "jobs": str(jobs),
            "n_runs": str(len(combos)), "executor": executor, "ensemble": spec.ensemble}


def _log_not_applicable(parent, cells: List[Dict]) -> None:
    """On the parent run, so a report selected by --parent shows them too."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "not_applicable.json"
        path.write_text(json.dumps(cells, indent=2) + "\n")
        parent.logger.log_artifact(path, "matrix")


def ensemble_units(combos: Sequence[Combination], spec_overrides: Sequence[str], mode: str) -> List[List[Combination]]:
    """The matrix's units of work as ensembles (gradlab.ensemble.run_cell). ``seeds``: each scenario x
    remedy cell's seeds; ``remedies``: per scenario, the runs whose configs agree on what shapes the
    batched step (gradlab.ensemble.shapes_key: model, data, batch size, device, loss), so the seeds
    of every stabilizer, optimizer or schedule remedy train with ``none``'s and a remedy that
    changes the model or the batch is a unit of its own seeds. A cell that cannot be stacked
    (gradlab.ensemble.unsupported: the RNNs, the transformer) runs one unit per run, so the workers
    still share its runs out. Largest units first, so the workers' shares come out even."""
    from .ensemble import shapes_key, unsupported

    keys: Dict[Tuple[str, str], Optional[tuple]] = {}  # per cell (composed once): its group, None: unstackable
    groups: Dict[tuple, List[Combination]] = {}
    singles = []
    for c in combos:
        cell = (c.scenario.name, c.remedy.name)
        if cell not in keys:
            cfg = compose_config([*c.overrides, *spec_overrides])
            keys[cell] = None if unsupported(cfg) else cell if mode == "seeds" else (c.scenario.name, shapes_key(cfg))
        if keys[cell] is None:
            singles.append([c])
        else:
            groups.setdefault(keys[cell], []).append(c)
    return sorted(groups.values(), key=len, reverse=True) + singles


def _run_cell_records(cell: List[Combination], *args) -> List[Dict]:
    """A unit's runs (a cell's seeds, or a scenario's stackable remedies) as one ensemble; a single
    run (a cell that cannot be stacked) alone."""
    from .ensemble import run_cell

    if len(cell) == 1:
        return _run_one_list(cell, *args)
    return run_cell(cell, *args)


def _run_here(combos: List[Combination], args: tuple, jobs: int, show: Callable[[Dict], None],
              ensemble: str = "none") -> List[Dict]:
    """The in-process loop (``jobs`` > 1: joblib worker processes on this machine); with
    ``ensemble=seeds`` a unit of work is a cell's seeds, with ``remedies`` a scenario's stackable
    runs (gradlab.ensemble.run_cell)."""
    records: List[Dict] = []
    stacked = ensemble != "none"
    units = ensemble_units(combos, args[0], ensemble) if stacked else [[c] for c in combos]
    work = _run_cell_records if stacked else _run_one_list
    with tempfile.TemporaryDirectory(prefix="gradlab-matrix-") as workdir:
        if jobs == 1:
            for unit in units:
                for rec in work(unit, *args, workdir):
                    records.append(rec)
                    show(rec)
        else:
            from joblib import Parallel, delayed

            threads = max(1, (os.cpu_count() or 1) // jobs)
            for recs in Parallel(n_jobs=jobs, backend="loky", return_as="generator")(
                    delayed(_in_worker)(work, unit, *args, workdir, threads) for unit in units):
                for rec in recs:
                    records.append(rec)
                    show(rec)
    return records


def _run_one_list(unit: List[Combination], *args) -> List[Dict]:
    return [run_one(unit[0], *args)]


def _in_worker(work: Callable[..., List[Dict]], unit: List[Combination], *args) -> List[Dict]:
    """``work`` in a joblib worker; after the worker's first unit, everything alive (modules, torch,
    MLflow, matplotlib, the data cache: ~700k objects) leaves the garbage collector's scans
    (``gc.freeze``). Each full collection scanned them all, ~0.35 s every few runs of a matrix;
    frozen, it scans what the runs allocate (0.01-0.03 s). Not in the caller's own process
    (``jobs: 1``), which may hold objects that must still be collected."""
    records = work(unit, *args)
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
    return records


def _run_on_cluster(combos: List[Combination], args: tuple, cluster, workdir: Path, log: Callable[[str], None],
                    show: Callable[[Dict], None]) -> List[Dict]:
    """The cells as submitit jobs (gradlab.cluster); the cells' checkpoints are removed once every
    cell is accounted for (the records and job logs stay)."""
    from .cluster import run_cells

    records = run_cells(combos, *args, workdir, cluster, log, on_record=show)
    if all(r["status"] != "LOST" for r in records):
        for run_dir in workdir.glob("run[0-9]*"):
            shutil.rmtree(run_dir, ignore_errors=True)
    return records


def run_matrix(spec: MatrixSpec, out_file: str | Path = "reports/matrix_runs.json", uri: Optional[str] = None,
               jobs: Optional[int] = None, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
               cluster=None, workdir: Optional[str | Path] = None) -> Dict:
    """Run every applicable combination under one parent run, in this process (``cluster=None``) or
    as submitit jobs (a ``gradlab.cluster.ClusterSpec``, working in ``workdir``, default
    ``outputs/matrix/<parent run id>``: shared storage on a cluster); write and return the run list."""
    from .runs import ParentRun

    combos, not_applicable = plan(spec, log)  # a bad definition fails here, before any MLflow run exists
    jobs = max(1, jobs or (cluster.jobs if cluster else spec.jobs))
    executor = cluster.executor if cluster else "loop"
    with ParentRun(uri, spec.experiment, f"matrix-{time.strftime('%Y%m%d-%H%M%S')}", "matrix",
                   _parent_params(spec, combos, jobs, executor)) as parent:
        _log_not_applicable(parent, not_applicable)
        log(f"matrix: {len(combos)} runs ({len(spec.scenarios)} scenarios, {len(spec.cells())} scenario x remedy "
            f"cells of which {len(not_applicable)} not applicable, {len(spec.seeds)} seeds), parent run "
            f"{parent.run_id} in experiment '{spec.experiment}', {parent.uri}")
        t0 = time.perf_counter()
        args = (spec.overrides, spec.experiment, parent.run_id, parent.uri)
        show = lambda rec: log(_line(rec, len(combos)))  # noqa: E731
        if cluster is None:
            records = _run_here(combos, args, jobs, show, spec.ensemble)
        else:
            cluster.jobs = jobs
            folder = Path(workdir or Path("outputs") / "matrix" / parent.run_id).resolve()
            records = _run_on_cluster(combos, args, cluster, folder, log, show)
        records.sort(key=lambda r: r["index"])
        failed = [r for r in records if r["status"] != "FINISHED"]
        wall = time.perf_counter() - t0
        parent.logger.log_metrics({"runs/finished": len(records) - len(failed), "runs/failed": len(failed),
                                   "runs/diverged": sum(bool(r.get("diverged")) for r in records),
                                   "cells/not_applicable": len(not_applicable), "time/matrix_s": wall},
                                  step=0, timestamp_ms=int(time.time() * 1000))
        result = {"parent_run_id": parent.run_id, "experiment": spec.experiment, "tracking_uri": parent.uri,
                  "run_ids": [r["run_id"] for r in records if r.get("run_id") and r["status"] == "FINISHED"],
                  "failed": failed, "not_applicable": not_applicable, "wall_seconds": round(wall, 1), "runs": records}
        out = Path(out_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        parent.status = "FINISHED" if not failed else "FAILED"
        log(f"matrix: {len(records) - len(failed)}/{len(records)} runs finished in {wall:.0f}s -> {out}")
        return result
