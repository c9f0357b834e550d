"""DVC stage `prepare`: uint8 train / val / test splits in data/prepared/<name>.pt.

Usage: python pipelines/prepare.py [mnist|fashion_mnist ...]  (val size and seed from params.yaml)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import yaml  # noqa: E402

from gradlab.data import DataError, prepare  # noqa: E402

if __name__ == "__main__":
    params = yaml.safe_load(Path("params.yaml").read_text()).get("prepare", {}) if Path("params.yaml").exists() else {}
    try:
        for name in sys.argv[1:] or ["mnist"]:
            prepare(name, "data", val_size=params.get("val_size", 5000), seed=params.get("seed", 0))
    except DataError as exc:
        print(f"gradlab: {exc}", file=sys.stderr)
        sys.exit(1)
