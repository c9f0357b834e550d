"""DVC stage `fetch`: download and verify a dataset's IDX files into data/raw/<name>/.

Usage: python pipelines/fetch.py [mnist|fashion_mnist ...]
Sources, in order: $GRADLAB_DATA_MIRROR (a directory or base URL), Debian's
Fashion-MNIST package, then the public mirrors torchvision uses.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradlab.data import DataError, fetch  # noqa: E402

if __name__ == "__main__":
    try:
        for name in sys.argv[1:] or ["mnist"]:
            fetch(name, "data")
    except DataError as exc:
        print(f"gradlab: {exc}", file=sys.stderr)
        sys.exit(1)
