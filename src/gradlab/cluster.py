"""The matrix on a cluster: its cells handed to submitit (Slurm, or submitit's local executor).

``pipelines/matrix.py --executor slurm|local --jobs N`` splits the cells into N groups; each group
is one job (one Python process that imports torch and MLflow once, then trains and evaluates its
cells in turn, as the in-process loop does), submitted as one job array. Every cell nests under
the matrix's parent run exactly as in the loop (``gradlab.runs``): the parent is opened here,
before any job starts, and its id travels with the cells.

Nothing is lost silently. A job writes each cell's record to ``<workdir>/cells/<index>.json`` the
moment the cell is done, so a job that dies (killed, preempted, out of time, its node gone) loses
only the cells it had not finished. After every round the cells without a record are submitted
again, up to ``retries`` rounds; a cell that was interrupted continues from its crash-safety
checkpoint (a Slurm preemption's SIGTERM writes one; ``gradlab.training``) in the same MLflow run,
else it starts again. A cell still missing after the last round is reported as LOST in the run
list, next to the cells whose training raised (FAILED).

Why submitit (and not Ray): a Slurm cluster is what most labs that run such matrices have;
submitit is the Slurm client the PyTorch ecosystem uses (plain ``sbatch`` jobs and job arrays, no
daemon to run next to the jobs, pickled Python functions, the same API for its local executor, so
the tests here run the same code path a cluster does). Ray would add a cluster of its own
(head node, object store, autoscaler) for work that is a list of independent processes.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

EXECUTORS = ("local", "slurm")
SRC = Path(__file__).resolve().parents[1]


@dataclass
class ClusterSpec:
    executor: str = "local"  # local: submitit's local executor (processes on this machine); slurm: sbatch
    jobs: int = 2  # the cells are split into this many jobs (each pays the process start-up once)
    retries: int = 2  # rounds of resubmitting the cells whose job died
    timeout_min: int = 120  # each job's time limit
    cpus_per_task: int = 1  # torch threads per job
    slurm: Dict[str, str] = field(default_factory=dict)  # more sbatch parameters, e.g. partition=gpu


def groups(cells: Sequence, n: int) -> List[list]:
    """``cells`` in at most ``n`` contiguous groups of near-equal size."""
    n = max(1, min(n, len(cells)))
    size, extra = divmod(len(cells), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(list(cells[start:end]))
        start = end
    return out


def record_path(workdir: Path, index: int) -> Path:
    return Path(workdir) / "cells" / f"{index:05d}.json"


def write_record(workdir: Path, record: dict) -> None:
    """Atomically: a reader never sees half a record."""
    path = record_path(workdir, record["index"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".rec-")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)


def read_records(workdir: Path) -> Dict[int, dict]:
    records = [json.loads(p.read_text()) for p in sorted((Path(workdir) / "cells").glob("*.json"))]
    return {r["index"]: r for r in records}


def run_group(cells: list, spec_overrides: Sequence[str], experiment: str, parent_run_id: str, uri: str,
              workdir: str, threads: int) -> List[int]:
    """One job: train and evaluate its cells in turn (those without a record yet), each record
    written as soon as the cell is done. An interrupted cell continues from its checkpoint."""
    from .matrix import run_one

    done = read_records(Path(workdir))
    for cell in cells:
        if cell.index in done:
            continue
        checkpoint = Path(workdir) / f"run{cell.index:03d}" / "model.pt"
        record = run_one(cell, spec_overrides, experiment, parent_run_id, uri, workdir, threads,
                         resume=checkpoint if checkpoint.is_file() else None)
        write_record(Path(workdir), record)
    return [c.index for c in cells]


@contextmanager
def importable_here() -> Iterator[None]:
    """Jobs unpickle ``run_group`` by reference: they must import this checkout's gradlab (the
    environment a job starts with is the submitting process's)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def executor(spec: ClusterSpec, folder: Path):
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=spec.executor)
    ex.update_parameters(timeout_min=spec.timeout_min, cpus_per_task=spec.cpus_per_task,
                         **{f"slurm_{k}": v for k, v in spec.slurm.items()})
    return ex


def lost(cell, attempts: int) -> dict:
    return {"index": cell.index, "scenario": cell.scenario.name, "remedy": cell.remedy.name,
            "remedy_kind": cell.remedy.kind, "seed": cell.seed,
            "status": "LOST", "error": f"its job died in each of {attempts} attempts (see the submitit logs)"}


def run_cells(cells: list, spec_overrides: Sequence[str], experiment: str, parent_run_id: str, uri: str,
              workdir: Path, spec: ClusterSpec, log: Callable[[str], None],
              on_record: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Every cell's record: the cells go out in ``spec.jobs`` jobs, and those whose job died go out
    again, up to ``spec.retries`` more rounds."""
    ex = executor(spec, Path(workdir) / "submitit")
    pending, attempts = list(cells), 0
    seen: set = set()
    while pending and attempts <= spec.retries:
        attempts += 1
        with importable_here(), ex.batch():
            jobs = [ex.submit(run_group, group, list(spec_overrides), experiment, parent_run_id, uri, str(workdir),
                              spec.cpus_per_task) for group in groups(pending, spec.jobs)]
        log(f"matrix: round {attempts}: {len(pending)} cells in {len(jobs)} {spec.executor} jobs "
            f"({', '.join(j.job_id for j in jobs)})")
        for job in jobs:
            try:
                job.result()
            except Exception as exc:  # noqa: BLE001 - a dead job: its unfinished cells go out again
                log(f"matrix: job {job.job_id} ended early ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        records = read_records(Path(workdir))
        for index in sorted(set(records) - seen):
            seen.add(index)
            if on_record:
                on_record(records[index])
        pending = [c for c in cells if c.index not in records]
        if pending and attempts <= spec.retries:
            log(f"matrix: {len(pending)} cells lost with their job; submitting them again")
    records = read_records(Path(workdir))
    return [records.get(c.index) or lost(c, attempts) for c in cells]
