"""Evaluate a checkpoint on the test split: `python src/evaluate.py checkpoint=models/model.pt`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

import hydra  # noqa: E402

from gradlab.cli import run_cli, task  # noqa: E402
from gradlab.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@task
def main(cfg) -> None:
    from gradlab.evaluation import evaluate  # after the config is checked

    result = evaluate(cfg.checkpoint, cfg.metrics_file, cfg.batch_size, cfg.device, cfg.tracking_uri)
    print(f"run {result['run_id']}: test accuracy {result['test/accuracy']:.4f}, loss {result['test/loss']:.4f}")


if __name__ == "__main__":
    run_cli(main, hydra=True)
