"""The fixed cost of a run: a matrix cell's wall time outside its training loop.

    python benchmarks/fixed_cost.py [--rounds 3] [--against <git rev>] [--out reports/fixed_cost.json]

A matrix worker trains cell after cell in one process (`gradlab.matrix.run_one`: compose, data to
the device, train, evaluate the checkpoint on the test set, plots, MLflow). Per cell this measures
the wall time of `run_one` and the training loop's own time (the run's `time/step_ms` x `steps`);
the difference is the fixed cost: composition, data, model, evaluation, plots, checkpoint, store.
The cells are short on purpose (runs that diverge within a few steps and 50-step runs), so the
fixed cost is most of their time, as it is for a diverging cell of the matrix.

With --against REV, the same cells also run with gradlab as of that git revision (checked out
into a temporary worktree), in the same rounds, alternating: the before/after ratio comes from
one invocation. Each tree runs in its own process (one torch thread), after one warm-up cell.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = [  # (scenario, remedy, extra overrides): short runs, where the fixed cost dominates
    ("explode_deep_mlp", "none", []),                       # diverges at step 2
    ("explode_high_lr", "none", []),                        # diverges within ~30 steps
    ("explode_deep_mlp", "clip", ["trainer.max_steps=50"]),
    ("spike_lr", "clip", ["trainer.max_steps=50"]),
]


def worker(src: str, out: str) -> None:
    """Runs in a child process: the CELLS with gradlab from ``src``; writes one JSON record per cell."""
    sys.path.insert(0, str(Path(src) / "src"))
    os.chdir(src)
    import time

    import torch
    from mlflow import MlflowClient

    from gradlab.matrix import load_spec, plan, run_one
    from gradlab.tracking import ensure_store

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gradlab-fixed-"))
    uri = f"sqlite:///{tmp / 'store.db'}"
    client = ensure_store(uri)
    parent = client.create_run(client.create_experiment("fixed")).info.run_id
    spec = load_spec(ROOT / "params.yaml")
    combos, _ = plan(spec)
    records = []
    for i, (scenario, remedy, extra) in enumerate([CELLS[0]] + CELLS):  # the first: warm-up (imports, caches)
        combo = next(c for c in combos if c.scenario.name == scenario and c.remedy.name == remedy and c.seed == 0)
        overrides = [*spec.overrides, f"data.root={tmp / 'data'}", "trainer.progress=false", *extra]
        t0 = time.perf_counter()
        rec = run_one(combo, overrides, "fixed", parent, uri, str(tmp))
        wall = time.perf_counter() - t0
        if rec["status"] != "FINISHED":
            raise SystemExit(f"{scenario}/{remedy}: {rec.get('error')}")
        m = MlflowClient(uri).get_run(rec["run_id"]).data.metrics
        loop = m["time/step_ms"] * m["steps"] / 1000
        if i:
            records.append({"cell": f"{scenario}/{remedy}", "steps": int(m["steps"]), "wall_s": wall,
                            "loop_s": loop, "fixed_s": wall - loop})
    Path(out).write_text(json.dumps(records))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--against", help="a git revision to compare with (e.g. the commit before a change)")
    ap.add_argument("--out", default="reports/fixed_cost.json")
    ap.add_argument("--worker", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    trees = {"now": str(ROOT)}
    if args.against:
        old = Path(tempfile.mkdtemp(prefix="gradlab-against-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against], check=True,
                       capture_output=True)
        trees[args.against] = str(old)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("GRADLAB_DATA_MIRROR", str((ROOT.parent / "shared" / "data" / "mnist").resolve()))
    results = {name: [] for name in trees}
    try:
        for _ in range(args.rounds):
            for name, src in trees.items():
                out = Path(tempfile.mkstemp(suffix=".json")[1])
                subprocess.run([sys.executable, __file__, "--worker", src, str(out)], check=True, env=env)
                results[name].append(json.loads(out.read_text()))
    finally:
        if args.against:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", trees[args.against]],
                           capture_output=True)
    summary = {}
    for name, rounds in results.items():
        cells = {}
        for rec in (r for rnd in rounds for r in rnd):
            cells.setdefault(rec["cell"], []).append(rec)
        summary[name] = {cell: {k: statistics.median(r[k] for r in recs) for k in ("steps", "wall_s", "loop_s", "fixed_s")}
                         for cell, recs in cells.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rounds": args.rounds, "results": summary}, indent=2) + "\n")
    names = list(summary)
    print("| cell | steps | " + " | ".join(f"{n}: wall / loop / fixed (s)" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for cell in summary[names[0]]:
        row = [f"{summary[n][cell]['wall_s']:.2f} / {summary[n][cell]['loop_s']:.2f} / {summary[n][cell]['fixed_s']:.2f}"
               for n in names]
        print(f"| {cell} | {summary[names[0]][cell]['steps']:.0f} | " + " | ".join(row) + " |")
    for n in names:
        print(f"median fixed cost per run, {n}: {statistics.median(c['fixed_s'] for c in summary[n].values()):.2f} s")


if __name__ == "__main__":
    main()
