"""Preflight a run before training it: `python src/diagnose.py <the overrides you would give train.py>`."""
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
def main(cfg) -> str:
    from gradlab.preflight import diagnose  # after the config is checked

    report = diagnose(cfg, Path(HydraConfig.get().runtime.output_dir))
    print(report.table())
    print(f"run {report.run_id}")
    return report.verdict


if __name__ == "__main__":
    run_cli(main, hydra=True)
