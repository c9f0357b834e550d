"""DVC stage `compare`: the comparison report of a benchmark matrix, read back from MLflow.

Usage (DVC runs it without arguments):
  python pipelines/compare.py                                   # the runs in reports/matrix_runs.json
  python pipelines/compare.py --runs /tmp/rep/matrix_runs.json --out /tmp/rep/reports
  python pipelines/compare.py --parent <RUN_ID>                 # the children of a matrix parent run
  python pipelines/compare.py --experiment gradlab-matrix       # every training run in an experiment
  python pipelines/compare.py --experiment gradlab-matrix --filter "tags.scenario = 'explode_rnn'"
Writes report.md/.html/.csv, metrics.json, accuracy.csv and figures/ into --out (default: reports), and
logs them to the parent run when the whole matrix is selected (a run list or --parent, no --filter).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from gradlab.cli import fail, run_cli  # noqa: E402
from gradlab.report import ReportError, select_runs, write_report  # noqa: E402

DEFAULT_RUNS = "reports/matrix_runs.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--runs", help=f"run list written by pipelines/matrix.py (default: {DEFAULT_RUNS})")
    which.add_argument("--parent", metavar="RUN_ID", help="the matrix parent run")
    which.add_argument("--experiment", metavar="NAME", help="every training run of an MLflow experiment")
    p.add_argument("--filter", metavar="MLFLOW_FILTER", help="MLflow search filter, e.g. \"tags.seed = '0'\"; "
                                                             "alone it searches every experiment")
    p.add_argument("--tracking-uri", help="MLflow store (default: the run list's, else $MLFLOW_TRACKING_URI, "
                                          "else ./mlflow.db)")
    p.add_argument("--out", default="reports", help="report folder (default: reports)")
    a = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading the matrix's n/a cells
    runs_file = a.runs or (DEFAULT_RUNS if not (a.parent or a.experiment or a.filter) else None)
    try:
        selection = select_runs(runs_file, a.parent, a.experiment, a.filter, a.tracking_uri)
        report = write_report(selection, a.out)
    except ReportError as exc:
        fail(str(exc), 2)
    best = ", ".join(f"{r.scenario}: {r.remedy}" for r in report.table[report.table.best].itertuples())
    logged = f"; logged to parent run {report.parent_run_id}" if report.parent_run_id else ""
    print(f"report: {len(report.runs)} runs, best remedy {best} -> {Path(a.out) / 'report.md'}{logged}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
