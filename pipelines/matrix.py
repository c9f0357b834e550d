"""DVC stage `matrix`: scenarios x remedies x seeds from params.yaml (`matrix:`), one MLflow parent run.

Usage (DVC runs it without arguments):
  python pipelines/matrix.py                                   # the matrix in params.yaml
  python pipelines/matrix.py --jobs 2                          # two training processes
  python pipelines/matrix.py --profile gpu                     # params.yaml `matrix_gpu:` (CUDA scenarios)
  python pipelines/matrix.py --scenarios explode_rnn --remedies none clip lstm irnn --seeds 0 1
  python pipelines/matrix.py --scenarios explode_rnn --stabilizers none clip "[warmup,clip]"   # the same, older name
  python pipelines/matrix.py --seeds 0 -- data=synthetic trainer.max_steps=8   # extra Hydra overrides (after --)
  python pipelines/matrix.py --ensemble seeds                  # each cell's seeds as one vectorized ensemble
  python pipelines/matrix.py --ensemble remedies               # ... each scenario's stackable remedies and seeds
  python pipelines/matrix.py --executor local --jobs 2         # the cells as 2 submitit jobs on this machine
  python pipelines/matrix.py --executor slurm --jobs 40 --slurm partition=gpu --slurm gpus_per_node=1
Writes reports/matrix_runs.json (parent run id + child run ids) for pipelines/compare.py.
See gradlab.matrix for the in-process loop and gradlab.cluster for the submitit executors.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from gradlab.cli import run_cli  # noqa: E402
from gradlab.matrix import EXECUTORS, check_ensemble, load_spec, narrow, run_matrix  # noqa: E402


def slurm_option(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an sbatch parameter, e.g. partition=gpu), got '{text}'")
    return key.replace("-", "_"), value


def cluster_spec(a, executor: str, spec_jobs: int):
    """The submitit settings from the command line (None for the in-process loop)."""
    if executor == "loop":
        return None
    from gradlab.cluster import ClusterSpec

    return ClusterSpec(executor=executor, jobs=a.jobs or spec_jobs, retries=a.retries, timeout_min=a.timeout_min,
                       cpus_per_task=a.cpus_per_task, slurm=dict(a.slurm))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides appended to matrix.overrides")
    p.add_argument("--params", default="params.yaml", help="file with the `matrix:` key (default: params.yaml)")
    p.add_argument("--profile", help="another matrix of that file: --profile gpu reads `matrix_gpu:` (the GPU scenarios)")
    p.add_argument("--out", default="reports/matrix_runs.json", help="run list for the report")
    p.add_argument("--jobs", type=int, help="parallel training processes, or submitit jobs (default: matrix.jobs)")
    p.add_argument("--experiment", help="MLflow experiment (default: matrix.experiment)")
    p.add_argument("--scenarios", nargs="+", help="only these scenarios (one defined in the matrix keeps its remedy "
                                                  "list; another name is a preset)")
    p.add_argument("--remedies", "--stabilizers", nargs="+", dest="remedies",
                   help="every scenario runs these remedies (names of matrix.remedies, or stabilizer values)")
    p.add_argument("--seeds", nargs="+", type=int, help="replace matrix.seeds")
    p.add_argument("--ensemble", choices=["none", "seeds", "remedies"],
                   help="seeds: each cell's seeds train as one vectorized ensemble; remedies: per scenario, every "
                        "remedy that keeps the model, data, batch and loss, with its seeds (default: matrix.ensemble)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    g = p.add_argument_group("cluster (submitit)")
    g.add_argument("--executor", choices=EXECUTORS, help="loop: this process (default: matrix.executor); local: "
                                                         "submitit jobs on this machine; slurm: sbatch jobs")
    g.add_argument("--retries", type=int, default=2, help="rounds of resubmitting cells whose job died (default 2)")
    g.add_argument("--timeout-min", type=int, default=120, help="each job's time limit in minutes (default 120)")
    g.add_argument("--cpus-per-task", type=int, default=1, help="CPUs (torch threads) per job (default 1)")
    g.add_argument("--slurm", action="append", default=[], type=slurm_option, metavar="KEY=VALUE",
                   help="an sbatch parameter (repeat), e.g. partition=gpu, gpus_per_node=1, account=lab")
    g.add_argument("--workdir", help="shared folder for checkpoints, cell records and job logs "
                                     "(default: outputs/matrix/<parent run id>)")
    a = p.parse_args(argv)
    if a.seeds and min(a.seeds) < 0:
        p.error("--seeds must be >= 0")
    if (a.jobs is not None and a.jobs < 1) or a.retries < 0 or a.timeout_min < 1 or a.cpus_per_task < 1:
        p.error("--jobs, --timeout-min and --cpus-per-task must be >= 1, --retries >= 0")
    spec = narrow(load_spec(a.params, f"matrix_{a.profile}" if a.profile else "matrix"), a.scenarios, a.remedies)
    spec.experiment = a.experiment or spec.experiment
    spec.seeds = a.seeds or spec.seeds
    spec.overrides = [*spec.overrides, *a.overrides]
    spec.ensemble = check_ensemble(a.ensemble or spec.ensemble, a.executor or spec.executor)
    cluster = cluster_spec(a, a.executor or spec.executor, spec.jobs)
    result = run_matrix(spec, a.out, uri=a.tracking_uri, jobs=a.jobs, cluster=cluster, workdir=a.workdir)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
