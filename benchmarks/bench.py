"""Shared by the benchmarks: a Trainer per variant on the same data and model, and an interleaved timer.

Variants are timed round by round, each variant once per round, so drift on a shared machine hits
them all alike; ratios are taken within a round, then the median over rounds is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from gradlab.config import register_configs  # noqa: E402
from gradlab.training import Trainer  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def arguments(doc: str, steps: int, rounds: int) -> argparse.Namespace:
    """The benchmarks' command line: --models, --steps (per variant per round), --rounds, --device, --batch-size."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=128)
    return ap.parse_args()


def trainers(variants: Dict[str, Sequence[str]], common: Sequence[str]) -> Dict[str, Trainer]:
    """One Trainer per variant (its overrides after ``common``), synthetic data, writing into a tmp dir."""
    register_configs()
    tmp = tempfile.mkdtemp()
    out = {}
    with initialize_config_dir(CONF, version_base="1.3"):
        for name, overrides in variants.items():
            cfg = compose("config", overrides=["data=synthetic", "data.synthetic_size=4096", "telemetry.plots=false",
                                               f"tracking.uri=sqlite:///{tmp}/bench.db", *common, *overrides])
            out[name] = Trainer(cfg, Path(tmp) / name.replace("/", "_"))
    return out


def one_batch(trainer: Trainer, batch_size: int):
    data = trainer.train_data
    return next(data.shuffled_batches(batch_size, torch.randperm(len(data))))


def interleaved(runs: Dict[str, Callable[[], None]], rounds: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds each ``run`` took, per round; the runs are interleaved within each round."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratios(times: Dict[str, List[float]], base: str) -> Dict[str, float]:
    """The median over rounds of each run's time / ``base``'s time in the same round."""
    return {name: statistics.median(t / b for t, b in zip(ts, times[base])) for name, ts in times.items()}
