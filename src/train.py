"""Train one model: `python src/train.py stabilizer=clip` (any Hydra override; -m for sweeps)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from gradlab.cli import run_cli, task  # noqa: E402
from gradlab.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@task
def main(cfg) -> float:
    from gradlab.training import train  # after the config is checked: a config error never waits for MLflow's import

    hydra_cfg = HydraConfig.get()
    result = train(cfg, Path(hydra_cfg.runtime.output_dir), overrides=list(hydra_cfg.overrides.task))
    from mlflow import MlflowClient

    from gradlab.tracking import ui_url

    state = "diverged at step %d" % result.diverged_at_step if result.diverged else "finished"
    if result.rank == 0:  # under torchrun every rank returns the same record
        print(f"run {result.run_id} {state}: {result.steps} steps, val accuracy {result.val_accuracy:.4f}")
        experiment = MlflowClient(result.tracking_uri).get_run(result.run_id).info.experiment_id
        print(f"  in the MLflow UI: {ui_url(result.tracking_uri, experiment, result.run_id)}")
    return result.val_accuracy


if __name__ == "__main__":
    run_cli(main, hydra=True)
