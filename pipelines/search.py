"""Random or TPE (Bayesian) search with Optuna: each trial an MLflow child run of one parent run.

Usage (fixed Hydra overrides for every trial after --):
  python pipelines/search.py --sampler tpe --trials 20 --metric val/accuracy \\
      --param optimizer.lr=loguniform:1e-4:1.0 --param stabilizer.clip.max_norm=uniform:0.1:10 \\
      --param optimizer=choice:sgd,adam --param trainer.batch_size=int:32:256 -- experiment=explode_high_lr stabilizer=clip
  python pipelines/search.py ... --storage sqlite:///optuna.db --study-name lr-vs-clip   # several workers, one study
  python pipelines/search.py --param remedy=choice:clip,he_init,layernorm -- experiment=explode_deep_mlp
Param kinds: uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH, choice:A,B,... (see gradlab.search);
remedy=choice:... picks named remedies, defined under matrix.remedies in --params (or stabilizer values).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from gradlab.cli import fail, run_cli  # noqa: E402
from gradlab.search import DEFAULT_EXPERIMENT, SAMPLERS, SearchSpec, SearchSpecError, parse_space, run_search  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every trial (after --)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=KIND:ARGS", help="a searched key (repeat)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--trials", type=int, default=20, help="trials this process runs (default 20)")
    p.add_argument("--metric", default="val/accuracy", help="any metric the runs log; test/... evaluates on the test split")
    p.add_argument("--direction", choices=("maximize", "minimize"),
                   help="default: maximize for *accuracy metrics, else minimize")
    p.add_argument("--startup-trials", type=int, default=10, help="TPE: random trials before the model steers (default 10)")
    p.add_argument("--seed", type=int, help="sampler seed (give each worker of a shared study its own)")
    p.add_argument("--storage", help="Optuna storage URL, e.g. sqlite:///optuna.db or postgresql://... (default: in memory)")
    p.add_argument("--study-name", help="with --storage: the same name joins the same study")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--params", default="params.yaml", help="where remedy=choice:... finds the remedies "
                                                           "(matrix.remedies; default: params.yaml)")
    a = p.parse_args(argv)
    if a.trials < 1 or a.startup_trials < 0:
        p.error("--trials must be >= 1 and --startup-trials >= 0")
    from gradlab.data import DataError
    from gradlab.remedies import load as load_remedies

    try:
        remedies = load_remedies(a.params) if any(t.startswith("remedy=") for t in a.param) else {}
        spec = SearchSpec(params=parse_space(a.param, remedies), fixed=a.overrides, metric=a.metric, direction=a.direction,
                          sampler=a.sampler, trials=a.trials, startup_trials=a.startup_trials, seed=a.seed,
                          storage=a.storage, study_name=a.study_name, experiment=a.experiment)
        summary = run_search(spec, uri=a.tracking_uri)
    except SearchSpecError as exc:
        fail(str(exc), 2)
    except DataError as exc:
        fail(str(exc), 1)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
