"""Investigate a run's bad step after the fact: `python src/forensics.py run_id=<id> [step=<n>]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from gradlab.cli import run_cli, task  # noqa: E402
from gradlab.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="forensics")
@task
def main(cfg) -> None:
    from gradlab.forensics import after_the_fact  # after the config is checked

    findings = after_the_fact(cfg, Path(HydraConfig.get().runtime.output_dir))
    print(findings.summary())
    print(Path(findings.artifacts[0]).parent / "counterfactual.md")


if __name__ == "__main__":
    run_cli(main, hydra=True)
