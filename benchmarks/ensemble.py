"""Matrix throughput with and without vectorized ensembles (issue 13 §5), side by side.

    python benchmarks/ensemble.py [--cells spike_bad_batch/clip explode_high_lr/none ...] [--seeds 0 1 2]
                                  [--mode seeds|remedies] [--jobs 2] [--rounds 2] [--out reports/bench_ensemble.json]
                                  [-- overrides]

Each round runs the same small matrix twice, in alternating order (so drift on a shared machine hits
both alike): ``ensemble: none`` (one job per run, as the default matrix) and ``ensemble: <mode>``
(seeds: one job per cell; remedies: one job per scenario's stackable cells), with the default matrix's overrides (``trainer.deterministic=true
trainer.threads=1``) and ``jobs`` worker processes, each into a fresh SQLite store. Throughput is
runs per hour of matrix wall time (``gradlab.matrix.run_matrix``'s own ``wall_seconds``: training,
evaluation, MLflow, plots; the store's creation is outside it); the
ratio is ensemble / individual in the same round. The ``jobs`` worker processes are started and
have imported torch and gradlab before the first round (joblib's loky workers are reused). Real MNIST (``data.name`` from the config:
``GRADLAB_DATA_MIRROR`` or a prepared ``data/``). Writes JSON (--out) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradlab.matrix import load_spec, narrow, run_matrix  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CELLS = ["spike_bad_batch/clip", "spike_lr/zclip", "explode_high_lr/none", "explode_deep_mlp/clip"]


def spec_for(cells, seeds, ensemble: str, overrides):
    """The default matrix narrowed to ``cells`` (scenario/remedy)."""
    spec = load_spec(ROOT / "params.yaml")
    defined = {sc.name: sc for sc in spec.scenarios}
    scenarios = []
    for cell in cells:
        name, remedy = cell.split("/")
        sc = defined[name]
        if sc not in scenarios:
            sc.remedies = []
            scenarios.append(sc)
        sc.remedies += spec.resolve([remedy], "--cells")
    spec = narrow(spec)
    spec.scenarios, spec.seeds, spec.ensemble = scenarios, list(seeds), ensemble
    spec.experiment = f"bench-ensemble-{ensemble}"
    spec.overrides = [*spec.overrides, *overrides]
    return spec


def one(cells, seeds, ensemble: str, jobs: int, overrides) -> dict:
    with tempfile.TemporaryDirectory(prefix="gradlab-bench-ens-") as tmp:
        spec = spec_for(cells, seeds, ensemble, overrides)
        result = run_matrix(spec, Path(tmp) / "runs.json", uri=f"sqlite:///{tmp}/mlflow.db", jobs=jobs,
                            log=lambda m: None)
    runs = result["runs"]
    finished = [r for r in runs if r["status"] == "FINISHED"]
    return {"wall_s": result["wall_seconds"], "runs": len(runs), "finished": len(finished),
            "runs_per_hour": 3600 * len(finished) / result["wall_seconds"],
            "test_accuracy": {f"{r['scenario']}/{r['remedy']}/s{r['seed']}": r.get("test_accuracy") for r in runs},
            "steps": {f"{r['scenario']}/{r['remedy']}/s{r['seed']}": r.get("steps") for r in runs}}


def _warm() -> None:
    import importlib

    import torch

    importlib.import_module("gradlab.ensemble")  # torch, MLflow and the trainer
    torch.use_deterministic_algorithms(True, warn_only=True)  # its first call imports torch._inductor (seconds)


def warm_workers(jobs: int) -> None:
    """Start joblib's loky workers (reused by the matrix) so neither variant pays their start-up."""
    if jobs > 1:
        from joblib import Parallel, delayed

        Parallel(n_jobs=jobs, backend="loky")(delayed(_warm)() for _ in range(2 * jobs))
    _warm()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    p.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="scenario/remedy cells of the default matrix")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="worker processes, as the default matrix (2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--mode", choices=["seeds", "remedies"], default="seeds", help="the ensemble mode against none")
    p.add_argument("--out", default="reports/bench_ensemble.json")
    a = p.parse_args(argv)
    warm_workers(a.jobs)
    rounds = []
    for r in range(a.rounds):
        order = ["none", a.mode] if r % 2 == 0 else [a.mode, "none"]
        got = {mode: one(a.cells, a.seeds, mode, a.jobs, a.overrides) for mode in order}
        got["ratio"] = got[a.mode]["runs_per_hour"] / got["none"]["runs_per_hour"]
        rounds.append(got)
        print(f"round {r + 1}: individual {got['none']['wall_s']:.1f}s ({got['none']['runs_per_hour']:.0f} runs/h), "
              f"ensemble {got[a.mode]['wall_s']:.1f}s ({got[a.mode]['runs_per_hour']:.0f} runs/h): "
              f"{got['ratio']:.2f}x", file=sys.stderr)
    ratios = [g["ratio"] for g in rounds]
    summary = {"cells": a.cells, "seeds": a.seeds, "mode": a.mode, "jobs": a.jobs, "overrides": a.overrides,
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "rounds": rounds}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    runs = rounds[0]["none"]["runs"]
    print(f"| matrix of {runs} runs ({len(a.cells)} cells x {len(a.seeds)} seeds), jobs {a.jobs} | wall s | runs/hour |")
    print("|---|---|---|")
    for mode, label in (("none", "individual runs"), (a.mode, f"ensemble: {a.mode}")):
        walls = [g[mode]["wall_s"] for g in rounds]
        rph = [g[mode]["runs_per_hour"] for g in rounds]
        print(f"| {label} | {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) | "
              f"{statistics.median(rph):.0f} |")
    print(f"| ratio (ensemble / individual, same round) | | {summary['ratio_median']:.2f}x "
          f"({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
