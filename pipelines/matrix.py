"""DVC stage `matrix`: scenarios x remedies x seeds from params.yaml (`matrix:`), one MLflow parent run.

Usage (DVC runs it without arguments):
  python pipelines/matrix.py                                   # the matrix in params.yaml
  python pipelines/matrix.py --jobs 2                          # two training processes
  python pipelines/matrix.py --scenarios explode_rnn --remedies none clip lstm irnn --seeds 0 1
  python pipelines/matrix.py --scenarios explode_rnn --stabilizers none clip "[warmup,clip]"   # the same, older name
  python pipelines/matrix.py --seeds 0 -- data=synthetic trainer.max_steps=8   # extra Hydra overrides (after --)
Writes reports/matrix_runs.json (parent run id + child run ids) for pipelines/compare.py.
See gradlab.matrix for why this is an in-process loop rather than DVC matrix stages or a Hydra multirun.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from gradlab.cli import run_cli  # noqa: E402
from gradlab.matrix import load_spec, narrow, run_matrix  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides appended to matrix.overrides")
    p.add_argument("--params", default="params.yaml", help="file with the `matrix:` key (default: params.yaml)")
    p.add_argument("--out", default="reports/matrix_runs.json", help="run list for the report")
    p.add_argument("--jobs", type=int, help="parallel training processes (default: matrix.jobs, else 1)")
    p.add_argument("--experiment", help="MLflow experiment (default: matrix.experiment)")
    p.add_argument("--scenarios", nargs="+", help="only these scenarios (one defined in the matrix keeps its remedy "
                                                  "list; another name is a preset)")
    p.add_argument("--remedies", "--stabilizers", nargs="+", dest="remedies",
                   help="every scenario runs these remedies (names of matrix.remedies, or stabilizer values)")
    p.add_argument("--seeds", nargs="+", type=int, help="replace matrix.seeds")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    a = p.parse_args(argv)
    if a.seeds and min(a.seeds) < 0:
        p.error("--seeds must be >= 0")
    spec = narrow(load_spec(a.params), a.scenarios, a.remedies)
    spec.experiment = a.experiment or spec.experiment
    spec.seeds = a.seeds or spec.seeds
    spec.overrides = [*spec.overrides, *a.overrides]
    result = run_matrix(spec, a.out, uri=a.tracking_uri, jobs=a.jobs)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
