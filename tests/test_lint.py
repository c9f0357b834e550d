"""The code stays free of pyflakes findings (unused imports and names, undefined names)."""
import subprocess

from conftest import PYTHON, ROOT


def test_pyflakes_clean():
    proc = subprocess.run([PYTHON, "-m", "pyflakes", "src", "pipelines", "benchmarks", "tests", "examples"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
